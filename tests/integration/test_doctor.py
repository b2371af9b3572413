"""`nubes doctor` on this machine, as an operator runs it: the real checks pass with a
SQLite store in a temp dir; a hidden dnsmasq or an etcd nobody listens on fails the run
and says what to do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

NUBES = str(Path(sys.executable).parent / "nubes")
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def doctor_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a doctor run whose settings (SQLite store, TCG) live in tmp_path."""
    config = tmp_path / "nubes.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[agent]\naccel = "tcg"\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUBES_")}
    env.update(NUBES_CONFIG=str(config), PATH=STANDARD_PATH)
    return env


@pytest.fixture
def path_without_dnsmasq(tmp_path: Path) -> Iterator[str]:
    """A PATH of one directory: links to every standard tool except dnsmasq."""
    directory = tmp_path / "path"
    directory.mkdir()
    for source in STANDARD_PATH.split(":"):
        if not os.path.isdir(source):
            continue
        for entry in os.scandir(source):
            link = directory / entry.name
            if entry.name != "dnsmasq" and not link.exists() and not link.is_symlink():
                link.symlink_to(entry.path)
    yield str(directory)
    shutil.rmtree(directory, ignore_errors=True)


def doctor(env: dict[str, str], *arguments: str, prefix: tuple[str, ...] = ()) -> Any:
    return subprocess.run(
        [*prefix, NUBES, "doctor", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def by_name(stdout: str) -> dict[str, dict[str, Any]]:
    document = json.loads(stdout)
    assert set(document) == {"ok", "checks"}
    return {check["name"]: check for check in document["checks"]}


def test_this_machine_passes_with_a_sqlite_store_and_tcg(doctor_env: dict[str, str]) -> None:
    run = doctor(doctor_env, "-o", "json")
    checks = by_name(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["ok"] is True
    for name in ("config", "qemu", "qemu-img", "nft", "dnsmasq", "ip", "privileges", "store"):
        assert checks[name]["status"] == "ok", checks[name]
    for module in ("vxlan", "tun", "bridge", "veth", "nf_tables", "br_netfilter"):
        assert checks[f"module {module}"]["status"] == "ok", checks[f"module {module}"]
    # cgroup v1 for cpu (as here) is a warning; KVM is whatever this host gives.
    assert checks["cgroup"]["status"] in {"ok", "warn"}
    assert checks["kvm"]["status"] in {"ok", "warn", "fail"}
    assert checks["kvm"]["found"]
    assert "7." in checks["qemu"]["found"] or "8." in checks["qemu"]["found"]


def test_a_dnsmasq_missing_from_path_fails_the_run_and_names_the_package(
    doctor_env: dict[str, str], path_without_dnsmasq: str
) -> None:
    env = {**doctor_env, "PATH": path_without_dnsmasq}
    run = doctor(env, "-o", "json")
    assert run.returncode == 1, run.stdout + run.stderr
    checks = by_name(run.stdout)
    assert checks["dnsmasq"]["status"] == "fail"
    assert "dnsmasq-base" in checks["dnsmasq"]["fix"]
    assert checks["qemu"]["status"] == "ok"  # only dnsmasq was hidden

    text = doctor(env)
    assert text.returncode == 1
    assert "FAIL  dnsmasq" in text.stdout
    assert "dnsmasq-base" in text.stdout
    assert text.stdout.strip().splitlines()[-1].startswith("1 problem: dnsmasq")


def test_a_dnsmasq_not_installed_at_all_says_to_install_dnsmasq_base(
    doctor_env: dict[str, str], tmp_path: Path
) -> None:
    # A private mount namespace, gone with the process, covers the binary with an empty
    # non-executable file: what the host looks like without the package.
    installed = shutil.which("dnsmasq", path=STANDARD_PATH)
    assert installed is not None
    cover = tmp_path / "no-dnsmasq"
    cover.write_bytes(b"")
    cover.chmod(0o644)
    hide = (
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
        str(cover), os.path.realpath(installed),
    )  # fmt: skip
    run = doctor(doctor_env, "-o", "json", prefix=hide)
    assert run.returncode == 1, run.stdout + run.stderr
    dnsmasq = by_name(run.stdout)["dnsmasq"]
    assert dnsmasq["status"] == "fail"
    assert dnsmasq["fix"] == "install it: apt-get install dnsmasq-base"
    assert os.access(installed, os.X_OK)  # the host's own dnsmasq was never touched


def test_an_etcd_endpoint_nobody_listens_on_fails_naming_it_within_seconds(
    doctor_env: dict[str, str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    env = {**doctor_env, "NUBES_STORE__ENGINE": "etcd", "NUBES_STORE__ENDPOINTS": endpoint}
    started = time.monotonic()
    run = doctor(env, "-o", "json")
    elapsed = time.monotonic() - started
    assert run.returncode == 1, run.stdout + run.stderr
    store = by_name(run.stdout)[f"store {endpoint}"]
    assert store["status"] == "fail"
    assert endpoint in store["found"]
    assert "[store] endpoints" in store["fix"]
    assert "within 3 s" in store["found"]  # its own short timeout, not the daemons' 10 s
    assert elapsed < 60  # a guard against a hang, not a speed measurement
