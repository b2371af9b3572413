"""Reading apt's answers: candidate versions, the kernel behind the metapackage."""

from __future__ import annotations

import pytest

from nubes.tinyimage.debian import (
    deb_file_name,
    kernel_package_from_depends,
    parse_control_field,
    parse_policy_candidates,
)
from nubes.tinyimage.errors import ImageBuildError

POLICY = """\
busybox-static:
  Installed: (none)
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
     1:1.35.0-4+deb12u1+b1 500
        500 http://deb.example/debian bookworm/main amd64 Packages
ghost-package:
  Installed: (none)
  Candidate: (none)
dropbear-bin:
  Installed: (none)
  Candidate: 2022.83-1+deb12u3
"""


def test_policy_output_gives_each_package_its_candidate() -> None:
    assert parse_policy_candidates(POLICY) == {
        "busybox-static": "1:1.35.0-4+deb12u1+b1",
        "dropbear-bin": "2022.83-1+deb12u3",
    }


def test_the_metapackage_depends_names_the_versioned_kernel() -> None:
    depends = "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    assert kernel_package_from_depends(depends) == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(ImageBuildError):
        kernel_package_from_depends("libc6 (>= 2.36)")


def test_control_fields_are_read_from_the_first_paragraph_only() -> None:
    control = "Package: a\nVersion: 2\nDepends: b\n\nPackage: a\nVersion: 1\n"
    assert parse_control_field(control, "Version") == "2"
    with pytest.raises(ImageBuildError):
        parse_control_field(control, "Pre-Depends")


def test_deb_file_names_escape_the_epoch_like_apt_does() -> None:
    assert deb_file_name("zlib1g", "1:1.2.13.dfsg-1") == "zlib1g_1%3a1.2.13.dfsg-1_*.deb"
