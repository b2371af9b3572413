"""Killing the etcd leader while 200 VMs are created through the API: every VM ends
running, none is made twice (one record per name, one QEMU per VM across the hosts)
and none is lost. The guests halt at once, so 200 of them fit on this machine."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nubes.api.bootstrap import DEFAULT_PROJECT, ensure_project, ensure_user
from nubes.client import Client
from nubes.client.errors import ApiUnreachable
from nubes.model.common import now
from nubes.model.project import FlavorRecord, Quota, Role
from nubes.store.keys import Kind, kind_prefix, resource_key
from tests.support.cluster_lab import ClusterLab
from tests.support.etcd import EtcdServer
from tests.support.halt_image import register_halt_image
from tests.support.processes import stop_process

NUBES = str(Path(sys.executable).parent / "nubes")
CREATIONS = 200
PACE = 0.1  # seconds between two creations
KILL_AT = 100  # the creation after which the leader dies
RESTART_AT = 160  # and after which it comes back
PASSWORD = secrets.token_urlsafe(12)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def bootstrap(lab: ClusterLab) -> str:
    """The admin, an unlimited project, the `halt` flavor and image; returns the image id."""
    unlimited = Quota(vms=-1, vcpus=-1, memory_mb=-1)
    await ensure_project(lab.db, DEFAULT_PROJECT, quota=unlimited)
    await ensure_user(lab.db, "admin", PASSWORD, role=Role.ADMIN, projects=[DEFAULT_PROJECT])
    flavor = FlavorRecord(name="halt", vcpus=1, memory_mb=32, disk_gb=0, created_at=now())
    await lab.db.put(resource_key(Kind.FLAVOR, "halt"), flavor.to_json())
    image = await register_halt_image(lab.db, lab.shared_state / "images", lab.directory / "halt")
    return image.id


def start_api(lab: ClusterLab, port: int) -> subprocess.Popen[bytes]:
    with (lab.directory / "api.log").open("ab") as log:
        return subprocess.Popen(
            [NUBES, "api", "--port", str(port)],
            env=lab.environment(lab.hosts[0]),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_api(client: Client, api: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert api.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            client.health()
            return
        except ApiUnreachable:
            assert time.monotonic() < deadline, "the API did not answer in 60 s"
            time.sleep(0.2)


class Creator:
    """Creates the VMs at a steady pace from a thread; kills and restarts the leader."""

    def __init__(self, lab: ClusterLab, client: Client, image: str) -> None:
        self.lab = lab
        self.image = image
        self.client = client
        self.created: dict[str, str] = {}  # name -> id the API answered
        self.errors: list[str] = []
        self.killed: EtcdServer | None = None
        self.slowest = 0.0

    def run(self) -> None:
        start = time.monotonic()
        for index in range(CREATIONS):
            name = f"vm-{index:03d}"
            began = time.monotonic()
            try:
                answer: dict[str, Any] = self.client.create_vm(
                    name, image=self.image, flavor="halt"
                )
                self.created[name] = str(answer["id"])
            except Exception as error:
                self.errors.append(f"{name}: {error!r}")
            self.slowest = max(self.slowest, time.monotonic() - began)
            if index == KILL_AT:
                self.killed = self.lab.etcd.leader()
                self.lab.etcd.kill(self.killed)
            if index == RESTART_AT and self.killed is not None:
                self.lab.etcd.restart(self.killed)
            time.sleep(max(0.0, start + (index + 1) * PACE - time.monotonic()))


async def test_every_vm_runs_once_when_the_etcd_leader_dies_during_200_creations() -> None:
    began = time.monotonic()
    async with ClusterLab(
        hosts=3,
        scheduler=True,
        scheduler_settings="cpu_overcommit = 64.0\n",  # 2 cores x 64 x 3 hosts > 200
        resync_interval=10.0,
    ) as lab:
        image = await bootstrap(lab)
        port = free_port()
        api = start_api(lab, port)
        client = Client(f"http://127.0.0.1:{port}", timeout=60)
        try:
            await asyncio.to_thread(wait_api, client, api, lab.directory / "api.log")
            await asyncio.to_thread(client.login, "admin", PASSWORD)
            ready = time.monotonic()
            creator = Creator(lab, client, image)
            thread = threading.Thread(target=creator.run)
            thread.start()
            await asyncio.to_thread(thread.join)
            created = time.monotonic()
            assert creator.killed is not None
            assert not creator.errors, "\n".join(creator.errors)

            running = await wait_all_running(lab, set(creator.created.values()), timeout=150)
            finished = time.monotonic()
            records = await lab.db.range(kind_prefix(Kind.VM))
            vms = [kv.value for kv in records.kvs if "/" not in kv.key[len(kind_prefix(Kind.VM)) :]]
            names = Counter(vm["spec"]["name"] for vm in vms)
            assert len(vms) == CREATIONS
            assert max(names.values()) == 1, names.most_common(3)
            assert {vm["id"] for vm in vms} == set(creator.created.values())
            assert running == set(creator.created.values())
            qemus: Counter[str] = Counter()
            for host in lab.hosts:
                qemus.update(lab.qemu_pids(host).keys())
            assert set(qemus) == set(creator.created.values()), "a VM runs nowhere, or unknown"
            assert max(qemus.values()) == 1, qemus.most_common(3)
            print(
                f"\n200 creations in {created - ready:.1f} s (slowest answer"
                f" {creator.slowest:.2f} s, leader {creator.killed.name} killed after"
                f" {KILL_AT + 1}); all running {finished - ready:.1f} s after the first;"
                f" whole test {time.monotonic() - began:.1f} s"
            )
        finally:
            client.close()
            stop_process(api)


async def wait_all_running(lab: ClusterLab, ids: set[str], timeout: float) -> set[str]:
    """The VMs whose status says running, once all of them do (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await lab.db.range(kind_prefix(Kind.VM))
        running = {
            kv.key.split("/")[-2]
            for kv in statuses.kvs
            if kv.key.endswith("/status") and kv.value.get("state") == "running"
        }
        if ids <= running or time.monotonic() > deadline:
            return running
        await asyncio.sleep(2)
