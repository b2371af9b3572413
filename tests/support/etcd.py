"""A real etcd for tests and benchmarks: one member or a cluster of three, on loopback free
ports, with their own data dirs, always stopped (by PID) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.processes import stop_process

ETCD_BINARY = "etcd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EtcdServer:
    """One etcd member on loopback, started by the test and stopped by it (by PID)."""

    def __init__(
        self, workdir: Path, name: str = "nubes-test", *, cluster: str | None = None
    ) -> None:
        """`cluster`: the --initial-cluster of a member of a cluster (None: a cluster of one)."""
        if shutil.which(ETCD_BINARY) is None:
            raise RuntimeError(
                "etcd is not installed: run scripts/setup (Debian package etcd-server)"
            )
        self.workdir = workdir
        self.name = name
        self.data_dir = workdir / f"{name}.etcd"
        self.log_path = workdir / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster = cluster

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        self.launch()
        self.wait_healthy(timeout)

    def launch(self) -> None:
        """Starts the process without waiting (a cluster's members must start together)."""
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = self.peer_url
        command = [
            ETCD_BINARY,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.cluster or f'{self.name}={peer_url}'}",
            "--initial-cluster-token=nubes-test",
            # Elections in about a second, as in a real cluster on a LAN.
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def wait_healthy(self, timeout: float = 20.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited at start; see {self.log_path}:\n{self._log_tail()}"
                )
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop our etcd (SIGTERM, then SIGKILL), by its PID only."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process)

    def restart(self) -> None:
        self.stop()
        self.start()

    def status(self) -> dict[str, object] | None:
        """The member's maintenance status (its id and the leader's), None if it does not answer."""
        url = f"http://127.0.0.1:{self.client_port}/v3/maintenance/status"
        request = urllib.request.Request(url, data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as response:  # noqa: S310 - http to our etcd
                document = json.loads(response.read())
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.client_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return b'"health":"true"' in response.read()
        except OSError:
            return False

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_etcd(workdir: Path) -> Iterator[EtcdServer]:
    """An etcd that lives for the block; its data dir is removed after."""
    workdir.mkdir(parents=True, exist_ok=True)
    with EtcdServer(workdir) as server:
        yield server
    with contextlib.suppress(OSError):
        os.unlink(server.log_path)


class EtcdCluster:
    """Three (or `size`) etcd members on loopback that form one cluster; stopped by PID."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        names = [f"member{index}" for index in range(size)]
        self.members = [EtcdServer(workdir, name) for name in names]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.cluster = cluster

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self, timeout: float = 30.0) -> None:
        for member in self.members:
            member.launch()
        for member in self.members:
            member.wait_healthy(timeout)

    def leader(self, timeout: float = 15.0) -> EtcdServer:
        """The member that leads now (waits for an election to end)."""
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                if not member.running:
                    continue
                status = member.status()
                if status is None:
                    continue
                header = status.get("header")
                leader = status.get("leader")
                if (
                    isinstance(header, dict)
                    and leader
                    and str(header.get("member_id")) == str(leader)
                ):
                    return member
            if time.monotonic() > deadline:
                raise RuntimeError(f"the etcd cluster elected no leader within {timeout} s")
            time.sleep(0.05)

    def kill(self, member: EtcdServer) -> None:
        """SIGKILL one member (by its PID), as a crashed machine would vanish."""
        process, member.process = member.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def restart(self, member: EtcdServer, timeout: float = 30.0) -> None:
        """Starts a stopped member again on its data dir; it rejoins the cluster."""
        member.stop()
        member.launch()
        member.wait_healthy(timeout)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        for member in self.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(member.log_path)
