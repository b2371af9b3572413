"""The node `nubes up` runs in the background: its files, settings, host-only external
bridge, start and stop.

The node is `python -m nubes.cli.node --pidfile <state_dir>/node.pid ...` in its own
session; a pid counts as the node only if /proc shows that argv with this pidfile.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from nubes.config import Accel, NubesConfig
from nubes.errors import ConfigError, InvalidInput, NubesError
from nubes.process import run_tool

NODE_MODULE = "nubes.cli.node"
PHYSICAL_NETWORK = "external"
DEFAULT_EXTERNAL_BRIDGE = "nubes-ext0"
DEFAULT_EXTERNAL_CIDR = "198.18.0.0/24"
# Benchmark space (RFC 2544): never routed on the internet, so a host-only bridge here
# cannot shadow a real network the machine reaches.
HOST_ONLY_RANGE = IPv4Network("198.18.0.0/15")
_BRIDGE_NAME = r"[a-z][a-z0-9-]{0,14}"
_LOG_ROTATE_BYTES = 16 << 20
_PROC = Path("/proc")


class NodeNotStopping(NubesError):
    """The node did not end after SIGTERM and SIGKILL."""

    code = "node_not_stopping"


class NodeAlreadyRunning(NubesError):
    """Another node already runs with this pidfile."""

    code = "node_already_running"


@dataclass(frozen=True)
class NodeFiles:
    """What `nubes up` keeps in the state directory."""

    state_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "node.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / "node.log"

    @property
    def settings(self) -> Path:
        return self.state_dir / "node.json"

    @property
    def credentials(self) -> Path:
        return self.state_dir / "admin-credentials.json"


@dataclass(frozen=True)
class NodeSettings:
    """How `nubes up` runs the node; kept in node.json so the next `up` runs it the same."""

    port: int
    accel: Accel | None
    external_bridge: str
    external_cidr: IPv4Network

    @classmethod
    def choose(
        cls,
        files: NodeFiles,
        config: NubesConfig,
        *,
        accel: Accel | None = None,
        port: int | None = None,
        external_bridge: str | None = None,
        external_cidr: str | None = None,
    ) -> NodeSettings:
        """The options given, else the previous `up`'s, else the defaults.

        Raises:
            InvalidInput: the bridge name or the external range is not acceptable.
        """
        previous = _read_json(files.settings)
        chosen_accel = accel or previous.get("accel")
        previous_port = previous.get("port")
        cidr = external_cidr or previous.get("external_cidr") or DEFAULT_EXTERNAL_CIDR
        bridge = external_bridge or previous.get("external_bridge") or DEFAULT_EXTERNAL_BRIDGE
        return cls(
            port=port if port is not None else _int_or(previous_port, config.api.port),
            accel=Accel(str(chosen_accel)) if chosen_accel else None,
            external_bridge=_bridge_name(str(bridge)),
            external_cidr=_host_only_network(str(cidr)),
        )

    @property
    def bridge_address(self) -> IPv4Interface:
        """The host's address on the external bridge: the external network's gateway."""
        return IPv4Interface(
            f"{self.external_cidr.network_address + 1}/{self.external_cidr.prefixlen}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "port": self.port,
            "accel": self.accel.value if self.accel else None,
            "external_bridge": self.external_bridge,
            "external_cidr": str(self.external_cidr),
        }

    def save(self, files: NodeFiles) -> None:
        _write_atomically(files.settings, json.dumps(self.to_json(), indent=2) + "\n", 0o644)


def _int_or(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _bridge_name(name: str) -> str:
    if not re.fullmatch(_BRIDGE_NAME, name):
        raise InvalidInput(
            f"{name!r} is not a bridge name nubes makes",
            hint="use 1-15 lowercase letters, digits and '-', starting with a letter",
        )
    return name


def _host_only_network(cidr: str) -> IPv4Network:
    try:
        network = IPv4Network(cidr)
    except ValueError as error:
        raise InvalidInput(
            f"{cidr!r} is not an IPv4 network: {error}", hint="give one like 198.18.0.0/24"
        ) from None
    if not network.subnet_of(HOST_ONLY_RANGE) or network.prefixlen > 29:
        raise InvalidInput(
            f"{cidr} is not a /29 or larger inside {HOST_ONLY_RANGE}",
            hint="the external network of `nubes up` is host-only and lives in 198.18.0.0/15",
        )
    return network


# -- the host-only external bridge ---------------------------------------------------------


def ensure_external_bridge(name: str, address: IPv4Interface) -> None:
    """Host bridge `name` exists, is up and carries `address`, and never forwards: traffic
    from floating IPs reaches this host only, never its uplink.

    Raises:
        CommandFailed: `ip` refused (not root, or `name` is another kind of link).
        ToolMissing: iproute2 is not installed.
        ConfigError: `name` exists and is not a bridge.
    """
    shown = json.loads(run_tool(["ip", "-j", "-d", "link", "show"]) or "[]")
    link = next((entry for entry in shown if entry.get("ifname") == name), None)
    if link is None:
        run_tool(["ip", "link", "add", name, "type", "bridge"])
    elif link.get("linkinfo", {}).get("info_kind") != "bridge":
        raise ConfigError(
            f"{name} exists on this host and is not a bridge",
            hint="name another external bridge with `nubes up --external-bridge NAME`",
        )
    # Packets that arrive on the bridge are never routed on (the uplink included), and
    # the bridge takes no IPv6 address: floating IPs are reachable from this host only.
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{name}/forwarding", "0")
    _write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
    run_tool(["ip", "address", "replace", str(address), "dev", name])
    run_tool(["ip", "link", "set", name, "up"])


def _write_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as error:
        raise ConfigError(
            f"cannot write {path}: {error.strerror}", hint="run `nubes up` as root"
        ) from None


# -- the node process ----------------------------------------------------------------------


def node_argv(files: NodeFiles, settings: NodeSettings) -> list[str]:
    """The node's command line: no shell, this Python, this nubes."""
    argv = [
        sys.executable,
        "-m",
        NODE_MODULE,
        "--pidfile",
        str(files.pidfile),
        "--port",
        str(settings.port),
        "--external-bridge",
        f"{PHYSICAL_NETWORK}={settings.external_bridge}",
    ]
    if settings.accel is not None:
        argv += ["--accel", settings.accel.value]
    return argv


def start_node(files: NodeFiles, settings: NodeSettings) -> subprocess.Popen[bytes]:
    """Starts the node detached (own session, stdin closed, output to node.log).

    Raises:
        ConfigError: the state directory or the log cannot be written.
    """
    environment = dict(os.environ)
    if "NUBES_CONFIG" in environment:  # the node runs in the state directory
        environment["NUBES_CONFIG"] = str(Path(environment["NUBES_CONFIG"]).absolute())
    try:
        files.state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if files.log.stat().st_size > _LOG_ROTATE_BYTES:
                files.log.replace(files.log.with_name(files.log.name + ".1"))
        with files.log.open("ab") as log:
            log.write(f"--- nubes up: starting the node at {time.ctime()} ---\n".encode())
            log.flush()
            return subprocess.Popen(
                node_argv(files, settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=files.state_dir,
                env=environment,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as error:
        raise ConfigError(
            f"cannot start the node in {files.state_dir}: {error.strerror}",
            hint="check that the state directory (NUBES_STATE_DIR or state_dir) is writable",
        ) from None


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def is_node_process(pid: int, pidfile: Path) -> bool:
    """Whether `pid` is alive and is the node that keeps `pidfile` (from its argv)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
        stat = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"]):
        return False
    argv = [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0")[:-1]]
    return NODE_MODULE in argv and _follows(argv, "--pidfile", str(pidfile))


def _follows(argv: list[str], option: str, value: str) -> bool:
    return any(a == option and b == value for a, b in itertools.pairwise(argv))


def running_node_pid(files: NodeFiles) -> int | None:
    """The pid of the node running for this state directory, or None."""
    pid = read_pid(files.pidfile)
    return pid if pid is not None and is_node_process(pid, files.pidfile) else None


def claim_pidfile(pidfile: Path) -> None:
    """Writes this process's pid to `pidfile`, unless another live node holds it.

    Raises:
        NodeAlreadyRunning: a node with this pidfile is alive.
        ConfigError: the pidfile cannot be written.
    """
    holder = read_pid(pidfile)
    if holder is not None and holder != os.getpid() and is_node_process(holder, pidfile):
        raise NodeAlreadyRunning(
            f"a node already runs with pidfile {pidfile} (pid {holder})",
            hint="stop it with `nubes down` first",
        )
    try:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(pidfile, f"{os.getpid()}\n", 0o644)
    except OSError as error:
        raise ConfigError(f"cannot write the pidfile {pidfile}: {error.strerror}") from None


def release_pidfile(pidfile: Path) -> None:
    """Removes `pidfile` if it still names this process."""
    if read_pid(pidfile) == os.getpid():
        pidfile.unlink(missing_ok=True)


def stop_node(files: NodeFiles, pid: int, *, timeout: float) -> None:
    """SIGTERM, wait up to `timeout`; SIGKILL if it is still there (VMs are not its
    children, so they live on either way).

    Raises:
        NodeNotStopping: the process survived SIGKILL too.
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not is_node_process(pid, files.pidfile):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while is_node_process(pid, files.pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)
    if is_node_process(pid, files.pidfile):
        raise NodeNotStopping(
            f"the node (pid {pid}) does not stop", hint=f"see its log {files.log}"
        )
    if read_pid(files.pidfile) == pid:
        files.pidfile.unlink(missing_ok=True)


def log_tail(files: NodeFiles, lines: int = 20) -> str:
    """The last lines of the node's log, for error messages."""
    try:
        with files.log.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 16384))
            text = log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _read_json(path: Path) -> dict[str, object]:
    try:
        document = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _write_atomically(path: Path, text: str, mode: int) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
