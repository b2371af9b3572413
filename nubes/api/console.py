"""The tail of a VM's serial log, read on the host that runs it (the all-in-one node).

The path comes from the agent's own layout (`AgentPaths`), built from a validated VM id:
no request string ever becomes a path.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from nubes.agent.paths import AgentPaths
from nubes.config import NubesConfig

MAX_LINES = 10_000
# Serial logs grow without bound; never read more than this from their end.
MAX_TAIL_BYTES = 1024 * 1024


def serial_log_path(config: NubesConfig, vm_id: str) -> Path:
    """Where this machine's agent writes the serial log of `vm_id`.

    Raises:
        InvalidId: `vm_id` is not a VM id.
    """
    paths = AgentPaths(state_dir=config.agent_state_dir, run_dir=config.agent.run_dir)
    return paths.runtime(vm_id).serial_log


def _tail(path: Path, lines: int, max_bytes: int) -> tuple[list[str], bool]:
    try:
        # O_NOFOLLOW: the log is the agent's own file; a symlink there is not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], False
    with os.fdopen(fd, "rb") as log:
        size = os.fstat(log.fileno()).st_size
        start = max(0, size - max_bytes)
        log.seek(start)
        data = log.read(max_bytes)
    text = data.decode("utf-8", errors="replace")
    found = text.splitlines()
    cut = start > 0
    if cut and found:
        found = found[1:]  # the first line was cut by the byte limit
    truncated = cut or len(found) > lines
    return found[-lines:] if lines else [], truncated


async def read_tail(
    path: Path, lines: int, max_bytes: int = MAX_TAIL_BYTES
) -> tuple[list[str], bool]:
    """The last `lines` lines of the file (none when it does not exist yet), and whether
    there was more before them.

    Raises:
        OSError: the file exists but cannot be read.
    """
    return await asyncio.to_thread(_tail, path, lines, max_bytes)
