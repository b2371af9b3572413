"""The nubes tiny guest image: a small cloud guest built from Debian packages.

`builder.build_tiny_image` makes it (kernel, initrd, qcow2 root disk, manifest) in a
cache directory; `guest/` holds the scripts that run inside it.
"""
