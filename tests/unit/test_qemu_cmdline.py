"""The QEMU command line, checked against golden files (one argument per line).

A change to the builder that changes a line shows here as a diff; when the change is
meant, regenerate with NUBES_UPDATE_GOLDEN=1 and review the golden files' diff.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from nubes.agent.compute.process import marker_of
from nubes.agent.compute.qemu_cmdline import (
    Accelerator,
    DiskFormat,
    DiskPlan,
    KernelBoot,
    NicPlan,
    QemuPlan,
    RuntimePaths,
    build_qemu_argv,
    parse_marker,
    process_marker,
)

GOLDEN = Path(__file__).parent / "golden" / "qemu"
UPDATE_GOLDEN = os.environ.get("NUBES_UPDATE_GOLDEN") == "1"


def runtime_paths(
    run: str = "/run/nubes/vms/i-0123456789",
    state: str = "/var/lib/nubes/vms/i-0123456789",
    *,
    vnc: bool = False,
) -> RuntimePaths:
    return RuntimePaths(
        qmp_socket=Path(run, "qmp.sock"),
        serial_socket=Path(run, "serial.sock"),
        serial_log=Path(state, "serial.log"),
        pidfile=Path(run, "qemu.pid"),
        guest_agent_socket=Path(run, "qga.sock"),
        vnc_socket=Path(run, "vnc.sock") if vnc else None,
    )


def root_disk(path: str = "/var/lib/nubes/vms/i-0123456789/root.qcow2") -> DiskPlan:
    return DiskPlan(node="root", path=Path(path), format=DiskFormat.QCOW2, serial="root")


PLANS = {
    "minimal": QemuPlan(
        vm_id="i-0123456789",
        prefix="nb",
        accel=Accelerator.TCG,
        machine="q35",
        vcpus=1,
        memory_mb=256,
        paths=runtime_paths(),
        disks=(root_disk(),),
    ),
    "kernel_volumes_nic_vnc_kvm": QemuPlan(
        vm_id="i-0123456789",
        prefix="nb",
        accel=Accelerator.KVM,
        machine="q35",
        vcpus=4,
        memory_mb=2048,
        paths=runtime_paths(vnc=True),
        disks=(
            root_disk(),
            DiskPlan(
                node="vol-data000001",
                path=Path("/var/lib/nubes/volumes/vol-data000001.qcow2"),
                format=DiskFormat.QCOW2,
                serial="vol-data000001",
            ),
            DiskPlan(
                node="seed",
                path=Path("/var/lib/nubes/vms/i-0123456789/seed.iso"),
                format=DiskFormat.RAW,
                serial="seed",
                read_only=True,
            ),
        ),
        nics=(NicPlan(id="net0", tap="nbt0123456789", mac="fa:16:3e:00:00:01"),),
        kernel_boot=KernelBoot(
            kernel=Path("/var/lib/nubes/images/img-0123456789/vmlinuz"),
            initrd=Path("/var/lib/nubes/images/img-0123456789/initrd.img"),
            cmdline="console=ttyS0 root=UUID=6e756265-732d-7469-6e79-2d726f6f7466 rw quiet",
        ),
        hotplug_slots=2,
    ),
    "pc_machine": QemuPlan(
        vm_id="i-0123456789",
        prefix="nb",
        accel=Accelerator.TCG,
        machine="pc",
        vcpus=2,
        memory_mb=512,
        paths=runtime_paths(),
        disks=(root_disk(),),
    ),
    "paths_with_commas": QemuPlan(
        vm_id="i-0123456789",
        prefix="nb",
        accel=Accelerator.TCG,
        machine="q35",
        vcpus=1,
        memory_mb=256,
        paths=runtime_paths("/run/nubes,test/vms", "/var/lib/nubes,test", vnc=True),
        disks=(root_disk("/var/lib/nubes,test/root,1.qcow2"),),
        kernel_boot=KernelBoot(
            kernel=Path("/var/lib/nubes,test/vmlinuz"), initrd=None, cmdline="console=ttyS0"
        ),
        hotplug_slots=1,
        extra_smbios={"sku": "small,fast"},
    ),
}


def assert_matches_golden(name: str, argv: list[str]) -> None:
    assert all("\n" not in argument for argument in argv), "one argument per line"
    golden = GOLDEN / f"{name}.argv"
    actual = "".join(f"{argument}\n" for argument in argv)
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
        return
    if not golden.exists():
        pytest.fail(f"{golden} is missing: run with NUBES_UPDATE_GOLDEN=1 to create it")
    expected = golden.read_text()
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"golden/qemu/{name}.argv",
            tofile="build_qemu_argv()",
        )
        pytest.fail(
            "the command line differs from its golden file "
            "(NUBES_UPDATE_GOLDEN=1 regenerates it):\n" + "".join(diff),
            pytrace=False,
        )


@pytest.mark.parametrize("name", sorted(PLANS))
def test_the_command_line_matches_its_golden_file(name: str) -> None:
    assert_matches_golden(name, build_qemu_argv(PLANS[name]))


def test_every_golden_file_has_a_plan() -> None:
    assert sorted(path.stem for path in GOLDEN.glob("*.argv")) == sorted(PLANS)


def test_the_command_line_daemonizes_with_the_pidfile_last() -> None:
    argv = build_qemu_argv(PLANS["minimal"])
    assert argv[-3:] == ["-daemonize", "-pidfile", "/run/nubes/vms/i-0123456789/qemu.pid"]


def test_a_q35_machine_gets_its_free_hotplug_ports_and_a_pc_machine_none() -> None:
    q35 = build_qemu_argv(PLANS["kernel_volumes_nic_vnc_kvm"])
    pc = build_qemu_argv(PLANS["pc_machine"])
    assert [arg for arg in q35 if arg.startswith("pcie-root-port")] == [
        "pcie-root-port,id=hotplug0,chassis=1,bus=pcie.0,addr=0x18.0,multifunction=on",
        "pcie-root-port,id=hotplug1,chassis=2,bus=pcie.0,addr=0x18.1",
    ]
    assert not [arg for arg in pc if "pcie-root-port" in arg]


def test_thirty_hotplug_ports_pack_eight_to_a_slot() -> None:
    plan = replace(PLANS["minimal"], hotplug_slots=30)
    ports = [arg for arg in build_qemu_argv(plan) if arg.startswith("pcie-root-port")]
    assert len(ports) == 30
    assert ports[8].endswith("addr=0x19.0,multifunction=on")
    assert ports[29].endswith("addr=0x1b.5")


def test_commas_in_option_values_are_doubled_but_plain_path_arguments_are_not() -> None:
    argv = build_qemu_argv(PLANS["paths_with_commas"])
    assert "file.filename=/var/lib/nubes,,test/root,,1.qcow2" in argv[argv.index("-blockdev") + 1]
    assert argv[argv.index("-vnc") + 1] == "unix:/run/nubes,,test/vms/vnc.sock"
    assert "sku=small,,fast" in argv[argv.index("-smbios") + 1]
    # -kernel takes its argument as it is: QEMU would look for 'nubes,,test' otherwise.
    assert argv[argv.index("-kernel") + 1] == "/var/lib/nubes,test/vmlinuz"


def test_the_first_disk_boots_only_without_direct_kernel_boot() -> None:
    firmware = build_qemu_argv(PLANS["minimal"])
    direct = build_qemu_argv(PLANS["kernel_volumes_nic_vnc_kvm"])
    assert "virtio-blk-pci,drive=root,id=disk-root,serial=root,bootindex=0" in firmware
    assert not [arg for arg in direct if "bootindex" in arg]


def test_the_marker_of_a_built_command_line_names_its_agent_and_vm() -> None:
    assert marker_of(build_qemu_argv(PLANS["minimal"])) == ("nb", "i-0123456789")


@pytest.mark.parametrize(
    ("prefix", "vm_id"), [("nb", "i-0123456789"), ("t1", "i-abcdefghij"), ("x", "i-0000000000")]
)
def test_a_marker_parses_back_to_its_prefix_and_vm(prefix: str, vm_id: str) -> None:
    marker = process_marker(prefix, vm_id)
    assert parse_marker(f"guest={marker}") == (prefix, vm_id)
    assert parse_marker(f"guest={marker},debug-threads=on") == (prefix, vm_id)
    assert parse_marker(f"process=qemu,guest={marker}") == (prefix, vm_id)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "guest=web-server",
        "guest=other:nb:i-0123456789",
        "guest=nubes",
        "guest=nubes:",
        "guest=nubes:nb",
        "guest=nubes:nb:",
        "guest=nubes::i-0123456789",
        "process=nubes:nb:i-0123456789",
        "xguest=nubes:nb:i-0123456789",
    ],
)
def test_a_foreign_name_is_not_taken_for_a_marker(name: str) -> None:
    assert parse_marker(name) is None
