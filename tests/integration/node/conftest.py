"""A throwaway machine for `nubes up`: its own state directory, agent prefix, API port,
external bridge and range (inside 198.18.0.0/15), and CLI session, so it can run next to
other tests and never touches a real node or the real user's login.

On the way out it stops the node and removes everything with the lab's prefix: QEMU,
dnsmasq, namespaces, links, the external bridge, cgroups and the directory, even when
the test failed (and prints the node's log then).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest

from nubes.agent.compute.cgroup import CgroupError, CpuWeights
from nubes.agent.compute.process import scan_qemu_processes
from nubes.cli.background import NodeFiles, is_node_process, read_pid
from tests.support.agent_lab import TEST_FAILED, list_netns_names
from tests.support.processes import stop_fencer

NUBES = str(Path(sys.executable).parent / "nubes")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NodeLab:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="nb-node-", dir="/tmp"))
        self.prefix = "t" + secrets.token_hex(2)
        self.state_dir = self.directory / "state"
        self.run_dir = self.directory / "run"
        self.files = NodeFiles(self.state_dir)
        self.port = free_port()
        self.metrics_port = free_port()
        self.bridge = f"{self.prefix}ext"
        # A /28 somewhere in 198.18.128.0/17: labs running at once do not collide.
        third, fourth = 128 + secrets.randbelow(128), 16 * secrets.randbelow(16)
        self.external_cidr = IPv4Network(f"198.18.{third}.{fourth}/28")
        self.config_path = self.directory / "nubes.toml"
        self.config_path.write_text("# the lab's settings come from the environment\n")
        self.url = f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUBES_")}
        env.update(
            NUBES_CONFIG=str(self.config_path),
            NUBES_STATE_DIR=str(self.state_dir),
            NUBES_AGENT__RUN_DIR=str(self.run_dir),
            NUBES_AGENT__HOST=f"{self.prefix}-host",
            NUBES_AGENT__PREFIX=self.prefix,
            NUBES_AGENT__ACCEL="tcg",
            NUBES_AGENT__RESYNC_INTERVAL="5",
            NUBES_AGENT__METRICS_PORT=str(self.metrics_port),  # labs run side by side
            XDG_CONFIG_HOME=str(self.directory / "xdg"),
        )
        return env

    def nubes(
        self, *arguments: str, timeout: float = 300.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs the nubes CLI as a person would, against the lab's node."""
        return subprocess.run(
            [NUBES, *arguments],
            env={**self.environment(), **(env or {})},
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def up(self, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """`nubes up` with the lab's port, bridge and range; its JSON summary."""
        completed = self.nubes(
            "up",
            "--accel",
            "tcg",
            "--port",
            str(self.port),
            "--external-bridge",
            self.bridge,
            "--external-cidr",
            str(self.external_cidr),
            "-o",
            "json",
            *extra,
            env=env,
        )
        assert completed.returncode == 0, f"nubes up failed:\n{completed.stderr}"
        summary: dict[str, Any] = json.loads(completed.stdout)
        return summary

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def node_pid(self) -> int | None:
        pid = read_pid(self.files.pidfile)
        return pid if pid is not None and is_node_process(pid, self.files.pidfile) else None

    def session(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            (self.directory / "xdg" / "nubes" / "session.json").read_text()
        )
        return document

    def log_text(self) -> str:
        try:
            return self.files.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- cleanup ---------------------------------------------------------------------------

    def close(self) -> None:
        """Undoes everything, each step even when an earlier one failed."""
        try:
            self._stop_node()
        finally:
            stop_fencer(self.state_dir / "agent", self.run_dir)
            try:
                for pid in scan_qemu_processes(self.prefix).values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                for pid in self.dnsmasq_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self._remove_links_and_namespaces()
                self._remove_cgroups()
            finally:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _stop_node(self) -> None:
        pid = self.node_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.node_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.node_pid() is not None:
            os.kill(pid, signal.SIGKILL)

    def dnsmasq_pids(self) -> list[int]:
        pids = []
        for pidfile in self.run_dir.glob("vpcs/*/*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"dnsmasq" in cmdline and str(self.run_dir).encode() in cmdline:
                    pids.append(pid)
        return pids

    def namespaces(self) -> list[str]:
        return [name for name in list_netns_names() if name.startswith(f"{self.prefix}-")]

    def links(self) -> list[str]:
        """Host links named with the lab's prefix (the external bridge among them)."""
        return [name for name in os.listdir("/sys/class/net") if name.startswith(self.prefix)]

    def _remove_links_and_namespaces(self) -> None:
        for name in self.namespaces():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for name in self.links():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)

    def _remove_cgroups(self) -> None:
        cgroups = CpuWeights(self.prefix)
        deadline = time.monotonic() + 10
        while True:
            left = []
            for vm_id in cgroups.orphans(set()):
                try:
                    cgroups.remove(vm_id)
                except CgroupError:
                    left.append(vm_id)
            if not left or time.monotonic() > deadline:
                cgroups.remove_root()
                return
            time.sleep(0.2)


@pytest.fixture
def node_lab(request: pytest.FixtureRequest) -> Iterator[NodeLab]:
    lab = NodeLab()
    try:
        yield lab
    finally:
        if request.node.stash.get(TEST_FAILED, False):
            sys.stderr.write(f"--- node log ({lab.files.log}) ---\n{lab.log_text()[-8000:]}\n")
        lab.close()
