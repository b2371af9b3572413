"""`nubes up --first-vm`: a first VM to SSH into from this machine, made once: the key pair
`mine` from the user's SSH key, a group `ssh` letting SSH and ping in, and VM `first`
(tiny image) with a floating IP on the host-only external network.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nubes.client.client import Client
from nubes.errors import NubesError
from nubes.process import run_tool

FIRST_VM = "first"
KEYPAIR = "mine"
SSH_GROUP = "ssh"
_PUBLIC_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")
Json = dict[str, Any]


class FirstVmFailed(NubesError):
    """The first VM did not come up, or its SSH port did not answer in time."""

    code = "first_vm_failed"


@dataclass
class FirstVm:
    name: str
    address: str
    key: Path | None  # the private key that matches key pair `mine`, when nubes knows it
    made: list[str] = field(default_factory=list)

    def ssh_command(self) -> str:
        identity = f"-i {self.key} " if self.key is not None else ""
        return f"ssh {identity}root@{self.address}"


def find_or_make_ssh_key(home: Path) -> Path:
    """The user's public SSH key (ed25519, ecdsa or rsa); a new ed25519 key in
    `~/.ssh/id_ed25519` (no passphrase) when there is none.

    Raises:
        CommandFailed, ToolMissing: ssh-keygen failed or is missing.
    """
    directory = home / ".ssh"
    for name in _PUBLIC_KEYS:
        if (directory / name).is_file():
            return directory / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = directory / "id_ed25519"
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)])
    return directory / "id_ed25519.pub"


def ensure_first_vm(
    client: Client,
    *,
    home: Path,
    image: str,
    network: str,
    external: str,
    timeout: float,
    say: Callable[[str], None] | None = None,
) -> FirstVm:
    """Makes what is missing of the first VM and waits until its SSH port answers.

    Raises:
        FirstVmFailed: it went to error, or SSH did not answer within `timeout`.
        ApiError: the API refused a record.
    """
    made: list[str] = []
    key: Path | None = None
    if _find(client, "keypairs", KEYPAIR) is None:
        public = find_or_make_ssh_key(home)
        client.create_keypair(KEYPAIR, public.read_text().strip())
        made.append(f"key pair {KEYPAIR}")
        key = public.with_suffix("")
    else:
        key = _matching_private_key(client, home)
    if _find(client, "security-groups", SSH_GROUP) is None:
        group = client.create_security_group(SSH_GROUP, "SSH and ping from anywhere")
        client.add_rule(group["id"], direction="ingress", protocol="tcp", port_min=22, port_max=22)
        client.add_rule(group["id"], direction="ingress", protocol="icmp")
        made.append(f"security group {SSH_GROUP}")
    vm = _find(client, "vms", FIRST_VM)
    if vm is None:
        if say is not None:
            say(f"booting the first VM `{FIRST_VM}`")
        vm = client.create_vm(
            FIRST_VM,
            image=image,
            flavor="tiny",
            networks=[{"network": network}],
            key_names=[KEYPAIR],
            security_groups=["default", SSH_GROUP],
        )
        made.append(f"VM {FIRST_VM}")
    address = _floating_address(client, vm, external, made)
    client.wait_vm(vm["id"], "running", timeout)
    _wait_for_ssh(address, timeout)
    return FirstVm(FIRST_VM, address, key, made)


def _find(client: Client, collection: str, name: str) -> Json | None:
    page = client.call("GET", f"/{collection}", params={"name": name, "limit": 1000})
    for item in page["items"]:
        if item.get("name", item.get("spec", {}).get("name")) == name:
            return dict(item)
    return None


def _matching_private_key(client: Client, home: Path) -> Path | None:
    """The user's private key whose public half is key pair `mine`, if any."""
    keypair = client.call("GET", f"/keypairs/{KEYPAIR}")
    wanted = str(keypair.get("public_key", "")).split()[:2]
    for name in _PUBLIC_KEYS:
        public = home / ".ssh" / name
        if public.is_file() and public.read_text().split()[:2] == wanted:
            return public.with_suffix("")
    return None


def _floating_address(client: Client, vm: Json, external: str, made: list[str]) -> str:
    ports = list(vm.get("spec", {}).get("ports") or [])
    if not ports:
        raise FirstVmFailed(f"VM {FIRST_VM} has no port", hint="delete it and run `nubes up` again")
    page = client.call("GET", "/floating-ips", params={"limit": 1000})
    for fip in page["items"]:
        if fip.get("spec", {}).get("port") in ports:
            return str(fip["spec"]["address"])
    fip = client.create_floating_ip(external, port=ports[0])
    made.append("floating IP")
    return str(fip["spec"]["address"])


def _wait_for_ssh(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, 22), timeout=2) as connection:
                if connection.recv(4).startswith(b"SSH"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FirstVmFailed(
                f"VM {FIRST_VM} runs but SSH on {address} did not answer in {timeout:.0f} s",
                hint=f"see `nubes vm console-log {FIRST_VM}`",
            )
        time.sleep(1.0)
