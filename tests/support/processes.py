"""Ending the processes a test started: by their PID, politely first."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaps the child either way."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def stop_fencer(state_dir: Path, run_dir: Path) -> None:
    """SIGKILLs the fencer an agent of the lab started (it outlives the agent by design),
    found by its pidfile and checked by its command line; it would end by itself soon."""
    from nubes.agent.fence import running_fencer
    from nubes.agent.paths import AgentPaths

    pid = running_fencer(AgentPaths(state_dir=state_dir, run_dir=run_dir))
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
