"""`nubes doctor`: each check judged from fake probes (a PATH of scripts, tmp dirs standing
in for /sys and /lib/modules, mountinfo text), and the command's exit codes and JSON."""

from __future__ import annotations

import gzip
import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import nubes.doctor
from nubes.cli.main import app
from nubes.config import Accel, NubesConfig
from nubes.doctor import Check, Status, disk, kernel, kvm, summary, tools
from nubes.doctor.run import guarded
from nubes.doctor.store import check_store
from nubes.store.keys import Kind, resource_key

runner = CliRunner()


def fake_tool(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


# -- tools ---------------------------------------------------------------------------


def test_a_tool_missing_from_path_fails_and_names_its_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "SYSTEM_DIRECTORIES", (str(tmp_path / "sbin"),))
    check = tools.check_tool(tools.DNSMASQ, str(tmp_path))
    assert check.status is Status.FAIL
    assert check.fix == "install it: apt-get install dnsmasq-base"


def test_a_tool_the_agent_runs_in_a_namespace_must_be_on_path_not_only_in_sbin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbin = tmp_path / "sbin"
    fake_tool(sbin, "dnsmasq", "echo 'Dnsmasq version 2.90  Copyright'")
    monkeypatch.setattr(tools, "SYSTEM_DIRECTORIES", (str(sbin),))
    check = tools.check_tool(tools.DNSMASQ, str(tmp_path / "bin"))
    assert check.status is Status.FAIL
    assert "ip netns exec" in check.found
    assert check.fix is not None
    assert str(sbin) in check.fix
    # qemu-img is run through find_tool, which looks in the system directories too.
    fake_tool(sbin, "qemu-img", "echo 'qemu-img version 7.2.22 (Debian)'")
    assert tools.check_tool(tools.QEMU_IMG, str(tmp_path / "bin")).status is Status.OK


def test_a_qemu_older_than_6_0_fails(tmp_path: Path) -> None:
    fake_tool(tmp_path, "qemu-system-x86_64", "echo 'QEMU emulator version 5.2.0 (Debian 1:5.2)'")
    check = tools.check_tool(tools.qemu_tool("qemu-system-x86_64"), str(tmp_path))
    assert check.status is Status.FAIL
    assert "5.2.0" in check.found
    assert "6.0" in check.found


def test_debian_12_qemu_passes(tmp_path: Path) -> None:
    fake_tool(tmp_path, "qemu-system-x86_64", "echo 'QEMU emulator version 7.2.22 (Debian)'")
    check = tools.check_tool(tools.qemu_tool("qemu-system-x86_64"), str(tmp_path))
    assert check.status is Status.OK
    assert "7.2.22" in check.found


def test_a_tool_that_does_not_answer_its_version_fails(tmp_path: Path) -> None:
    fake_tool(tmp_path, "dnsmasq", "echo 'segmentation fault' >&2; exit 139")
    check = tools.check_tool(tools.DNSMASQ, str(tmp_path))
    assert check.status is Status.FAIL
    assert "segmentation fault" in check.found


def test_a_configured_qemu_path_that_is_not_there_points_at_the_setting(tmp_path: Path) -> None:
    check = tools.check_tool(tools.qemu_tool(str(tmp_path / "qemu")), "")
    assert check.status is Status.FAIL
    assert check.fix is not None
    assert "[agent] qemu" in check.fix


def test_versions_are_read_from_each_tools_own_banner() -> None:
    assert tools.parse_version("nftables v1.0.6 (Lester Gooch #5)", "nftables v") == (1, 0, 6)
    banner = "ip utility, iproute2-6.1.0, libbpf 1.1.2"
    assert tools.parse_version(banner, "iproute2-") == (6, 1, 0)
    assert tools.parse_version("Dnsmasq version 2.90  Copyright", "version") == (2, 90)
    assert tools.parse_version("no numbers", "version") is None


def test_nft_that_may_not_list_tables_says_to_run_as_root(tmp_path: Path) -> None:
    body = (
        'if [ "$1" = --version ]; then echo "nftables v1.0.6"; exit 0; fi\n'
        'echo "Error: Operation not permitted" >&2; exit 1'
    )
    fake_tool(tmp_path, "nft", body)
    check = tools.check_nft(str(tmp_path))
    assert check.status is Status.FAIL
    assert check.fix == "run as root"


# -- KVM -----------------------------------------------------------------------------


def test_no_dev_kvm_is_a_warning_under_auto_and_a_failure_when_kvm_is_insisted_on(
    tmp_path: Path,
) -> None:
    probe = kvm.probe_kvm(tmp_path / "kvm")
    assert probe == kvm.KvmProbe(present=False)
    assert kvm.evaluate_kvm(Accel.AUTO, probe).status is Status.WARN
    insisted = kvm.evaluate_kvm(Accel.KVM, probe)
    assert insisted.status is Status.FAIL
    assert insisted.fix is not None
    assert "kvm_intel" in insisted.fix
    assert kvm.evaluate_kvm(Accel.TCG, probe).status is Status.OK


def test_a_device_that_does_not_speak_the_kvm_api_is_not_usable(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    probe = kvm.probe_kvm(device)
    assert probe.present
    assert probe.open_error is not None
    assert "KVM_GET_API_VERSION" in probe.open_error
    assert kvm.evaluate_kvm(Accel.KVM, probe).status is Status.FAIL


def test_a_usable_kvm_is_judged_by_the_setting_and_the_agents_test_boot() -> None:
    usable = kvm.KvmProbe(present=True, api_version=kvm.KVM_API_VERSION)
    auto = kvm.evaluate_kvm(Accel.AUTO, usable)
    assert auto.status is Status.OK
    assert 'accel = "tcg"' in auto.found  # the way out when guests hang
    assert kvm.evaluate_kvm(Accel.AUTO, usable, booted=False).status is Status.WARN
    assert kvm.evaluate_kvm(Accel.AUTO, usable, booted=True).status is Status.OK
    forced = kvm.evaluate_kvm(Accel.TCG, usable)
    assert forced.status is Status.WARN
    assert kvm.evaluate_kvm(Accel.KVM, usable).status is Status.OK


# -- cgroups -------------------------------------------------------------------------


def mountinfo_line(mount: Path, filesystem: str, options: str) -> str:
    return f"31 23 0:28 / {mount} rw,relatime - {filesystem} {filesystem} {options}\n"


def test_cgroup_v2_with_the_cpu_controller_passes(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    check = kernel.check_cgroup(mountinfo_line(tmp_path, "cgroup2", "rw"))
    assert check.status is Status.OK
    assert "cpu.weight" in check.found


def test_a_cgroup_v1_cpu_layout_is_a_warning_with_the_boot_option(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")  # v2 is there, with no controllers
    mountinfo = mountinfo_line(tmp_path / "cpu", "cgroup", "rw,cpu") + mountinfo_line(
        unified, "cgroup2", "rw"
    )
    (tmp_path / "cpu").mkdir()
    check = kernel.check_cgroup(mountinfo)
    assert check.status is Status.WARN
    assert check.fix is not None
    assert "systemd.unified_cgroup_hierarchy=1" in check.fix


def test_no_cpu_controller_anywhere_fails(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    assert kernel.check_cgroup(mountinfo_line(tmp_path, "cgroup2", "rw")).status is Status.FAIL


# -- kernel modules ------------------------------------------------------------------


def kernel_tree(tmp_path: Path, loaded: list[str], dep: list[str], builtin: list[str]) -> Path:
    for name in loaded:
        (tmp_path / "sys" / name).mkdir(parents=True)
    release = tmp_path / "lib" / "6.1.0-test"
    release.mkdir(parents=True)
    (release / "modules.dep").write_text(
        "".join(f"kernel/drivers/net/{name}.ko.xz: kernel/x.ko.xz\n" for name in dep)
    )
    (release / "modules.builtin").write_text(
        "".join(f"kernel/net/{name}/{name}.ko\n" for name in builtin)
    )
    return release


def read_facts(tmp_path: Path, config: Path | None = None) -> kernel.KernelFacts:
    return kernel.read_kernel_facts(
        sys_module=tmp_path / "sys",
        modules_root=tmp_path / "lib",
        config_paths=(config or tmp_path / "no-config",),
        release="6.1.0-test",
    )


def test_a_missing_module_fails_with_the_fix(tmp_path: Path) -> None:
    kernel_tree(tmp_path, loaded=["bridge"], dep=["tun", "veth", "nf_tables"], builtin=[])
    facts = read_facts(tmp_path)
    checks = {check.name: check for check in kernel.check_modules(facts)}
    assert checks["module bridge"].status is Status.OK
    assert checks["module tun"].status is Status.OK  # loadable: the kernel loads it on use
    assert checks["module vxlan"].status is Status.FAIL
    assert "linux-image-6.1.0-test" in (checks["module vxlan"].fix or "")


def test_br_netfilter_must_be_loaded_since_the_kernel_does_not_load_it_itself(
    tmp_path: Path,
) -> None:
    kernel_tree(tmp_path, loaded=[], dep=["br_netfilter"], builtin=["vxlan"])
    checks = {check.name: check for check in kernel.check_modules(read_facts(tmp_path))}
    assert checks["module vxlan"].status is Status.OK
    assert checks["module br_netfilter"].status is Status.FAIL
    assert (checks["module br_netfilter"].fix or "").startswith("modprobe br_netfilter")


def test_a_kernel_without_module_support_is_read_from_its_config(tmp_path: Path) -> None:
    config = tmp_path / "config.gz"
    config.write_bytes(gzip.compress(b"# CONFIG_MODULES is not set\nCONFIG_VXLAN=y\n"))
    checks = {c.name: c for c in kernel.check_modules(read_facts(tmp_path, config))}
    assert checks["module vxlan"].status is Status.OK
    assert checks["module veth"].status is Status.FAIL


def test_a_kernel_that_tells_nothing_is_a_warning(tmp_path: Path) -> None:
    checks = kernel.check_modules(read_facts(tmp_path))
    assert {check.status for check in checks} == {Status.WARN}


# -- privileges, disk ----------------------------------------------------------------


def test_privileges_need_root_with_net_admin_and_sys_admin() -> None:
    everything = (1 << 41) - 1
    assert kernel.check_privileges(1000, everything).status is Status.FAIL
    no_net_admin = everything & ~(1 << 12)
    check = kernel.check_privileges(0, no_net_admin)
    assert check.status is Status.FAIL
    assert "CAP_NET_ADMIN" in check.found
    assert kernel.check_privileges(0, everything).status is Status.OK
    status = "Name:\tx\nCapEff:\t000001fffeffffff\n"
    assert kernel.parse_effective_capabilities(status) == 0x1FFFEFFFFFF


def probe(
    path: str, free_gib: float, *, device: int = 1, writable: bool = True
) -> disk.DirectoryProbe:
    return disk.DirectoryProbe(
        Path(path), Path(path), device, int(free_gib * disk.GIB), writable=writable
    )


def test_low_disk_warns_under_5_gib_and_fails_under_1_gib() -> None:
    assert disk.evaluate_disk([probe("/s", 80)])[0].status is Status.OK
    assert disk.evaluate_disk([probe("/s", 3)])[0].status is Status.WARN
    low = disk.evaluate_disk([probe("/s", 0.5)])[0]
    assert low.status is Status.FAIL
    assert "0.5 GiB" in low.found


def test_disk_is_checked_once_per_filesystem_and_each_directory_must_be_writable() -> None:
    checks = disk.evaluate_disk(
        [probe("/s", 80), probe("/s/images", 80), probe("/pool", 3, device=2, writable=False)]
    )
    assert [check.name for check in checks] == ["disk /s", "disk /pool"]
    assert checks[1].status is Status.FAIL
    assert "not writable" in checks[1].found


def test_a_directory_not_made_yet_is_judged_by_its_nearest_existing_parent(tmp_path: Path) -> None:
    found = disk.probe_directory(tmp_path / "state" / "agent")
    assert found.existing == tmp_path
    assert found.free_bytes > 0


# -- store ---------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
    return port


async def test_an_unreachable_etcd_fails_naming_the_endpoint_quickly() -> None:
    endpoint = f"127.0.0.1:{closed_port()}"
    config = NubesConfig.model_validate({"store": {"engine": "etcd", "endpoints": [endpoint]}})
    started = time.monotonic()
    [check] = await check_store(config, timeout=0.5)
    assert time.monotonic() - started < 5
    assert check.status is Status.FAIL
    assert check.name == f"store {endpoint}"
    assert endpoint in check.found
    assert check.fix is not None
    assert "[store] endpoints" in check.fix


async def test_a_sqlite_store_that_is_not_a_database_fails(tmp_path: Path) -> None:
    (tmp_path / "nubes.db").write_bytes(b"not a database" * 100)
    config = NubesConfig.model_validate({"state_dir": str(tmp_path)})
    [check] = await check_store(config, timeout=1)
    assert check.status is Status.FAIL
    assert str(tmp_path / "nubes.db") in check.found


async def test_a_real_sqlite_store_is_read_and_left_exactly_as_it_was(tmp_path: Path) -> None:
    from nubes.store.sqlite import SqliteStore

    store = await SqliteStore.open(tmp_path / "nubes.db")
    await store.put(resource_key(Kind.HOST, "h1"), {"name": "h1"})
    await store.close()
    before = (tmp_path / "nubes.db").read_bytes()
    config = NubesConfig.model_validate({"state_dir": str(tmp_path), "agent": {"host": "h1"}})
    [check] = await check_store(config, timeout=1)
    assert check.status is Status.OK, check
    assert "knows this host" in check.found
    # The database is untouched; SQLite itself may leave its empty WAL companions.
    assert (tmp_path / "nubes.db").read_bytes() == before
    companions = {"nubes.db", "nubes.db-wal", "nubes.db-shm"}
    assert set(os.listdir(tmp_path)) <= companions


async def test_a_sqlite_file_without_the_nubes_tables_fails_and_gets_none(tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "nubes.db")
    other.execute("CREATE TABLE notes (text TEXT)")
    other.commit()
    other.close()
    config = NubesConfig.model_validate({"state_dir": str(tmp_path)})
    [check] = await check_store(config, timeout=1)
    assert check.status is Status.FAIL
    assert "without the nubes tables" in check.found
    tables = sqlite3.connect(tmp_path / "nubes.db").execute("SELECT name FROM sqlite_master")
    assert [row[0] for row in tables] == ["notes"]


async def test_a_sqlite_store_not_made_yet_is_fine_and_is_not_created(tmp_path: Path) -> None:
    config = NubesConfig.model_validate({"state_dir": str(tmp_path / "state")})
    [check] = await check_store(config)
    assert check.status is Status.OK
    assert not (tmp_path / "state").exists()


# -- running, summary and the command ------------------------------------------------


def test_a_check_that_raises_becomes_a_failed_check_with_the_error() -> None:
    def broken() -> list[Check]:
        raise RuntimeError("/proc is not mounted")

    [check] = guarded("cgroup", broken)
    assert check.status is Status.FAIL
    assert "/proc is not mounted" in check.found


def test_the_summary_names_problems_then_warnings() -> None:
    checks = [
        Check("qemu", Status.OK, "7.2"),
        Check("dnsmasq", Status.FAIL, "missing", "apt-get install dnsmasq-base"),
        Check("store", Status.FAIL, "down", "start it"),
        Check("cgroup", Status.WARN, "v1", "boot option"),
    ]
    assert summary(checks) == "2 problems: dnsmasq, store; 1 warning: cgroup"
    assert summary(checks[:1]) == "all 1 checks passed"


@pytest.fixture
def doctor_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "nubes.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[agent]\naccel = "tcg"\n')
    monkeypatch.setenv("NUBES_CONFIG", str(config))
    return config


def fake_run(checks: list[Check], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nubes.doctor, "run_checks", lambda config: checks)


def test_doctor_exits_0_with_only_warnings_and_prints_the_fix(
    doctor_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_run([Check("cgroup", Status.WARN, "cpu on cgroup v1", "boot option X")], monkeypatch)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "warn  cgroup  cpu on cgroup v1" in result.output
    assert "fix: boot option X" in result.output
    assert result.output.strip().endswith("1 warning: cgroup")


def test_doctor_exits_1_when_a_check_fails_and_json_has_every_check(
    doctor_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = Check("dnsmasq", Status.FAIL, "not found", "apt-get install dnsmasq-base")
    fake_run([missing], monkeypatch)
    result = runner.invoke(app, ["doctor", "-o", "json"])
    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["ok"] is False
    assert [check["name"] for check in document["checks"]] == ["config", "dnsmasq"]
    assert document["checks"][1] == {
        "name": "dnsmasq",
        "status": "fail",
        "found": "not found",
        "fix": "apt-get install dnsmasq-base",
    }
    assert str(doctor_config) in document["checks"][0]["found"]


def test_an_invalid_config_is_a_failed_check_and_the_rest_still_runs(
    doctor_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doctor_config.write_text('[agent]\naccel = "fast"\n')
    fake_run([Check("qemu", Status.OK, "7.2")], monkeypatch)
    result = runner.invoke(app, ["doctor", "-o", "json"])
    assert result.exit_code == 1
    checks = json.loads(result.output)["checks"]
    assert checks[0]["name"] == "config"
    assert checks[0]["status"] == "fail"
    assert "accel" in checks[0]["found"]
    assert checks[1]["name"] == "qemu"
