"""QEMU processes seen from the host: launching them daemonized, and finding, judging and
signalling them later through /proc, by pidfile and by the nubes marker in their `-name`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from nubes.agent.compute.qemu_cmdline import parse_marker
from nubes.errors import CommandFailed, QemuError
from nubes.process import run_tool_async

_PROC = Path("/proc")
_POLL_INTERVAL = 0.02
# `-msg timestamp=on` puts one of these before every line QEMU reports.
_MESSAGE_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z ", re.MULTILINE)


class ProcessState(StrEnum):
    RUNNING = "running"  # any state but zombie: running, sleeping, stopped, exiting...
    ZOMBIE = "zombie"  # every thread has exited, not yet reaped: as good as gone
    GONE = "gone"


def process_state(pid: int) -> ProcessState:
    """What /proc says about a process.

    A killed process's main thread turns zombie while its other threads may still be
    ending (for a few ms; they hold its cgroup, for one): it is ZOMBIE only once they
    have ended too.
    """
    state = _thread_state(_PROC / str(pid))
    if state is None or state in "Xx":
        return ProcessState.GONE
    if state != "Z":
        return ProcessState.RUNNING
    try:
        threads = list((_PROC / str(pid) / "task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return ProcessState.GONE
    if any(_thread_state(thread) not in (None, "Z", "X", "x") for thread in threads):
        return ProcessState.RUNNING
    return ProcessState.ZOMBIE


def _thread_state(directory: Path) -> str | None:
    """The state letter of /proc/<pid> or /proc/<pid>/task/<tid>; None when it is gone."""
    try:
        stat = (directory / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ")".
    fields = stat.rpartition(")")[2].split(maxsplit=1)
    return fields[0] if fields else None


def read_cmdline(pid: int) -> list[str] | None:
    """The argv of a process; None when it is gone (a zombie's argv is empty)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [argument.decode("utf-8", "surrogateescape") for argument in raw.split(b"\0")[:-1]]


def read_pidfile(path: Path) -> int | None:
    """The pid a pidfile names; None when it is missing, empty or not a positive number."""
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def marker_of(argv: Sequence[str]) -> tuple[str, str] | None:
    """(prefix, vm id) from the `-name` argument of an argv, if it carries a nubes marker."""
    for option, value in itertools.pairwise(argv):
        if option == "-name":
            return parse_marker(value)
    return None


def find_vm_process(pidfile: Path, prefix: str, vm_id: str) -> int | None:
    """The pid of VM `vm_id`'s QEMU from its pidfile, if that process lives and is ours.

    A pid from a stale pidfile may since have been given to another process: only one
    whose `-name` carries this VM's marker counts.
    """
    pid = read_pidfile(pidfile)
    if pid is None or process_state(pid) is not ProcessState.RUNNING:
        return None
    argv = read_cmdline(pid)
    if argv is None or marker_of(argv) != (prefix, vm_id):
        return None
    return pid


def scan_qemu_processes(prefix: str) -> dict[str, int]:
    """vm id -> pid of every live process in /proc that carries a nubes marker with `prefix`.

    Two processes claiming one VM should not happen; the lower pid is reported then.
    """
    found: dict[str, int] = {}
    pids = sorted(int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit())
    for pid in pids:
        argv = read_cmdline(pid)
        marker = marker_of(argv) if argv else None
        if marker is None or marker[0] != prefix or marker[1] in found:
            continue
        if process_state(pid) is ProcessState.RUNNING:
            found[marker[1]] = pid
    return found


def signal_process(pid: int, sig: signal.Signals) -> bool:
    """Sends `sig` to `pid`; False when the process is already gone (or only a zombie)."""
    if process_state(pid) is not ProcessState.RUNNING:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


async def wait_exited(pid: int, timeout: float) -> bool:
    """Whether `pid` has exited (a zombie counts) within `timeout` seconds.

    A daemonized QEMU is PID 1's child, so it may stay a zombie for a while: /proc is
    polled rather than waited on.
    """
    deadline = time.monotonic() + timeout
    while process_state(pid) is ProcessState.RUNNING:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)
    return True


async def launch_qemu(
    argv: Sequence[str],
    *,
    pidfile: Path,
    netns: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Starts a QEMU whose argv ends in `-daemonize -pidfile <pidfile>`; returns its pid.

    QEMU's foreground process exits once the daemon is set up (its QMP socket listens),
    so its exit status says whether the VM started. With `netns`, QEMU runs inside that
    network namespace (where the VM's taps are).

    Raises:
        QemuError: QEMU failed to start (QEMU's own message), did not finish starting
            within `timeout` seconds, or a live QEMU already holds `pidfile`. Nothing of
            a failed start is left running.
        ToolMissing: QEMU (or `ip`) is not installed.
    """
    holder = _process_of(pidfile, argv)
    if holder is not None:
        raise QemuError(f"QEMU already runs with pidfile {pidfile} (pid {holder})")
    command = list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]
    try:
        async with asyncio.timeout(timeout):
            await run_tool_async(command)
    except CommandFailed as error:
        await _kill_half_started(pidfile, argv)
        raise QemuError(f"QEMU did not start: {_qemu_message(error.stderr)}") from error
    except TimeoutError as error:
        await _kill_half_started(pidfile, argv)
        raise QemuError(f"QEMU did not finish starting within {timeout} s") from error
    except BaseException:
        await _kill_half_started(pidfile, argv)
        raise
    pid = _process_of(pidfile, argv)
    if pid is None:
        raise QemuError(f"QEMU started but {pidfile} names no live QEMU of this command line")
    return pid


def _process_of(pidfile: Path, argv: Sequence[str]) -> int | None:
    """The live process the pidfile names, if it runs this very command line.

    argv[0] is left out: it may be resolved to a full path on the way.
    """
    pid = read_pidfile(pidfile)
    if pid is None or process_state(pid) is not ProcessState.RUNNING:
        return None
    running = read_cmdline(pid)
    return pid if running is not None and running[1:] == list(argv[1:]) else None


async def _kill_half_started(pidfile: Path, argv: Sequence[str]) -> None:
    """Kills a daemon that wrote its pidfile but did not finish starting, and its pidfile."""
    pid = _process_of(pidfile, argv)
    if pid is None:
        return
    signal_process(pid, signal.SIGKILL)
    await wait_exited(pid, 5.0)
    _remove_pidfile(pidfile, pid)


def _remove_pidfile(pidfile: Path, pid: int) -> None:
    """A killed QEMU cannot remove its pidfile itself."""
    if read_pidfile(pidfile) == pid:
        pidfile.unlink(missing_ok=True)


def _qemu_message(stderr: str) -> str:
    text = _MESSAGE_TIMESTAMP.sub("", stderr).strip()
    return text or "(no error output)"
