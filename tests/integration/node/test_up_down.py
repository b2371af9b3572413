"""`nubes up` and `nubes down` as a person runs them: a node in the background, the default
cloud made once, harmless repeats, and data that outlives the node."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from nubes.cli.background import is_node_process
from nubes.store.sqlite import SqliteStore
from nubes.tinyimage.builder import default_cache_directory
from tests.integration.node.conftest import NodeLab


def records(lab: NodeLab) -> dict[str, list[dict[str, Any]]]:
    """Every spec record in the lab's store, by kind."""

    async def read() -> dict[str, list[dict[str, Any]]]:
        store = await SqliteStore.open(lab.state_dir / "nubes.db")
        try:
            found: dict[str, list[dict[str, Any]]] = {}
            for kv in (await store.range("/nubes/")).kvs:
                parts = kv.key.split("/")
                if len(parts) == 4 and isinstance(kv.value, dict):
                    found.setdefault(parts[2], []).append(kv.value)
            return found
        finally:
            await store.close()

    return asyncio.run(read())


def names(items: list[dict[str, Any]]) -> Counter[str]:
    return Counter(str(item.get("spec", item).get("name")) for item in items)


def bridge_addresses(name: str) -> list[str]:
    completed = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "dev", name], capture_output=True, text=True, check=True
    )
    shown = json.loads(completed.stdout or "[]")
    return [f"{a['local']}/{a['prefixlen']}" for link in shown for a in link["addr_info"]]


def test_up_makes_the_default_cloud_once_and_down_keeps_it(node_lab: NodeLab) -> None:
    first = node_lab.up()
    assert first["started"] is True
    assert first["url"] == node_lab.url
    pid = first["pid"]
    assert node_lab.node_pid() == pid
    assert node_lab.healthy()

    credentials = node_lab.files.credentials
    mode = credentials.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o600
    assert mode.st_uid == os.getuid()
    secret = credentials.read_bytes()
    assert json.loads(secret)["user"] == "admin"
    session = node_lab.session()
    assert session["url"] == node_lab.url
    assert session["user"] == "admin"
    assert session["token"].startswith("nbt_")

    # The host side: the external bridge with the external network's gateway, never forwarding.
    gateway = f"{node_lab.external_cidr.network_address + 1}/{node_lab.external_cidr.prefixlen}"
    assert bridge_addresses(node_lab.bridge) == [gateway]
    forwarding = Path(f"/proc/sys/net/ipv4/conf/{node_lab.bridge}/forwarding")
    assert forwarding.read_text().strip() == "0"

    second = node_lab.up()
    assert second["started"] is False
    assert second["pid"] == pid
    assert second["made"] == []
    assert credentials.read_bytes() == secret

    made = records(node_lab)
    assert names(made["projects"]) == {"default": 1}
    assert names(made["users"]) == {"admin": 1}
    assert names(made["flavors"]) == {"tiny": 1, "small": 1, "medium": 1, "large": 1}
    assert names(made["images"]) == {"tiny": 1}
    assert made["images"][0]["public"] is True
    assert names(made["networks"]) == {"default": 1, "public": 1}
    assert names(made["subnets"]) == {"default": 1}
    assert names(made["security-groups"])["default"] == 1
    group = next(g for g in made["security-groups"] if g["spec"]["name"] == "default")
    rules = {(rule["direction"], rule.get("remote_group")) for rule in group["spec"]["rules"]}
    assert ("ingress", group["id"]) in rules  # members reach each other, as the API's default
    networks = {item["spec"]["name"]: item for item in made["networks"]}
    external = networks["public"]["spec"]["external"]
    assert external["cidr"] == str(node_lab.external_cidr)
    assert external["gateway"] == gateway.split("/")[0]
    assert networks["default"]["spec"]["gateway"]["network"] == networks["public"]["id"]
    assert made["subnets"][0]["spec"]["network"] == networks["default"]["id"]
    assert made["subnets"][0]["spec"]["cidr"] == "10.0.0.0/24"

    stopped = node_lab.nubes("down")
    assert stopped.returncode == 0, stopped.stderr
    assert node_lab.node_pid() is None
    assert not is_node_process(pid, node_lab.files.pidfile)
    assert not node_lab.files.pidfile.exists()
    assert not node_lab.healthy()
    again = node_lab.nubes("down")
    assert again.returncode == 0
    assert "no node is running" in again.stdout

    third = node_lab.up()
    assert third["started"] is True
    assert third["pid"] != pid
    assert third["made"] == []
    assert credentials.read_bytes() == secret
    kept = records(node_lab)
    for kind in ("networks", "subnets", "images", "security-groups"):
        assert sorted(item["id"] for item in kept[kind]) == sorted(
            item["id"] for item in made[kind]
        )


def test_up_shows_the_log_when_the_node_cannot_start(node_lab: NodeLab) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node_lab.port))
        taken.listen(1)
        completed = node_lab.nubes(
            "up",
            "--port",
            str(node_lab.port),
            "--external-bridge",
            node_lab.bridge,
            "--external-cidr",
            str(node_lab.external_cidr),
            timeout=120,
        )
    assert completed.returncode != 0
    assert "exited" in completed.stderr
    assert f"cannot listen on 127.0.0.1 port {node_lab.port}" in completed.stderr
    assert node_lab.node_pid() is None
    assert not node_lab.files.credentials.exists()


def test_up_refuses_an_external_range_outside_the_host_only_space(node_lab: NodeLab) -> None:
    completed = node_lab.nubes(
        "up", "--port", str(node_lab.port), "--external-cidr", "192.168.77.0/24"
    )
    assert completed.returncode == 2
    assert "198.18.0.0/15" in completed.stderr
    assert node_lab.node_pid() is None
    assert node_lab.links() == []


def test_up_with_first_vm_boots_a_vm_this_machine_can_ssh_into(node_lab: NodeLab) -> None:
    home = node_lab.directory / "home"
    home.mkdir()
    # A user without an SSH key; the tiny image's build cache stays the real one.
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(default_cache_directory().parents[2])}
    summary = node_lab.up("--first-vm", env=env)
    first = summary["first_vm"]
    key = home / ".ssh" / "id_ed25519"
    assert first["key"] == str(key)
    assert first["made"] == ["key pair mine", "security group ssh", "VM first", "floating IP"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first["address"] in {str(a) for a in node_lab.external_cidr.hosts()}

    # From this machine (through the external bridge), with the key nubes made.
    login = subprocess.run(
        ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-i", str(key),
         f"root@{first['address']}", "hostname"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == "first"

    again = node_lab.up("--first-vm", env=env)
    assert again["made"] == []
    assert again["first_vm"]["made"] == []
    assert again["first_vm"]["address"] == first["address"]
    made = records(node_lab)
    assert names(made["vms"]) == {"first": 1}
    assert len(made["floating-ips"]) == 1
