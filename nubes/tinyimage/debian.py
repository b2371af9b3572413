"""Debian packages for the builder: resolve candidate versions, download, extract.

Parsing apt's output is pure and unit-tested; the functions that run apt-get, apt-cache
and dpkg-deb never install anything on the host.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from nubes.errors import CommandFailed
from nubes.process import run_tool
from nubes.tinyimage.errors import ImageBuildError, PackageUnavailable

_APT_HINT = "run `apt-get update` (as root) so apt knows the current Debian packages"


def parse_policy_candidates(policy_output: str) -> dict[str, str]:
    """Package name -> candidate version from `apt-cache policy PKG...` output.

    Packages without a candidate (`(none)`) are left out.
    """
    candidates: dict[str, str] = {}
    package: str | None = None
    for line in policy_output.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1]
        elif package and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                candidates[package] = version
            package = None
    return candidates


def kernel_package_from_depends(depends: str) -> str:
    """The versioned `linux-image-*` package a kernel metapackage's Depends field names.

    Raises ImageBuildError when there is none.
    """
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if name.startswith("linux-image-"):
            return name
    raise ImageBuildError(f"no linux-image package in Depends: {depends!r}")


def parse_control_field(control: str, field: str) -> str:
    """The value of one field in a Debian control paragraph (first paragraph only)."""
    for line in control.splitlines():
        if not line.strip():
            break
        name, sep, value = line.partition(":")
        if sep and name == field:
            return value.strip()
    raise ImageBuildError(f"no {field} field in package control data")


def deb_file_name(package: str, version: str) -> str:
    """The file name glob under which `apt-get download` stores PACKAGE=VERSION."""
    return f"{package}_{version.replace(':', '%3a')}_*.deb"


def _apt_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def candidate_versions(packages: Iterable[str]) -> dict[str, str]:
    """Candidate versions of PACKAGES from the host's apt lists.

    Raises PackageUnavailable when apt knows no candidate for one of them.
    """
    names = list(packages)
    found = parse_policy_candidates(run_tool(["apt-cache", "policy", *names], env=_apt_env()))
    missing = [name for name in names if name not in found]
    if missing:
        raise PackageUnavailable(
            f"apt has no candidate version of {', '.join(missing)}", hint=_APT_HINT
        )
    return {name: found[name] for name in names}


def kernel_package(meta_package: str) -> tuple[str, str]:
    """The metapackage's candidate version and the versioned kernel package it depends on.

    Raises PackageUnavailable when apt does not know the metapackage.
    """
    try:
        control = run_tool(["apt-cache", "show", "--no-all-versions", meta_package], env=_apt_env())
    except CommandFailed as error:
        raise PackageUnavailable(f"apt does not know {meta_package}", hint=_APT_HINT) from error
    depends = parse_control_field(control, "Depends")
    return parse_control_field(control, "Version"), kernel_package_from_depends(depends)


def download(versions: dict[str, str], directory: Path) -> dict[str, Path]:
    """The .deb of each PACKAGE=VERSION in DIRECTORY, downloading only the missing ones.

    Raises PackageUnavailable when apt cannot download one of them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {name: deb_file_name(name, version) for name, version in versions.items()}
    missing = [name for name, pattern in wanted.items() if not any(directory.glob(pattern))]
    if missing:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            # apt's download sandbox user cannot write into root's cache directory.
            argv += ["-o", "APT::Sandbox::User=root"]
        argv += [f"{name}={versions[name]}" for name in missing]
        try:
            run_tool(argv, cwd=directory, env=_apt_env())
        except CommandFailed as error:
            raise PackageUnavailable(
                f"apt-get download failed: {error.message}", hint=_APT_HINT
            ) from error
    files = {}
    for name, pattern in wanted.items():
        matches = sorted(directory.glob(pattern))
        if not matches:
            raise PackageUnavailable(f"apt-get download gave no file for {name}", hint=_APT_HINT)
        files[name] = matches[0]
    return files


def extract(deb: Path, destination: Path) -> Path:
    """Unpacks a .deb's files (not its scripts) into DESTINATION and returns it."""
    destination.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg-deb", "-x", str(deb), str(destination)])
    return destination
