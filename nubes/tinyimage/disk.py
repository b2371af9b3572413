"""The qcow2 root disk: an ext4 filesystem made from a directory, no loop mount, no root.

The filesystem's UUID, hash seed, timestamps and features are fixed so the same tree
always gives the same bytes; files are owned by root whoever runs the build.
"""

from __future__ import annotations

import os
from pathlib import Path

from nubes.process import run_tool

MIB = 1 << 20


def normalizing_commands(paths: list[str], epoch: int) -> str:
    """debugfs commands that give every inode of PATHS root ownership and ctime EPOCH.

    mkfs.ext4 -d copies the owner and the ctime (which no one can set) of the source files.
    """
    lines = []
    for inside in sorted(paths):
        lines += [
            f'sif "{inside}" uid 0',
            f'sif "{inside}" gid 0',
            f'sif "{inside}" ctime @{epoch}',
        ]
    return "\n".join(lines) + "\n"


def tree_paths(tree: Path) -> list[str]:
    """Every path in TREE as seen from the root of the filesystem made from it."""
    paths = ["/", "/lost+found"]
    for current, directories, files in os.walk(tree):
        for name in [*directories, *files]:
            paths.append("/" + (Path(current) / name).relative_to(tree).as_posix())
    return paths


def make_ext4(
    tree: Path,
    raw: Path,
    *,
    size_mib: int,
    uuid: str,
    label: str,
    epoch: int,
    mke2fs_config: Path,
) -> None:
    """Makes RAW an ext4 filesystem of SIZE_MIB holding a copy of TREE."""
    env = {
        **os.environ,
        "MKE2FS_CONFIG": str(mke2fs_config),
        "E2FSPROGS_FAKE_TIME": str(epoch),
        "SOURCE_DATE_EPOCH": str(epoch),
        "LC_ALL": "C",
    }
    with raw.open("wb") as stream:
        stream.truncate(size_mib * MIB)
    run_tool(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-T",
            "default",
            "-L",
            label,
            "-U",
            uuid,
            "-E",
            f"hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(tree),
            str(raw),
        ],
        env=env,
    )
    commands = raw.with_suffix(".debugfs")
    commands.write_text(normalizing_commands(tree_paths(tree), epoch))
    run_tool(["debugfs", "-w", "-f", str(commands), str(raw)], env=env)
    commands.unlink()
    run_tool(["e2fsck", "-f", "-n", str(raw)], env=env)


def convert_to_qcow2(raw: Path, qcow2: Path) -> int:
    """Writes RAW as a compressed qcow2 (zero blocks left out); returns its virtual size."""
    run_tool(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(qcow2)])
    return raw.stat().st_size
