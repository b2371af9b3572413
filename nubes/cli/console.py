"""`nubes vm console`: the terminal joined to a VM's serial console socket on this host.

The socket path comes from the agent's layout (`AgentPaths`) and a validated VM id, never
from text a user typed. The terminal is raw while attached; Ctrl-] leaves.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nubes.errors import NubesError

ESCAPE = b"\x1d"  # Ctrl-], as telnet and virsh console use


class ConsoleUnavailable(NubesError):
    """The VM's serial console cannot be reached from here."""

    code = "console_unavailable"


def serial_socket_of(vm: dict[str, Any]) -> Path:
    """The serial socket of a VM (its API view) on this host.

    Raises:
        InvalidId: the id is not a VM id.
        ConsoleUnavailable: the VM is on another host or has no QEMU running here.
    """
    from nubes.agent.paths import AgentPaths
    from nubes.config import load_config
    from nubes.ids import IdKind, validate_id

    vm_id = validate_id(str(vm.get("id")), IdKind.VM)
    config = load_config()
    host = (vm.get("spec") or {}).get("host")
    if host is not None and host != config.agent.host:
        raise ConsoleUnavailable(
            f"VM {vm_id} runs on host {host}, not on this one ({config.agent.host})",
            hint=f"run `nubes vm console {vm_id}` on {host}",
        )
    paths = AgentPaths(state_dir=config.agent_state_dir, run_dir=config.agent.run_dir)
    path = paths.runtime(vm_id).serial_socket
    if not path.exists():
        raise ConsoleUnavailable(
            f"VM {vm_id} has no serial console on this host ({path} is missing)",
            hint="start it (`nubes vm start`) and check it runs (`nubes vm show`); "
            "`nubes vm console-log` shows what it printed",
        )
    return path


def attach_serial(path: Path) -> None:
    """Joins stdin/stdout to the unix socket at `path` until Ctrl-] or the socket closes.

    Raises:
        ConsoleUnavailable: the socket refuses the connection.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError as error:
        connection.close()
        raise ConsoleUnavailable(
            f"cannot connect to the serial console at {path}: {error.strerror}",
            hint="run as root (or the agent's user), and check the VM runs",
        ) from None
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with connection, _raw(stdin), selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ)
        selector.register(stdin, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is connection:
                    data = connection.recv(65536)
                    if not data:
                        return
                    os.write(stdout, data)
                    continue
                typed = os.read(stdin, 4096)
                if not typed:
                    selector.unregister(stdin)  # stdin ended: keep showing the console
                    continue
                if ESCAPE in typed:
                    connection.sendall(typed.split(ESCAPE, 1)[0])
                    return
                connection.sendall(typed)


@contextlib.contextmanager
def _raw(descriptor: int) -> Iterator[None]:
    """The terminal in raw mode while attached, restored after (even on error)."""
    if not os.isatty(descriptor):
        yield
        return
    saved = termios.tcgetattr(descriptor)
    try:
        tty.setraw(descriptor)
        yield
    finally:
        termios.tcsetattr(descriptor, termios.TCSADRAIN, saved)
