"""CLI verbs against the real API over HTTP: `-o json` prints the API's answer, errors go to
stderr as `{code, message, hint}` with exit 1 (2 for bad input), and the login is saved."""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from nubes.cli.main import app
from nubes.config import load_config
from tests.support.api_server import ADMIN_PASSWORD, ApiServer, serve_api

PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnpWFWQVKYNGcBvXqEf5E3lgMxpD0nIEfXDo0Iaomhs test@nubes"
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with serve_api(tmp_path_factory.mktemp("api")) as server:
        yield server


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "config"


def nubes(
    home: Path,
    *args: str,
    url: str | None = None,
    token: str | None = None,
    stdin: str | None = None,
) -> Result:
    """Runs `nubes ARGS` with only the given NUBES_URL / NUBES_TOKEN and a private config home."""
    env = {"XDG_CONFIG_HOME": str(home), "NUBES_URL": url, "NUBES_TOKEN": token}
    return CliRunner().invoke(app, list(args), env=env, input=stdin)


def ok(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def failed(result: Result, exit_code: int) -> dict[str, str]:
    assert result.exit_code == exit_code, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    error: dict[str, str] = json.loads(result.stderr)
    assert error["message"]
    assert error["hint"]
    return error


def test_login_saves_a_private_session_that_later_commands_use(api: ApiServer, home: Path) -> None:
    logged = ok(
        nubes(
            home,
            "login",
            "--url",
            api.url,
            "--user",
            "admin",
            "--password-stdin",
            "-o",
            "json",
            stdin=ADMIN_PASSWORD + "\n",
        )
    )
    assert logged["user"] == "admin"
    assert "token" not in logged
    session = home / "nubes" / "session.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    saved = json.loads(session.read_text())
    assert saved["url"] == api.url
    assert saved["token"].startswith("nbt_")

    me = ok(nubes(home, "whoami", "-o", "json"))
    assert (me["user"], me["project"], me["url"]) == ("admin", "default", api.url)

    ok(nubes(home, "logout", "-o", "json"))
    assert not session.exists()
    revoked = nubes(home, "whoami", "-o", "json", url=api.url, token=saved["token"])
    assert failed(revoked, 1)["code"] == "unauthorized"


def test_a_wrong_password_is_refused_and_nothing_is_saved(api: ApiServer, home: Path) -> None:
    result = nubes(
        home,
        "login",
        "--url",
        api.url,
        "--user",
        "admin",
        "--password-stdin",
        "-o",
        "json",
        stdin="wrong\n",
    )
    assert failed(result, 1)["code"] == "unauthorized"
    assert not (home / "nubes" / "session.json").exists()


def test_errors_are_json_on_stderr_with_the_code_and_exit_1_or_2(
    api: ApiServer, home: Path
) -> None:
    token = api.token()
    missing = nubes(home, "flavor", "show", "no-such", "-o", "json", url=api.url, token=token)
    assert failed(missing, 1)["code"] == "not_found"
    invalid = nubes(
        home,
        "flavor",
        "create",
        "bad",
        "--vcpus",
        "0",
        "--memory-mb",
        "64",
        "-o",
        "json",
        url=api.url,
        token=token,
    )
    assert failed(invalid, 2)["code"] == "invalid_input"
    people = nubes(home, "flavor", "show", "no-such", url=api.url, token=token)
    assert people.exit_code == 1
    assert people.stderr.startswith("error: no flavor")


def test_a_stopped_api_gets_a_message_that_says_to_run_nubes_up(home: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = nubes(home, "vm", "list", "-o", "json", url=url, token="nbt_x")  # noqa: S106
    error = failed(result, 1)
    assert error["code"] == "api_unreachable"
    assert "nubes up" in error["hint"]


def test_flavors_list_as_json_and_as_a_table(api: ApiServer, home: Path) -> None:
    token = api.token()
    flavors = ok(nubes(home, "flavor", "list", "-o", "json", url=api.url, token=token))
    assert {"tiny", "small"} <= {flavor["name"] for flavor in flavors}
    table = nubes(home, "flavor", "list", url=api.url, token=token)
    assert table.exit_code == 0
    assert "tiny" in table.stdout


def test_network_subnet_keypair_and_security_group_verbs(
    api: ApiServer, home: Path, tmp_path: Path
) -> None:
    token = api.member("cli-net", "cli-net-user")

    def run(*args: str) -> Result:
        return nubes(home, *args, "-o", "json", url=api.url, token=token)

    network = ok(run("network", "create", "net1"))
    subnet = ok(run("subnet", "create", "sub1", "--network", "net1", "--cidr", "198.18.10.0/24"))
    assert subnet["spec"]["network"] == network["id"]
    listed = ok(run("subnet", "list", "--network", "net1"))
    assert [s["id"] for s in listed] == [subnet["id"]]
    assert ok(run("subnet", "show", "sub1"))["id"] == subnet["id"]
    overlap = run("subnet", "create", "sub2", "--network", "net1", "--cidr", "198.18.10.0/25")
    assert failed(overlap, 1)["code"] == "cidr_overlap"

    key = tmp_path / "id.pub"
    key.write_text(PUBLIC_KEY + "\n")
    pair = ok(run("keypair", "create", "mine", "--public-key-file", str(key)))
    assert pair["fingerprint"].startswith("SHA256:")
    key.write_text("not a key\n")
    assert failed(run("keypair", "create", "bad", "-f", str(key)), 2)["code"]

    ok(run("security-group", "create", "web"))
    rule = ok(run("security-group", "rule", "add", "web", "--protocol", "tcp", "--port", "22"))
    ok(run("security-group", "rule", "add", "web", "--protocol", "icmp"))

    def ingress() -> set[tuple[str, int | None]]:
        rules = ok(run("security-group", "rule", "list", "web"))
        return {(r["protocol"], r["port_min"]) for r in rules if r["direction"] == "ingress"}

    assert ingress() == {("tcp", 22), ("icmp", None)}
    ok(run("security-group", "rule", "delete", "web", rule["id"]))
    assert ingress() == {("icmp", None)}

    assert ok(run("subnet", "delete", "sub1")) == {"id": "sub1", "deleted": True}
    assert failed(run("subnet", "show", "sub1"), 1)["code"] == "not_found"


def test_vm_create_list_act_and_delete(api: ApiServer, home: Path, tmp_path: Path) -> None:
    token = api.member("cli-vm", "cli-vm-user")

    def run(*args: str) -> Result:
        return nubes(home, *args, "-o", "json", url=api.url, token=token)

    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    image = ok(run("image", "upload", str(disk), "--name", "img1", "--format", "raw"))
    assert ok(run("image", "show", "img1"))["id"] == image["id"]
    assert [i["id"] for i in ok(run("image", "list", "--api"))] == [image["id"]]
    ok(run("network", "create", "net"))
    ok(run("subnet", "create", "sub", "--network", "net", "--cidr", "198.18.20.0/24"))
    user_data = tmp_path / "user-data"
    user_data.write_text("#!/bin/sh\necho hello\n")

    vm = ok(
        run(
            "vm",
            "create",
            "web1",
            "--image",
            "img1",
            "--flavor",
            "tiny",
            "--network",
            "net",
            "--user-data",
            str(user_data),
        )
    )
    assert vm["spec"]["name"] == "web1"
    assert vm["spec"]["user_data"] == user_data.read_text()
    assert vm["addresses"][0]["ip"].startswith("198.18.20.")
    listed = ok(run("vm", "list"))
    assert [v["id"] for v in listed] == [vm["id"]]
    assert ok(run("vm", "show", "web1"))["id"] == vm["id"]

    stopped = ok(run("vm", "stop", "web1", "--force"))
    assert stopped["spec"]["power_state"] == "stopped"
    resized = ok(run("vm", "resize", "web1", "--flavor", "small"))
    assert resized["spec"]["flavor"]["name"] == "small"
    assert failed(run("vm", "resize", "web1", "--flavor", "nope"), 1)["code"] == "not_found"
    timeout = run("vm", "wait", "web1", "--state", "running", "--timeout", "0.3")
    assert failed(timeout, 1)["code"] == "wait_timeout"

    assert failed(run("image", "delete", "--api", "img1"), 1)["code"] == "conflict"
    # Never placed, it has no agent to tear it down: the API removes it at once.
    gone = ok(run("vm", "delete", "web1", "--wait", "--timeout", "10"))
    assert gone == {"id": vm["id"], "deleted": True}
    assert failed(run("vm", "show", vm["id"]), 1)["code"] == "not_found"
    assert ok(run("image", "delete", "--api", "img1")) == {"id": "img1", "deleted": True}


def test_vm_ssh_runs_ssh_in_the_vms_namespace() -> None:
    from nubes.cli.vm import ssh_argv

    view = {
        "id": "i-aaaaaaaaaa",
        "spec": {"name": "web1"},
        "addresses": [
            {
                "port": "port-aaaaaaaaaa",
                "network": "vpc-bbbbbbbbbb",
                "subnet": "subnet-cccccccccc",
                "ip": "198.18.20.5",
            }
        ],
    }
    argv = ssh_argv(view, "root", ["-o", "StrictHostKeyChecking=no"], ["uname", "-a"])
    prefix = load_config().agent.prefix
    assert argv[1:] == [
        "netns",
        "exec",
        f"{prefix}-vpc-bbbbbbbbbb",
        "ssh",
        "-o",
        "StrictHostKeyChecking=no",
        "root@198.18.20.5",
        "uname",
        "-a",
    ]
    bad = {**view, "addresses": [{**view["addresses"][0], "network": "../../etc"}]}
    with pytest.raises(Exception, match="not a nubes id"):
        ssh_argv(bad, "root", [], [])


def test_floating_ips_by_vm_and_by_address_and_volume_snapshots(
    api: ApiServer, home: Path, tmp_path: Path
) -> None:
    admin = api.token()
    external = ok(
        nubes(
            home,
            "network",
            "create",
            "ext",
            "--external-cidr",
            "198.19.100.0/24",
            "-o",
            "json",
            url=api.url,
            token=admin,
        )
    )
    assert external["spec"]["external"]["cidr"] == "198.19.100.0/24"
    token = api.member("cli-fip", "cli-fip-user")

    def run(*args: str) -> Result:
        return nubes(home, *args, "-o", "json", url=api.url, token=token)

    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    ok(run("image", "upload", str(disk), "--name", "img", "--format", "raw"))
    ok(run("network", "create", "vpc", "--external-gateway", "ext"))
    ok(run("subnet", "create", "sub", "--network", "vpc", "--cidr", "198.18.30.0/24"))
    vm = ok(
        run(
            "vm",
            "create",
            "web",
            "--image",
            "img",
            "--flavor",
            "tiny",
            "--network",
            "vpc",
            "--floating-ip",
            "ext",
        )
    )
    address = vm["floating_ip"]["spec"]["address"]
    assert address.startswith("198.19.100.")
    assert vm["floating_ip"]["spec"]["port"] == vm["spec"]["ports"][0]

    free = ok(run("floating-ip", "disassociate", address))
    assert free["spec"]["port"] is None
    moved = ok(run("floating-ip", "associate", address, "--vm", "web"))
    assert moved["spec"]["port"] == vm["spec"]["ports"][0]
    both = run("floating-ip", "associate", address, "--vm", "web", "--port", "x")
    assert failed(both, 2)["code"] == "invalid_input"
    listed = ok(run("floating-ip", "list"))
    assert [f["spec"]["address"] for f in listed] == [address]
    assert ok(run("floating-ip", "delete", address)) == {"id": address, "deleted": True}
    assert ok(run("floating-ip", "list")) == []

    volume = ok(run("volume", "create", "data", "--size", "1"))
    assert volume["spec"]["size_gb"] == 1
    ok(run("volume", "snapshot", "create", "data", "snap1"))
    snapshots = ok(run("volume", "snapshot", "list", "data"))
    assert [s["name"] for s in snapshots] == ["snap1"]
    # No scheduler runs here, so the VM stays pending and the API says to wait.
    refused = failed(run("vm", "attach-volume", "web", "data"), 1)
    assert refused["code"] == "vm_state"
    assert "placed" in refused["hint"]


def test_projects_users_and_tokens(api: ApiServer, home: Path) -> None:
    admin = api.token()

    def run(*args: str, token: str = admin, stdin: str | None = None) -> Result:
        return nubes(home, *args, "-o", "json", url=api.url, token=token, stdin=stdin)

    assert ok(run("project", "create", "team"))["name"] == "team"
    quota = ok(run("project", "set-quota", "team", "--vms", "3"))
    assert quota["quota"]["vms"] == 3
    usage = ok(run("project", "usage", "team"))
    assert (usage["usage"]["vms"], usage["quota"]["vms"]) == (0, 3)
    made = ok(
        run(
            "user",
            "create",
            "alice",
            "--project",
            "team",
            "--password-stdin",
            stdin="alice-password-1\n",
        )
    )
    assert (made["name"], made["role"], made["projects"]) == ("alice", "member", ["team"])
    assert "alice" in {u["name"] for u in ok(run("user", "list"))}

    ok(
        nubes(
            home,
            "login",
            "--url",
            api.url,
            "-u",
            "alice",
            "--password-stdin",
            "-o",
            "json",
            stdin="alice-password-1\n",
        )
    )
    alice = json.loads((home / "nubes" / "session.json").read_text())["token"]
    assert failed(run("user", "list", token=alice), 1)["code"] == "forbidden"
    script = ok(run("token", "create", "--description", "ci", token=alice))
    assert script["token"].startswith("nbt_")
    tokens = ok(run("token", "list", token=alice))
    assert {t["description"] for t in tokens} == {"login", "ci"}
    ok(run("token", "revoke", script["id"], token=alice))
    assert failed(run("whoami", token=script["token"]), 1)["code"] == "unauthorized"
    assert ok(run("whoami", token=alice))["user"] == "alice"


def test_the_console_socket_path_comes_from_a_validated_id_on_this_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from nubes.cli.console import ConsoleUnavailable, serial_socket_of
    from nubes.errors import InvalidId

    monkeypatch.setenv("NUBES_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("NUBES_AGENT__RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("NUBES_AGENT__HOST", "here")
    with pytest.raises(InvalidId):
        serial_socket_of({"id": "../../etc/passwd", "spec": {"host": "here"}})
    with pytest.raises(ConsoleUnavailable, match="runs on host there"):
        serial_socket_of({"id": "i-aaaaaaaaaa", "spec": {"host": "there"}})
    with pytest.raises(ConsoleUnavailable, match="no serial console on this host"):
        serial_socket_of({"id": "i-aaaaaaaaaa", "spec": {"host": "here"}})
    socket_path = tmp_path / "run" / "vms" / "i-aaaaaaaaaa" / "serial.sock"
    socket_path.parent.mkdir(parents=True)
    socket_path.touch()
    assert serial_socket_of({"id": "i-aaaaaaaaaa", "spec": {"host": "here"}}) == socket_path
