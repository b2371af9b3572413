"""The QEMU command line of a VM, built from a plan: pure, no I/O, checked by golden files.

Everything a running VM needs is on this line, so the line alone (kept next to the
VM's disks) is enough to start it again, and the marker in it lets the agent find
its QEMU processes in /proc after a restart.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

MARKER_PREFIX = "nubes"
SMBIOS_PRODUCT = "OpenStack Nova"  # cloud-init's ds-identify looks for it (docs/architecture.md 5)
_FIRST_HOTPLUG_SLOT = 0x18
_UUID_NAMESPACE = uuid.UUID("6e756265-7300-4000-8000-000000000000")


class Accelerator(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


@dataclass(frozen=True)
class DiskPlan:
    """A disk the guest sees as a virtio-blk device; `node` names it in QMP."""

    node: str
    path: Path
    format: DiskFormat
    serial: str
    read_only: bool = False


@dataclass(frozen=True)
class NicPlan:
    """A virtio-net NIC on a tap that already exists in the VM's network namespace."""

    id: str
    tap: str
    mac: str


@dataclass(frozen=True)
class KernelBoot:
    kernel: Path
    initrd: Path | None
    cmdline: str


@dataclass(frozen=True)
class RuntimePaths:
    """Where QEMU puts its sockets and pidfile (on tmpfs) and its serial log (on disk)."""

    qmp_socket: Path
    serial_socket: Path
    serial_log: Path
    pidfile: Path
    guest_agent_socket: Path
    vnc_socket: Path | None = None


@dataclass(frozen=True)
class QemuPlan:
    vm_id: str
    prefix: str
    accel: Accelerator
    machine: str
    vcpus: int
    memory_mb: int
    paths: RuntimePaths
    disks: tuple[DiskPlan, ...] = ()
    nics: tuple[NicPlan, ...] = ()
    kernel_boot: KernelBoot | None = None
    hotplug_slots: int = 8
    qemu: str = "qemu-system-x86_64"
    extra_smbios: dict[str, str] = field(default_factory=dict)
    # Wait for a live migration's stream (passed later over QMP) instead of booting.
    incoming: bool = False


def process_marker(prefix: str, vm_id: str) -> str:
    """The string that marks a QEMU process as this agent's VM `vm_id`."""
    return f"{MARKER_PREFIX}:{prefix}:{vm_id}"


def parse_marker(argument: str) -> tuple[str, str] | None:
    """(prefix, vm id) from a `-name` argument of a nubes QEMU, else None."""
    for part in argument.split(","):
        key, _, value = part.partition("=")
        if key == "guest" and value.startswith(f"{MARKER_PREFIX}:"):
            _, prefix, vm_id = [*value.split(":", 2), "", ""][:3]
            if prefix and vm_id:
                return prefix, vm_id
    return None


def vm_uuid(vm_id: str) -> str:
    """The SMBIOS UUID of a VM: stable for its id, so the guest sees the same one every boot."""
    return str(uuid.uuid5(_UUID_NAMESPACE, vm_id))


def hotplug_port(index: int) -> str:
    """The id of the `index`-th free PCIe root port, where hotplugged volumes go."""
    return f"hotplug{index}"


def disk_device_id(node: str) -> str:
    return f"disk-{node}"


def blockdev_options(disk: DiskPlan) -> str:
    """The -blockdev value of a disk (QMP's blockdev-add takes the same fields)."""
    return ",".join(
        [
            f"driver={disk.format.value}",
            f"node-name={disk.node}",
            "file.driver=file",
            f"file.filename={_escape(str(disk.path))}",
            "file.aio=threads",
            "cache.direct=off",
            f"read-only={'on' if disk.read_only else 'off'}",
            "discard=unmap",
        ]
    )


def build_qemu_argv(plan: QemuPlan) -> list[str]:
    """The full argv of the VM's QEMU process; it daemonizes once the QMP socket listens."""
    paths = plan.paths
    argv = [
        plan.qemu,
        "-name", f"guest={process_marker(plan.prefix, plan.vm_id)},debug-threads=on",
        "-uuid", vm_uuid(plan.vm_id),
        "-nodefaults",
        "-no-user-config",
        "-machine", f"{plan.machine},accel={plan.accel.value}",
        "-cpu", "host" if plan.accel is Accelerator.KVM else "max",
        "-smp", str(plan.vcpus),
        "-m", f"{plan.memory_mb}M",
        "-smbios", _smbios(plan),
        "-display", "none",
        "-chardev", f"socket,id=qmp,path={_escape(str(paths.qmp_socket))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=serial0,path={_escape(str(paths.serial_socket))},server=on,wait=off,"
        f"logfile={_escape(str(paths.serial_log))},logappend=on",
        "-serial", "chardev:serial0",
        "-device", "virtio-rng-pci",
        "-device", "pvpanic",
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-chardev",
        f"socket,id=qga0,path={_escape(str(paths.guest_agent_socket))},server=on,wait=off",
        "-device", "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    if paths.vnc_socket is not None:
        argv += ["-device", "VGA", "-vnc", f"unix:{_escape(str(paths.vnc_socket))}"]
    if plan.kernel_boot is not None:
        argv += ["-kernel", str(plan.kernel_boot.kernel)]
        if plan.kernel_boot.initrd is not None:
            argv += ["-initrd", str(plan.kernel_boot.initrd)]
        argv += ["-append", plan.kernel_boot.cmdline]
    for index, disk in enumerate(plan.disks):
        device = f"virtio-blk-pci,drive={disk.node},id={disk_device_id(disk.node)}"
        device += f",serial={disk.serial}"
        if index == 0 and plan.kernel_boot is None:
            device += ",bootindex=0"
        argv += ["-blockdev", blockdev_options(disk), "-device", device]
    for nic in plan.nics:
        argv += [
            "-netdev", f"tap,id={nic.id},ifname={nic.tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev={nic.id},mac={nic.mac},id=dev-{nic.id}",
        ]  # fmt: skip
    for index in range(plan.hotplug_slots if plan.machine.startswith("q35") else 0):
        argv += ["-device", _hotplug_port_device(index)]
    if plan.incoming:
        argv += ["-incoming", "defer"]
    argv += [
        "-action", "reboot=reset,shutdown=poweroff,panic=shutdown",
        "-msg", "timestamp=on",
        "-daemonize",
        "-pidfile", str(paths.pidfile),
    ]  # fmt: skip
    return argv


def _hotplug_port_device(index: int) -> str:
    """A free PCIe root port. Eight share one slot as functions (slots 0x18 and up), so
    thirty ports fit on the root bus next to the devices QEMU places itself."""
    slot, function = _FIRST_HOTPLUG_SLOT + index // 8, index % 8
    device = (
        f"pcie-root-port,id={hotplug_port(index)},chassis={index + 1},"
        f"bus=pcie.0,addr={slot:#x}.{function}"
    )
    return device + (",multifunction=on" if function == 0 else "")


def _smbios(plan: QemuPlan) -> str:
    fields = {
        "manufacturer": "nubes",
        "product": SMBIOS_PRODUCT,
        "serial": plan.vm_id,
        "uuid": vm_uuid(plan.vm_id),
        **plan.extra_smbios,
    }
    return "type=1," + ",".join(f"{key}={_escape(value)}" for key, value in fields.items())


def _escape(value: str) -> str:
    """QEMU option values separate with commas; a literal comma is written twice."""
    return value.replace(",", ",,")
