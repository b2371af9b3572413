"""`nubes up`: start the all-in-one node if needed, then make the default cloud, idempotently.

The first records (project, admin user, flavors) go straight into the store (there is no
one to log in as before them); the rest goes through the API as the admin, each made
only when missing, so running `nubes up` again changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nubes.api.bootstrap import DEFAULT_PROJECT, ensure_flavors, ensure_project, ensure_user
from nubes.cli.background import (
    PHYSICAL_NETWORK,
    NodeFiles,
    NodeSettings,
    ensure_external_bridge,
    log_tail,
    running_node_pid,
    start_node,
)
from nubes.cli.first_vm import FirstVm, ensure_first_vm
from nubes.client.client import Client
from nubes.client.errors import ApiError
from nubes.client.session import save_session
from nubes.config import NubesConfig
from nubes.errors import ConfigError, NubesError
from nubes.model.project import Role
from nubes.store import open_store
from nubes.store.keys import host_alive_key

ADMIN_USER = "admin"
DEFAULT_NETWORK = "default"
DEFAULT_SUBNET = "default"
DEFAULT_SUBNET_CIDR = "10.0.0.0/24"
EXTERNAL_NETWORK = "public"
DEFAULT_SECURITY_GROUP = "default"
TINY_IMAGE = "tiny"
Say = Callable[[str], None] | None
Json = dict[str, Any]


class NodeStartFailed(NubesError):
    """The node exited, or did not answer, while `nubes up` waited for it."""

    code = "node_start_failed"


class NeedsRoot(NubesError):
    """`nubes up` was run by a normal user."""

    code = "needs_root"
    exit_code = 4


@dataclass
class Summary:
    url: str
    pid: int | None  # None: a node `nubes up` did not start (systemd)
    started: bool
    credentials: Path
    session: Path
    log: Path
    made: list[str] = field(default_factory=list)
    first_vm: FirstVm | None = None

    def to_json(self) -> dict[str, Any]:
        first = self.first_vm
        return {
            "first_vm": None
            if first is None
            else {
                "name": first.name,
                "address": first.address,
                "key": str(first.key or ""),
                "made": first.made,
            },
            "url": self.url,
            "pid": self.pid,
            "started": self.started,
            "credentials": str(self.credentials),
            "session": str(self.session),
            "log": str(self.log),
            "made": self.made,
        }

    def text(self) -> str:
        if self.first_vm is not None:
            return self._text_with_first_vm(self.first_vm)
        state = "started" if self.started else "already running"
        if self.pid is not None:
            state += f", node pid {self.pid}"
        made = ", ".join(self.made) if self.made else "nothing new (everything was there)"
        return "\n".join(
            [
                f"nubes is up at {self.url} ({state})",
                f"made: {made}",
                f"admin credentials: {self.credentials} (readable by you only)",
                f"logged in as {ADMIN_USER}; session saved in {self.session}",
                f"node log: {self.log}",
                "",
                "try next:",
                "  ssh-keygen -t ed25519 -N '' -f ~/.ssh/nubes",
                "  nubes keypair create mine --public-key-file ~/.ssh/nubes.pub",
                "  nubes security-group rule add default --protocol tcp --port 22",
                f"  nubes vm create web1 --image {TINY_IMAGE} --flavor tiny "
                f"--network {DEFAULT_NETWORK} --key mine --floating-ip {EXTERNAL_NETWORK} --wait",
                "  nubes vm list    # then: ssh -i ~/.ssh/nubes root@<its floating IP>",
                "stop the node with `nubes down` (VMs keep running).",
            ]
        )

    def _text_with_first_vm(self, first: FirstVm) -> str:
        made = ", ".join(self.made + first.made) or "nothing new (everything was there)"
        return "\n".join(
            [
                f"nubes is up at {self.url}",
                f"made: {made}",
                f"admin credentials: {self.credentials} (readable by you only)",
                f"node log: {self.log}",
                "",
                f"your first VM `{first.name}` is running; log in with:",
                f"  {first.ssh_command()}",
                "then try: nubes vm list, nubes vm show first, nubes vm stop first",
            ]
        )


def bring_up(
    config: NubesConfig,
    settings: NodeSettings,
    *,
    timeout: float,
    say: Say = None,
    first_vm: bool = False,
) -> Summary:
    """Starts the node unless it runs, then makes whatever default record is missing.

    Raises:
        NeedsRoot: not run as root.
        NodeStartFailed: the node died or did not answer within `timeout`.
        ApiError: the API refused a default record (the message says why).
        CommandFailed, ToolMissing: the external bridge cannot be made (needs root).
        ConfigError: the state directory or the credentials are unusable.
    """
    if os.geteuid() != 0:
        raise NeedsRoot(
            "nubes up needs root: it makes a bridge and runs the host agent "
            "(network namespaces, nftables, QEMU)",
            hint="run it as root, e.g. `sudo .venv/bin/nubes up`",
        )
    files = NodeFiles(config.state_dir)
    files.state_dir.mkdir(parents=True, exist_ok=True)
    pid = running_node_pid(files)
    if pid is not None:
        running = NodeSettings.choose(files, config)
        if running != settings:
            _say(say, "the node runs with its earlier settings; `nubes down` first to change them")
        settings = running
    ensure_external_bridge(settings.external_bridge, settings.bridge_address)
    url = _local_url(config, settings.port)
    verify = _verify(config)
    started = False
    if pid is not None:
        _say(say, f"the node is already running (pid {pid})")
        wait_for_api(url, verify, None, files, timeout=timeout)
    elif _answers(url, verify):
        # A node this command did not start (systemd's nubes.service): only bootstrap.
        _say(say, f"a nubes API already answers at {url} (not started by `nubes up`)")
    else:
        _say(say, f"starting the node (log: {files.log})")
        process = start_node(files, settings)
        settings.save(files)
        wait_for_api(url, verify, process, files, timeout=timeout)
        pid, started = process.pid, True
    made: list[str] = []
    credentials = ensure_credentials(files.credentials)
    made += asyncio.run(_store_bootstrap(config, credentials["password"], timeout))
    with Client(url, verify=verify, timeout=60) as client:
        token = client.login(ADMIN_USER, credentials["password"], project=DEFAULT_PROJECT)
        login = client.last_login or {}
        made += DefaultCloud(client, settings, say).ensure()
        first = None
        if first_vm:
            first = ensure_first_vm(
                client,
                home=Path.home(),
                image=TINY_IMAGE,
                network=DEFAULT_NETWORK,
                external=EXTERNAL_NETWORK,
                timeout=max(timeout, 300.0),
                say=say,
            )
    session = save_session(
        url, token, ADMIN_USER, str(login.get("project")), str(login.get("expires_at"))
    )
    return Summary(url, pid, started, files.credentials, session, files.log, made, first)


def _say(say: Say, line: str) -> None:
    if say is not None:
        say(line)


def _local_url(config: NubesConfig, port: int) -> str:
    scheme = "https" if config.api.tls_cert else "http"
    host = config.api.listen
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _verify(config: NubesConfig) -> bool | str:
    # The node's own certificate is the one to trust for a local call.
    return str(config.api.tls_cert) if config.api.tls_cert else True


def wait_for_api(
    url: str,
    verify: bool | str,
    process: subprocess.Popen[bytes] | None,
    files: NodeFiles,
    *,
    timeout: float,
) -> None:
    """Polls /v1/health until it answers.

    Raises:
        NodeStartFailed: the process ended, or nothing answered within `timeout`.
    """
    deadline = time.monotonic() + timeout
    context: bool | ssl.SSLContext = verify if isinstance(verify, bool) else _trusting(verify)
    with httpx.Client(timeout=2.0, verify=context) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise NodeStartFailed(
                    f"the node exited with status {process.returncode} while starting; "
                    f"the end of its log ({files.log}):\n{log_tail(files)}",
                    hint="fix what the log says, then run `nubes up` again",
                )
            try:
                if client.get(f"{url}/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise NodeStartFailed(
                    f"the API did not answer at {url} within {timeout:.0f} s; "
                    f"the end of the node's log ({files.log}):\n{log_tail(files)}",
                    hint="see the log; `nubes down` stops a node that hangs",
                )
            time.sleep(0.2)


def _answers(url: str, verify: bool | str) -> bool:
    context: bool | ssl.SSLContext = verify if isinstance(verify, bool) else _trusting(verify)
    try:
        return httpx.get(f"{url}/v1/health", timeout=2.0, verify=context).status_code == 200
    except httpx.HTTPError:
        return False


def _trusting(certificate: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certificate)
    context.check_hostname = False  # the certificate names the machine, we call loopback
    return context


# -- the host side: external bridge, credentials, first store records ----------------------


def ensure_credentials(path: Path) -> dict[str, str]:
    """The admin's credentials file, made once (mode 0600) with a random password and never
    overwritten.

    Raises:
        ConfigError: the file cannot be made, or exists but is not a credentials file.
    """
    document = {
        "user": ADMIN_USER,
        "password": secrets.token_urlsafe(18),
        "project": DEFAULT_PROJECT,
    }
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_credentials(path)
    except OSError as error:
        raise ConfigError(f"cannot create {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "w") as file:
        json.dump(document, file, indent=2)
        file.write("\n")
    return document


def _read_credentials(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"the credentials file {path} cannot be read: {error}",
            hint="restore it from a backup; nubes never overwrites it",
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("password"), str):
        raise ConfigError(
            f"{path} is not a nubes credentials file",
            hint="restore it from a backup; nubes never overwrites it",
        )
    return {str(key): str(value) for key, value in document.items()}


async def _store_bootstrap(config: NubesConfig, password: str, timeout: float) -> list[str]:
    """The project, the admin and the flavors (store-level: nobody can log in before them);
    then waits until this host's agent is alive, so a first VM finds a host."""
    made = []
    async with await open_store(config) as store:
        if await ensure_project(store, DEFAULT_PROJECT):
            made.append(f"project {DEFAULT_PROJECT}")
        if await ensure_user(
            store, ADMIN_USER, password, role=Role.ADMIN, projects=[DEFAULT_PROJECT]
        ):
            made.append(f"user {ADMIN_USER}")
        made += [f"flavor {name}" for name in await ensure_flavors(store)]
        deadline = time.monotonic() + timeout
        while await store.get(host_alive_key(config.agent.host)) is None:
            if time.monotonic() > deadline:
                raise NodeStartFailed(
                    f"the agent of host {config.agent.host} did not register in {timeout:.0f} s",
                    hint="see the node's log (node.log in the state directory)",
                )
            await asyncio.sleep(0.2)
    return made


# -- the default cloud, through the API ----------------------------------------------------


class DefaultCloud:
    """The records every fresh cloud gets, each made only when missing."""

    def __init__(self, client: Client, settings: NodeSettings, say: Say) -> None:
        self.http = client
        self.settings = settings
        self.say = say
        self.made: list[str] = []

    def ensure(self) -> list[str]:
        """Raises ApiError when the API refuses a record it should take."""
        self.ensure_tiny_image()
        external = self.ensure_external_network()
        network = self.ensure_default_network(external)
        self.ensure_default_subnet(network)
        self.ensure_default_security_group()
        return self.made

    def _find(self, collection: str, name: str | None = None, **query: str) -> Json | None:
        """The first record the API lists for these filters (checking the name itself)."""
        params: dict[str, str | int] = {**query, "limit": 1000}
        if name is not None:
            params["name"] = name
        page = self.http.call("GET", f"/{collection}", params=params)
        for item in page["items"]:
            if name is None or _field(item, "name") == name:
                return dict(item)
        return None

    def ensure_tiny_image(self) -> None:
        if self._find("images", name=TINY_IMAGE) is not None:
            return
        from nubes.tinyimage.builder import build_tiny_image, default_cache_directory

        _say(self.say, "building (or finding) the tiny guest image")
        built = build_tiny_image(default_cache_directory())
        manifest = built.manifest
        self.http.upload_image(
            TINY_IMAGE,
            built.directory / manifest.disk.path,
            kernel=built.directory / manifest.kernel.path,
            initrd=built.directory / manifest.initrd.path,
            cmdline=manifest.cmdline,
            public=True,
        )
        self.made.append(f"image {TINY_IMAGE}")

    def ensure_external_network(self) -> dict[str, Any]:
        found = self._find("networks", name=EXTERNAL_NETWORK, external="true")
        if found is not None:
            return found
        cidr = self.settings.external_cidr
        record = self.http.call(
            "POST",
            "/networks",
            json_body={
                "name": EXTERNAL_NETWORK,
                "external": {
                    "physical_network": PHYSICAL_NETWORK,
                    "cidr": str(cidr),
                    "gateway": str(self.settings.bridge_address.ip),
                },
            },
        )
        self.made.append(f"external network {EXTERNAL_NETWORK} ({cidr})")
        return dict(record)

    def ensure_default_network(self, external: dict[str, Any]) -> dict[str, Any]:
        found = self._find("networks", name=DEFAULT_NETWORK, external="false")
        if found is None:
            found = self.http.call(
                "POST",
                "/networks",
                json_body={"name": DEFAULT_NETWORK, "external_gateway": external["id"]},
            )
            self.made.append(f"network {DEFAULT_NETWORK} (way out: {EXTERNAL_NETWORK})")
        elif _field(found, "spec.gateway") is None:
            found = self.http.call(
                "PATCH", f"/networks/{found['id']}", json_body={"external_gateway": external["id"]}
            )
            self.made.append(f"gateway of {DEFAULT_NETWORK} to {EXTERNAL_NETWORK}")
        return dict(found)

    def ensure_default_subnet(self, network: dict[str, Any]) -> None:
        if self._find("subnets", network=network["id"]) is not None:
            return
        self.http.call(
            "POST",
            "/subnets",
            json_body={
                "name": DEFAULT_SUBNET,
                "network": network["id"],
                "cidr": DEFAULT_SUBNET_CIDR,
            },
        )
        self.made.append(f"subnet {DEFAULT_SUBNET} ({DEFAULT_SUBNET_CIDR})")

    def ensure_default_security_group(self) -> None:
        """The project's `default` group as the API itself makes it at a first port: all
        egress, ingress from its own members (rules can be added to it later)."""
        if self._find("security-groups", name=DEFAULT_SECURITY_GROUP) is not None:
            return
        try:
            group = self.http.call(
                "POST", "/security-groups", json_body={"name": DEFAULT_SECURITY_GROUP}
            )
        except ApiError as error:
            if error.status != 409:  # made meanwhile (a first port, another `nubes up`): fine
                raise
            return
        for ethertype in ("ipv4", "ipv6"):
            self.http.call(
                "POST",
                f"/security-groups/{group['id']}/rules",
                json_body={
                    "direction": "ingress",
                    "ethertype": ethertype,
                    "remote_group": group["id"],
                },
            )
        self.made.append(f"security group {DEFAULT_SECURITY_GROUP}")


def _field(item: Any, path: str) -> Any:
    """`item["spec"]["name"]` for "spec.name"; a top-level or spec-level name both match."""
    for part in path.split("."):
        if not isinstance(item, dict):
            return None
        if part not in item and "spec" in item and isinstance(item["spec"], dict):
            item = item["spec"]
        item = item.get(part)
    return item
