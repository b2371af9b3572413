"""Judging processes from /proc: state, argv, pidfiles and the nubes marker, against the
test's own children (a Python that sleeps, with a QEMU-like `-name` in its argv).
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nubes.agent.compute.process import (
    ProcessState,
    find_vm_process,
    marker_of,
    process_state,
    read_cmdline,
    read_pidfile,
    scan_qemu_processes,
    signal_process,
    wait_exited,
)
from nubes.agent.compute.qemu_cmdline import process_marker

VM_ID = "i-0123456789"
SLEEPER = "import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)"

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def prefix() -> str:
    """A prefix no other test run uses, so scans see only this test's children."""
    return "u" + secrets.token_hex(2)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts sleepers (extra argv items are visible in /proc); kills and reaps them after."""
    children: list[subprocess.Popen[bytes]] = []

    def start(*arguments: str, code: str = SLEEPER) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", code, *arguments], stdout=subprocess.PIPE)
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


def marked(prefix: str, vm_id: str = VM_ID) -> tuple[str, str]:
    return ("-name", f"guest={process_marker(prefix, vm_id)},debug-threads=on")


def become_zombie(child: subprocess.Popen[bytes]) -> None:
    """Kills a child without reaping it, and waits until /proc shows it as a zombie."""
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_state(child.pid) is not ProcessState.ZOMBIE:
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)


def write_pidfile(tmp_path: Path, pid: int) -> Path:
    pidfile = tmp_path / "qemu.pid"
    pidfile.write_text(f"{pid}\n")
    return pidfile


def test_a_live_process_is_running_a_killed_unreaped_one_a_zombie_a_reaped_one_gone(
    spawn: Spawn,
) -> None:
    child = spawn()
    assert process_state(child.pid) is ProcessState.RUNNING
    become_zombie(child)
    assert process_state(child.pid) is ProcessState.ZOMBIE
    child.wait()
    assert process_state(child.pid) is ProcessState.GONE


def test_a_process_whose_main_thread_ended_is_running_while_another_thread_lives(
    spawn: Spawn,
) -> None:
    # SYS_exit (60) ends only the calling thread: /proc/<pid>/stat then says Z.
    main_thread_exits = (
        "import ctypes, threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
        + SLEEPER.replace("time.sleep(60)", "ctypes.CDLL(None).syscall(60, 0)")
    )
    child = spawn(code=main_thread_exits)
    deadline = time.monotonic() + 5
    while "Z" not in Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2][:3]:
        assert time.monotonic() < deadline, "the main thread never ended"
        time.sleep(0.01)
    assert process_state(child.pid) is ProcessState.RUNNING
    become_zombie(child)


def test_a_command_name_with_spaces_and_parentheses_does_not_confuse_the_state(
    spawn: Spawn,
) -> None:
    renamed = "open('/proc/self/comm', 'w').write(') Z (x'); " + SLEEPER
    child = spawn(code=renamed)
    assert Path(f"/proc/{child.pid}/comm").read_text() == ") Z (x\n"
    assert process_state(child.pid) is ProcessState.RUNNING


def test_the_argv_of_a_process_is_read_whole_and_none_once_it_is_gone(spawn: Spawn) -> None:
    child = spawn("-name", "guest=with space,debug-threads=on", "")
    assert read_cmdline(child.pid) == [
        sys.executable, "-c", SLEEPER, "-name", "guest=with space,debug-threads=on", "",
    ]  # fmt: skip
    child.kill()
    child.wait()
    assert read_cmdline(child.pid) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [("1234\n", 1234), (" 42 ", 42), ("", None), ("abc", None), ("-5", None), ("0", None),
     ("12 34", None), ("١٢", None)],
)  # fmt: skip
def test_a_pidfile_gives_a_pid_only_when_it_holds_one(
    tmp_path: Path, content: str, expected: int | None
) -> None:
    pidfile = tmp_path / "qemu.pid"
    pidfile.write_text(content)
    assert read_pidfile(pidfile) == expected


def test_a_missing_unreadable_or_binary_pidfile_gives_no_pid(tmp_path: Path) -> None:
    assert read_pidfile(tmp_path / "missing.pid") is None
    assert read_pidfile(tmp_path) is None
    (tmp_path / "binary.pid").write_bytes(b"\xff\xfe12")
    assert read_pidfile(tmp_path / "binary.pid") is None


def test_the_vm_process_is_found_from_its_pidfile_when_it_carries_the_marker(
    spawn: Spawn, tmp_path: Path, prefix: str
) -> None:
    child = spawn(*marked(prefix))
    pidfile = write_pidfile(tmp_path, child.pid)
    assert find_vm_process(pidfile, prefix, VM_ID) == child.pid


def test_a_pidfile_naming_another_vm_or_another_agent_finds_nothing(
    spawn: Spawn, tmp_path: Path, prefix: str
) -> None:
    child = spawn(*marked(prefix))
    pidfile = write_pidfile(tmp_path, child.pid)
    assert find_vm_process(pidfile, prefix, "i-9999999999") is None
    assert find_vm_process(pidfile, prefix + "x", VM_ID) is None


def test_a_recycled_pid_without_the_marker_is_not_taken_for_the_vm(
    spawn: Spawn, tmp_path: Path, prefix: str
) -> None:
    stranger = spawn("-name", "guest=somebody-else")
    pidfile = write_pidfile(tmp_path, stranger.pid)
    assert find_vm_process(pidfile, prefix, VM_ID) is None


def test_a_dead_vm_process_is_not_found_zombie_or_gone(
    spawn: Spawn, tmp_path: Path, prefix: str
) -> None:
    child = spawn(*marked(prefix))
    pidfile = write_pidfile(tmp_path, child.pid)
    become_zombie(child)
    assert find_vm_process(pidfile, prefix, VM_ID) is None
    child.wait()
    assert find_vm_process(pidfile, prefix, VM_ID) is None
    assert find_vm_process(tmp_path / "missing.pid", prefix, VM_ID) is None


def test_a_scan_finds_the_live_marked_processes_of_one_prefix_only(
    spawn: Spawn, prefix: str
) -> None:
    first = spawn(*marked(prefix, "i-aaaaaaaaaa"))
    second = spawn(*marked(prefix, "i-bbbbbbbbbb"))
    spawn(*marked(prefix + "x", "i-cccccccccc"))
    spawn("-name", f"guest=not-nubes-{prefix}")
    dead = spawn(*marked(prefix, "i-dddddddddd"))
    become_zombie(dead)
    assert scan_qemu_processes(prefix) == {"i-aaaaaaaaaa": first.pid, "i-bbbbbbbbbb": second.pid}


def test_the_marker_is_read_from_the_name_option_only() -> None:
    assert marker_of(["qemu", *marked("nb")]) == ("nb", VM_ID)
    assert marker_of(["qemu", "-uuid", "guest=nubes:nb:i-0123456789"]) is None
    assert marker_of(["qemu", "-name"]) is None
    assert marker_of([]) is None


def test_a_signal_reaches_a_live_process_but_not_a_dead_one(spawn: Spawn) -> None:
    child = spawn()
    assert signal_process(child.pid, signal.SIGTERM)
    assert child.wait(5) == -signal.SIGTERM
    assert not signal_process(child.pid, signal.SIGTERM)


async def test_waiting_for_an_exit_counts_a_zombie_as_exited(spawn: Spawn) -> None:
    child = spawn()
    assert not await wait_exited(child.pid, 0.1)
    child.send_signal(signal.SIGKILL)
    started = time.monotonic()
    assert await wait_exited(child.pid, 5)
    assert time.monotonic() - started < 1
    assert process_state(child.pid) is ProcessState.ZOMBIE
