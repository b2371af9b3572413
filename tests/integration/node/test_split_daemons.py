"""The three daemons as separate processes on one SQLite store (`nubes api`, `nubes
scheduler`, `nubes agent`), as the split systemd units run them: a VM made through the
API is placed and started, and each daemon stops cleanly on SIGTERM, the VM living on."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from nubes.agent.compute.process import ProcessState, process_state, scan_qemu_processes
from nubes.api.bootstrap import DEFAULT_PROJECT, ensure_flavors, ensure_project, ensure_user
from nubes.model.project import Role
from nubes.store.sqlite import SqliteStore
from nubes.tinyimage.builder import build_tiny_image, default_cache_directory
from tests.integration.node.conftest import NUBES, NodeLab

PASSWORD = secrets.token_urlsafe(12)


async def bootstrap(lab: NodeLab) -> None:
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    store = await SqliteStore.open(lab.state_dir / "nubes.db")
    try:
        await ensure_project(store, DEFAULT_PROJECT)
        await ensure_flavors(store)
        await ensure_user(store, "admin", PASSWORD, role=Role.ADMIN, projects=[DEFAULT_PROJECT])
    finally:
        await store.close()


@contextmanager
def daemons(lab: NodeLab) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, argv in (
            ("api", ["api", "--port", str(lab.port)]),
            ("scheduler", ["scheduler"]),
            ("agent", ["agent"]),
        ):
            with (lab.directory / f"{name}.log").open("ab") as log:
                started[name] = subprocess.Popen(
                    [NUBES, *argv], env=lab.environment(), stdout=log, stderr=subprocess.STDOUT
                )
        yield started
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


def cli(lab: NodeLab, *arguments: str, stdin: str | None = None) -> object:
    completed = subprocess.run(
        [NUBES, *arguments, "-o", "json"],
        env=lab.environment(),
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert completed.returncode == 0, f"nubes {' '.join(arguments)}:\n{completed.stderr}"
    return json.loads(completed.stdout) if completed.stdout.strip() else None


def test_api_scheduler_and_agent_as_three_processes_run_a_vm(node_lab: NodeLab) -> None:
    lab = node_lab
    asyncio.run(bootstrap(lab))
    built = build_tiny_image(default_cache_directory())
    manifest = built.manifest
    with daemons(lab) as processes:
        deadline = time.monotonic() + 60
        while not lab.healthy():
            assert processes["api"].poll() is None, (lab.directory / "api.log").read_text()
            assert time.monotonic() < deadline, "the API did not answer"
            time.sleep(0.2)
        cli(lab, "login", "--url", lab.url, "--user", "admin", "--password-stdin", stdin=PASSWORD)
        cli(
            lab, "image", "upload", str(built.directory / manifest.disk.path), "--name", "tiny",
            "--kernel", str(built.directory / manifest.kernel.path),
            "--initrd", str(built.directory / manifest.initrd.path),
            "--cmdline", manifest.cmdline,
        )  # fmt: skip
        vm = cli(lab, "vm", "create", "solo", "--image", "tiny", "--flavor", "tiny", "--wait")
        assert isinstance(vm, dict)
        assert vm["status"]["state"] == "running"
        assert vm["status"]["host"] == f"{lab.prefix}-host"
        qemu = scan_qemu_processes(lab.prefix)
        assert list(qemu) == [vm["id"]]

        for name in ("api", "scheduler", "agent"):
            processes[name].send_signal(signal.SIGTERM)
            assert processes[name].wait(30) == 0, (lab.directory / f"{name}.log").read_text()
        assert process_state(qemu[vm["id"]]) is ProcessState.RUNNING
        try:
            httpx.get(f"{lab.url}/v1/health", timeout=2)
            raise AssertionError("the API still answers after SIGTERM")
        except httpx.TransportError:
            pass
