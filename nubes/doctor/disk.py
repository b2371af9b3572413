"""The disk check: free space and writability of the directories nubes keeps data in
(state dir, image store, agent state, storage pools), one check per filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nubes.doctor.report import Check, fail, ok, warn

GIB = 1024**3
# A guest's overlay starts small, but images are hundreds of MiB and volumes grow.
WARN_FREE_BYTES = 5 * GIB
FAIL_FREE_BYTES = 1 * GIB


@dataclass(frozen=True)
class DirectoryProbe:
    """A data directory: the nearest existing ancestor (itself once made), its filesystem,
    the free bytes there, and whether nubes can write (or create) it."""

    path: Path
    existing: Path
    device: int
    free_bytes: int
    writable: bool


def probe_directory(path: Path) -> DirectoryProbe:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    stats = os.statvfs(existing)
    return DirectoryProbe(
        path=path,
        existing=existing,
        device=existing.stat().st_dev,
        free_bytes=stats.f_bavail * stats.f_frsize,
        writable=os.access(existing, os.W_OK | os.X_OK),
    )


def evaluate_disk(probes: Sequence[DirectoryProbe]) -> list[Check]:
    """One check per filesystem, named after its first directory."""
    by_device: dict[int, list[DirectoryProbe]] = {}
    for probe in probes:
        by_device.setdefault(probe.device, []).append(probe)
    groups = list(by_device.values())
    return [_filesystem_check(group, named=len(groups) > 1) for group in groups]


def _filesystem_check(group: list[DirectoryProbe], *, named: bool) -> Check:
    first = group[0]
    name = f"disk {first.path}" if named else "disk"
    others = [str(probe.path) for probe in group[1:]]
    where = f"{first.path}" + (f" (and {', '.join(others)})" if others else "")
    unwritable = [probe for probe in group if not probe.writable]
    if unwritable:
        shown = ", ".join(
            str(p.path) if p.path == p.existing else f"{p.path} (cannot create it in {p.existing})"
            for p in unwritable
        )
        return fail(name, f"not writable: {shown}", "run as root, or fix the directory's owner")
    free = f"{first.free_bytes / GIB:.1f} GiB free for {where}"
    if first.free_bytes < FAIL_FREE_BYTES:
        return fail(
            name,
            f"only {free}; nubes needs at least {FAIL_FREE_BYTES // GIB} GiB",
            "free space there, or move state_dir / [agent] state_dir to a larger disk",
        )
    if first.free_bytes < WARN_FREE_BYTES:
        return warn(
            name,
            f"only {free}; images and volumes soon fill it",
            f"keep at least {WARN_FREE_BYTES // GIB} GiB free there",
        )
    return ok(name, free)


def check_disk(directories: Sequence[Path]) -> list[Check]:
    return evaluate_disk([probe_directory(path) for path in directories])
