"""Errors of the tiny image builder that a user can cause or fix.

They stay in the NubesError family, so the CLI ends with a message and a non-zero exit.
"""

from __future__ import annotations

from nubes.errors import NubesError


class ImageBuildError(NubesError):
    """Building the tiny guest image failed (a tool failed, a package was missing)."""

    code = "image_build_failed"
    exit_code = 1


class PackageUnavailable(ImageBuildError):
    """apt could not find or download a Debian package the image is made from."""

    code = "image_package_unavailable"
