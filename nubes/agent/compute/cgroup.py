"""CPU weight of a VM's QEMU process: one cgroup per VM under a group this agent owns.

cgroup v2 (`cpu.weight`) where its cpu controller is available, else the cgroup v1 cpu
controller (`cpu.shares`); which one is read from /proc/self/mountinfo. Weights are in
cgroup v2 terms everywhere: 1..10000, 100 is the default share.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from nubes.errors import NubesError
from nubes.ids import IdKind, validate_id

MIN_WEIGHT = 1
MAX_WEIGHT = 10000
DEFAULT_WEIGHT = 100
# cgroup v1 cpu.shares: 1024 is the default (weight 100); the kernel takes 2..262144.
_SHARES_PER_WEIGHT = 1024 / DEFAULT_WEIGHT
_MIN_SHARES = 2
_MAX_SHARES = 262144
_MOUNTINFO = Path("/proc/self/mountinfo")


class CgroupVersion(StrEnum):
    V2 = "v2"
    V1 = "v1"


class CgroupError(NubesError):
    """The kernel refused a cgroup operation (the path and its reason are in the message)."""

    code = "cgroup_error"


@dataclass(frozen=True)
class CpuHierarchy:
    """The cgroup hierarchy that carries the cpu controller, and where it is mounted."""

    version: CgroupVersion
    mount: Path


def parse_mountinfo(text: str) -> list[tuple[Path, str, str]]:
    """(mount point, filesystem type, super options) of every line of a mountinfo file."""
    mounts = []
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append((Path(_unescape(fields[4])), tail[0], tail[2]))
    return mounts


def find_cpu_hierarchy(mountinfo: str) -> CpuHierarchy | None:
    """cgroup v2 when its cpu controller is available, else the v1 cpu hierarchy, else None."""
    mounts = parse_mountinfo(mountinfo)
    for mount, filesystem, _ in mounts:
        if filesystem == "cgroup2" and "cpu" in _read_words(mount / "cgroup.controllers"):
            return CpuHierarchy(CgroupVersion.V2, mount)
    for mount, filesystem, options in mounts:
        if filesystem == "cgroup" and "cpu" in options.split(","):
            return CpuHierarchy(CgroupVersion.V1, mount)
    return None


def weight_to_shares(weight: int) -> int:
    return min(max(round(weight * _SHARES_PER_WEIGHT), _MIN_SHARES), _MAX_SHARES)


def shares_to_weight(shares: int) -> int:
    return min(max(round(shares / _SHARES_PER_WEIGHT), MIN_WEIGHT), MAX_WEIGHT)


class CpuWeights:
    """The CPU weights of this agent's VMs, in `<hierarchy>/nubes-<prefix>/<vm id>`."""

    def __init__(self, prefix: str, *, mountinfo: Path = _MOUNTINFO) -> None:
        if not prefix.isascii() or not prefix.isalnum():
            raise ValueError(f"agent prefix {prefix!r} is not alphanumeric")
        self.prefix = prefix
        self._mountinfo = mountinfo
        self._hierarchy: CpuHierarchy | None = None
        self._detected = False

    def available(self) -> CgroupVersion | None:
        """Which cgroup version sets CPU weights on this host; None when neither can."""
        hierarchy = self._find()
        return None if hierarchy is None else hierarchy.version

    def apply(self, vm_id: str, pid: int, weight: int) -> int | None:
        """Puts every thread of `pid` in the VM's group at `weight` (clamped to 1..10000).

        Returns the weight the kernel holds now, or None when no cgroup can do it here.

        Raises:
            CgroupError: the kernel refused (the process is gone, no permission...).
        """
        hierarchy = self._find()
        if hierarchy is None:
            return None
        weight = min(max(weight, MIN_WEIGHT), MAX_WEIGHT)
        group = self._group(hierarchy, vm_id)
        try:
            if hierarchy.version is CgroupVersion.V2:
                _enable_cpu_controller(hierarchy.mount)
                _make_group(group.parent)
                _enable_cpu_controller(group.parent)
                _make_group(group)
                _write(group / "cpu.weight", weight)
            else:
                _make_group(group.parent)
                _make_group(group)
                _write(group / "cpu.shares", weight_to_shares(weight))
            # cgroup.procs moves the whole process, every thread of it.
            _write(group / "cgroup.procs", pid)
        except CgroupError as error:
            with suppress(OSError):
                group.rmdir()  # only if empty: the kernel keeps a group that holds a process
            raise CgroupError(f"cannot set the CPU weight of {vm_id}: {error}") from error
        return self.read(vm_id)

    def read(self, vm_id: str) -> int | None:
        """The VM's weight as the kernel holds it; None when it has no group."""
        hierarchy = self._find()
        if hierarchy is None:
            return None
        group = self._group(hierarchy, vm_id)
        try:
            if hierarchy.version is CgroupVersion.V2:
                return int((group / "cpu.weight").read_text())
            return shares_to_weight(int((group / "cpu.shares").read_text()))
        except FileNotFoundError:
            return None

    def remove(self, vm_id: str) -> None:
        """Removes the VM's group once its QEMU has exited; nothing to do if it is gone.

        Raises:
            CgroupError: a live process is still in the group.
        """
        hierarchy = self._find()
        if hierarchy is None:
            return
        group = self._group(hierarchy, vm_id)
        try:
            group.rmdir()
        except FileNotFoundError:
            return
        except OSError as error:
            reason = "a process still runs in it" if error.errno == errno.EBUSY else error.strerror
            raise CgroupError(f"cannot remove cgroup {group}: {reason}") from error

    def orphans(self, known_vm_ids: Iterable[str]) -> list[str]:
        """The VM ids that have a group here but are not in `known_vm_ids`."""
        hierarchy = self._find()
        if hierarchy is None:
            return []
        known = set(known_vm_ids)
        try:
            children = [entry.name for entry in self._root(hierarchy).iterdir() if entry.is_dir()]
        except FileNotFoundError:
            return []
        return sorted(name for name in children if name not in known)

    def remove_root(self) -> None:
        """Removes this prefix's parent group once it has no VM groups left (best effort)."""
        hierarchy = self._find()
        if hierarchy is None:
            return
        with suppress(OSError):
            self._root(hierarchy).rmdir()

    def _find(self) -> CpuHierarchy | None:
        if not self._detected:
            try:
                mountinfo = self._mountinfo.read_text()
            except OSError:
                mountinfo = ""
            self._hierarchy = find_cpu_hierarchy(mountinfo)
            self._detected = True
        return self._hierarchy

    def _root(self, hierarchy: CpuHierarchy) -> Path:
        return hierarchy.mount / f"nubes-{self.prefix}"

    def _group(self, hierarchy: CpuHierarchy, vm_id: str) -> Path:
        # A validated id cannot climb out of the group with '/' or '..'.
        return self._root(hierarchy) / validate_id(vm_id, IdKind.VM)


def _enable_cpu_controller(group: Path) -> None:
    """cgroup v2 hands the cpu controller to a group's children only when asked."""
    if "cpu" not in _read_words(group / "cgroup.subtree_control"):
        _write(group / "cgroup.subtree_control", "+cpu")


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _make_group(group: Path) -> None:
    try:
        group.mkdir(exist_ok=True)
    except OSError as error:
        raise CgroupError(f"{group}: {error.strerror}") from error


def _write(path: Path, value: int | str) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as error:
        raise CgroupError(f"{path}: {error.strerror}") from error


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field
