"""A throwaway lab that boots the tiny image for tests and benchmarks: needs root.

It makes its own network namespace with a tap, a real dnsmasq (static lease by MAC,
IPv6 router advertisements), optionally a metadata responder on 169.254.169.254:80
(Python's http.server over a directory) and a NoCloud seed ISO, boots QEMU (TCG) on
a qcow2 overlay, reads the guest's serial lines and, when asked, speaks QMP to QEMU.
Everything it starts or makes is undone on exit, in reverse order, even when a step fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from nubes.tinyimage.manifest import Manifest
from tests.support.processes import stop_process

GATEWAY_IPV4 = "198.18.0.1"
GUEST_IPV4 = "198.18.0.10"
PREFIX_LENGTH = 24
IPV6_PREFIX = "2001:db8:6e75::"
METADATA_ADDRESS = "169.254.169.254"
GUEST_MAC = "52:54:00:6e:75:0a"
TAP = "tap0"
SERIAL_PREFIX = "nubes-guest: "


class GuestTimeout(AssertionError):
    """The guest did not print the awaited serial line, or QEMU did not exit, in time."""


class QmpError(AssertionError):
    """QEMU answered a QMP command with an error, or broke the protocol."""


@dataclass(frozen=True)
class SerialLine:
    seconds: float  # since QEMU was started
    text: str


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs a setup command; with CHECK, a failure raises with the command's stderr."""
    completed = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr}")
    return completed


class SerialConsole:
    """Collects a guest's serial lines from QEMU's stdout, stamped from QEMU's start."""

    def __init__(self, process: subprocess.Popen[bytes], started: float, log: Path) -> None:
        self._process = process
        self._started = started
        self._log = log
        self._lines: list[SerialLine] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        with self._log.open("w") as log:
            for raw in self._process.stdout:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.write(text + "\n")
                log.flush()
                with self._changed:
                    self._lines.append(SerialLine(time.monotonic() - self._started, text))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def lines(self) -> list[SerialLine]:
        with self._changed:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(line.text for line in self.lines())

    def wait_for(
        self, event: str, timeout: float, *, after: SerialLine | None = None
    ) -> SerialLine:
        """The first `nubes-guest: EVENT ...` line (after AFTER, when given).

        Raises GuestTimeout when none comes in time.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                start = 0 if after is None else self._lines.index(after) + 1
                for line in self._lines[start:]:
                    words = line.text.removeprefix(SERIAL_PREFIX).split()
                    if line.text.startswith(SERIAL_PREFIX) and words[:1] == [event]:
                        return line
                    if line.text.startswith(SERIAL_PREFIX + "boot-failed"):
                        raise GuestTimeout(f"guest failed to boot: {line.text}")
                remaining = deadline - time.monotonic()
                qemu_gone = self._process.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or qemu_gone:
                    raise GuestTimeout(
                        f"no '{event}' line from the guest within {timeout} s; console:\n"
                        + "\n".join(line.text for line in self._lines[-40:])
                    )
                self._changed.wait(min(remaining, 0.5))

    def event_arguments(self, event: str, timeout: float) -> list[str]:
        return self.wait_for(event, timeout).text.removeprefix(SERIAL_PREFIX).split()[1:]

    def wait_for_exit(self, timeout: float) -> int:
        """QEMU's exit status once it has exited by itself; GuestTimeout if it still runs."""
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(
                f"QEMU still runs {timeout} s later; console:\n"
                + "\n".join(line.text for line in self.lines()[-40:])
            ) from None


class QmpConnection:
    """A small synchronous QMP client: capabilities negotiated, commands, events kept.

    QEMU's greeting is read on connect, so a QEMU that does not speak QMP fails here.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        self._socket.connect(str(path))
        self._stream = self._socket.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._receive()
        if greeting is None or "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self._stream.close()
        self._socket.close()

    def _receive(self) -> dict[str, Any] | None:
        """The next message, or None once QEMU has closed the connection."""
        line = self._stream.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Runs COMMAND and returns its result; events that come meanwhile are kept.

        Raises QmpError when QEMU answers with an error or closes the connection.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        self._socket.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._receive()
            if message is None:
                raise QmpError(f"QEMU closed the QMP connection during {command}")
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpError(f"{command}: {message['error']}")
            elif "return" in message:
                return message["return"]

    def wait_for_event(self, event: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first EVENT whose data has the DATA items (kept or still to come).

        Raises GuestTimeout when none comes in time (the connection is unusable then:
        a timed-out buffered reader cannot be trusted) and QmpError when QEMU closes it.
        """

        def matches(message: dict[str, Any]) -> bool:
            found = message.get("data", {})
            return message["event"] == event and all(
                found.get(key) == value for key, value in data.items()
            )

        for kept in self.events:
            if matches(kept):
                return kept
        deadline = time.monotonic() + timeout
        previous_timeout = self._socket.gettimeout()
        try:
            while True:
                self._socket.settimeout(max(deadline - time.monotonic(), 0.001))
                message = self._receive()
                if message is None:
                    raise QmpError(f"QEMU closed the QMP connection before {event}")
                if "event" in message:
                    self.events.append(message)
                    if matches(message):
                        return message
        except TimeoutError:
            raise GuestTimeout(f"no QMP event {event} {data} within {timeout} s") from None
        finally:
            self._socket.settimeout(previous_timeout)

    def events_until_closed(self, timeout: float) -> list[dict[str, Any]]:
        """Every event, once QEMU has closed the connection (it closes it when it exits).

        Raises GuestTimeout when QEMU keeps the connection open longer than TIMEOUT.
        """
        # One timeout for the whole wait: after a timeout the buffered reader is unusable.
        self._socket.settimeout(timeout)
        try:
            while (message := self._receive()) is not None:
                if "event" in message:
                    self.events.append(message)
        except TimeoutError:
            raise GuestTimeout(f"QEMU kept its QMP connection open for {timeout} s") from None
        return self.events


class GuestLab:
    """A network namespace with a tap, dnsmasq and (optionally) a metadata responder."""

    def __init__(self, manifest: Manifest, image_directory: Path) -> None:
        self.manifest = manifest
        self.image_directory = image_directory
        self.namespace = f"nubes-tiny-{os.getpid()}-{secrets.token_hex(3)}"
        self._stack = ExitStack()
        self.workdir = Path("/")
        self.ssh_key = Path("/")

    def __enter__(self) -> GuestLab:
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _setup(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="nubes-tiny-"))
        self._stack.callback(shutil.rmtree, self.workdir, True)
        _run(["ip", "netns", "add", self.namespace])
        self._stack.callback(_run, ["ip", "netns", "delete", self.namespace], check=False)
        for command in (
            ["link", "set", "lo", "up"],
            ["tuntap", "add", "dev", TAP, "mode", "tap"],
            ["addr", "add", f"{GATEWAY_IPV4}/{PREFIX_LENGTH}", "dev", TAP],
            ["addr", "add", f"{IPV6_PREFIX}1/64", "dev", TAP, "nodad"],
            ["link", "set", TAP, "up"],
        ):
            _run(["ip", "-n", self.namespace, *command])
        self.ssh_key = self.workdir / "id_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_key)])

    @property
    def public_key(self) -> str:
        return self.ssh_key.with_suffix(".pub").read_text().strip()

    def in_namespace(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def _spawn(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            process = subprocess.Popen(
                self.in_namespace(argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._stack.callback(stop_process, process, 5.0)
        return process

    def start_dnsmasq(self) -> None:
        """Static lease for the guest's MAC, route 169.254.169.254 via us, SLAAC for v6."""
        self._spawn(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--port=0",
                "--user=root",
                "--bind-interfaces",
                f"--interface={TAP}",
                "--except-interface=lo",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                f"--dhcp-leasefile={self.workdir / 'dnsmasq.leases'}",
                f"--dhcp-range={GATEWAY_IPV4.rsplit('.', 1)[0]}.0,static,255.255.255.0,1h",
                f"--dhcp-host={GUEST_MAC},{GUEST_IPV4}",
                f"--dhcp-option=121,{METADATA_ADDRESS}/32,{GATEWAY_IPV4},0.0.0.0/0,{GATEWAY_IPV4}",
                "--enable-ra",
                f"--dhcp-range={IPV6_PREFIX},ra-only,64,1h",
                "--log-dhcp",
            ],
            self.workdir / "dnsmasq.log",
        )

    def start_metadata_responder(self, documents: Mapping[str, str]) -> None:
        """Serves DOCUMENTS (URL path -> body) on 169.254.169.254:80; other paths are 404."""
        root = self.workdir / "metadata"
        for url_path, body in documents.items():
            # A directory listing (a path ending in /) is served as its index.html.
            relative = url_path.strip("/") + ("/index.html" if url_path.endswith("/") else "")
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
        root.mkdir(exist_ok=True)
        _run(["ip", "-n", self.namespace, "addr", "add", f"{METADATA_ADDRESS}/32", "dev", "lo"])
        self._spawn(
            [
                sys.executable,
                "-m",
                "http.server",
                "80",
                "--bind",
                METADATA_ADDRESS,
                "--directory",
                str(root),
            ],
            self.workdir / "metadata.log",
        )
        self._wait_listening(METADATA_ADDRESS, 80)

    def _wait_listening(self, address: str, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        probe = self.in_namespace(
            [
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('{address}', {port}), 1)",
            ]
        )
        while _run(probe, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {address}:{port} in {self.namespace}")
            time.sleep(0.1)

    def make_seed_iso(self, meta_data: str, user_data: str | None) -> Path:
        """A NoCloud seed: an ISO 9660 volume labelled cidata with meta-data (and user-data)."""
        seed = self.workdir / "seed"
        seed.mkdir()
        (seed / "meta-data").write_text(meta_data)
        if user_data is not None:
            (seed / "user-data").write_text(user_data)
        iso = self.workdir / "seed.iso"
        _run(
            [
                "xorriso",
                "-as",
                "mkisofs",
                "-quiet",
                "-o",
                str(iso),
                "-V",
                "cidata",
                "-J",
                "-r",
                str(seed),
            ]
        )
        return iso

    def boot(
        self,
        *,
        seed_iso: Path | None = None,
        machine: str = "q35",
        memory_mib: int = 256,
        cpu: str = "max",
        extra_cmdline: str = "",
        qmp: bool = False,
        exit_on_reboot: bool = True,
        nic: bool = True,
        extra_qemu_args: Sequence[str] = (),
    ) -> SerialConsole:
        """Starts QEMU (TCG) on a fresh overlay of the image's disk, NIC on the tap.

        Without NIC the guest has no network card at all. EXTRA_QEMU_ARGS go last on
        QEMU's command line (hotplug ports, say). With QMP, QEMU listens for QMP on
        `qmp_socket` (connect with `connect_qmp`). With EXIT_ON_REBOOT (`-no-reboot`), a
        guest reboot or panic ends QEMU; without it, a reboot boots the guest again on
        the same overlay.
        """
        overlay = self.overlay
        _run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                str(self.image_directory / self.manifest.disk.path),
                str(overlay),
            ]
        )
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-machine", machine,
            "-cpu", cpu,
            "-m", str(memory_mib),
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-serial", "stdio",
            "-kernel", str(self.image_directory / self.manifest.kernel.path),
            "-initrd", str(self.image_directory / self.manifest.initrd.path),
            "-append", f"{self.manifest.cmdline} {extra_cmdline}".strip(),
            "-drive", f"file={overlay},if=virtio,format=qcow2",
        ]  # fmt: skip
        if nic:
            argv += [
                "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net0,mac={GUEST_MAC}",
            ]  # fmt: skip
        if seed_iso is not None:
            argv += ["-drive", f"file={seed_iso},if=virtio,format=raw,readonly=on"]
        if exit_on_reboot:
            argv += ["-no-reboot"]
        with ExitStack() as parent_side:
            passed: tuple[int, ...] = ()
            if qmp:
                # We bind and listen, QEMU inherits the socket: it is there before QEMU runs.
                listener = parent_side.enter_context(
                    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                )
                self.qmp_socket.unlink(missing_ok=True)
                listener.bind(str(self.qmp_socket))
                listener.listen()
                passed = (listener.fileno(),)
                argv += [
                    "-chardev", f"socket,id=qmp,fd={listener.fileno()},server=on,wait=off",
                    "-mon", "chardev=qmp,mode=control",
                ]  # fmt: skip
            argv += extra_qemu_args
            started = time.monotonic()
            process = subprocess.Popen(
                self.in_namespace(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=passed,
            )
        self._stack.callback(stop_process, process, 5.0)
        return SerialConsole(process, started, self.workdir / "console.log")

    @property
    def overlay(self) -> Path:
        """The guest's root disk: a qcow2 overlay on the image's disk."""
        return self.workdir / "overlay.qcow2"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    def connect_qmp(self) -> QmpConnection:
        """A QMP connection to the QEMU booted with `qmp=True`, closed when the lab closes."""
        connection = QmpConnection(self.qmp_socket)
        self._stack.callback(connection.close)
        return connection

    def root_filesystem_copy(self) -> Path:
        """A raw copy of the overlay (the guest's ext4 root filesystem), once QEMU is gone."""
        raw = self.workdir / "root.ext4"
        _run(["qemu-img", "convert", "-O", "raw", str(self.overlay), str(raw)])
        return raw

    def ssh(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Runs COMMAND in the guest as root over SSH, from inside the namespace."""
        return subprocess.run(
            self.in_namespace(
                [
                    "ssh",
                    "-i", str(self.ssh_key),
                    "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=ERROR",
                    "-o", "ConnectTimeout=10",
                    f"root@{GUEST_IPV4}",
                    command,
                ]
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )  # fmt: skip
