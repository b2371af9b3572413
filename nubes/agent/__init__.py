"""The host agent: turns the records bound to this host into QEMU processes, disks and networks."""
