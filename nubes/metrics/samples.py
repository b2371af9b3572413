"""What one scrape of an agent saw (its host and each VM's QEMU), and how it reads as
Prometheus metric families. Pure: the agent gathers samples, this renders them.

Network counters are named from the guest's point of view: what the guest sends
arrives on its tap, so a tap's receive counters are the guest's transmit counters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

MIB = 1024 * 1024

# The host record's capacity, served by the API (from the store) and by the agent (what
# it registered): one HELP text each, so the two endpoints describe them alike.
HOST_CAPACITY_HELP = {
    "nubes_host_capacity_vcpus": "CPUs the host offers guests (its host record's capacity)",
    "nubes_host_capacity_memory_bytes": (
        "Memory the host offers guests (its host record's capacity)"
    ),
    "nubes_host_capacity_disk_bytes": (
        "Disk the host offers guests (its host record's capacity.disk_gb, in bytes)"
    ),
}


@dataclass(frozen=True, slots=True)
class DiskCounters:
    """One block device of a VM, as the guest sees it (QMP query-blockstats)."""

    disk: str  # the block node: "root", or the vol- id of a volume
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int


@dataclass(frozen=True, slots=True)
class NicCounters:
    """One NIC of a VM, counted from the guest's side of its tap."""

    port: str
    interface: str  # the tap in the VPC namespace
    receive_bytes: int
    receive_packets: int
    transmit_bytes: int
    transmit_packets: int


@dataclass(frozen=True, slots=True)
class VmSample:
    vm: str
    project: str
    vcpus: int
    memory_bytes: int  # what the guest was given (its flavor)
    cpu_seconds: float
    resident_bytes: int  # what QEMU holds in RAM: guest pages touched plus QEMU itself
    disks: Sequence[DiskCounters] = ()
    nics: Sequence[NicCounters] = ()


@dataclass(frozen=True, slots=True)
class HostSample:
    host: str
    capacity_vcpus: int
    capacity_memory_bytes: int
    capacity_disk_bytes: int
    state_dir_free_bytes: int
    state_dir_size_bytes: int


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    host: HostSample
    vms: Sequence[VmSample] = field(default_factory=tuple)


def parse_blockstats(result: Any) -> list[DiskCounters]:
    """The guest-side counters of each block node from a query-blockstats answer; an
    entry whose counters are not numbers is left out, the other disks are kept."""
    disks = []
    for entry in result if isinstance(result, list) else []:
        node = entry.get("node-name") if isinstance(entry, dict) else None
        stats = entry.get("stats") if isinstance(entry, dict) else None
        if not node or not isinstance(stats, dict):
            continue  # a backend without a node name is not one of our disks
        try:
            disk = DiskCounters(
                disk=str(node),
                read_bytes=int(stats.get("rd_bytes", 0)),
                write_bytes=int(stats.get("wr_bytes", 0)),
                read_ops=int(stats.get("rd_operations", 0)),
                write_ops=int(stats.get("wr_operations", 0)),
            )
        except (TypeError, ValueError):
            continue
        disks.append(disk)
    return disks


def render_snapshot(snapshot: AgentSnapshot) -> Iterator[Metric]:
    """Every host and per-VM metric family of one scrape."""
    yield from _render_host(snapshot)
    yield from _render_vms(snapshot.vms)


def _render_host(snapshot: AgentSnapshot) -> Iterator[Metric]:
    host = snapshot.host
    running = snapshot.vms

    def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=["host"])
        family.add_metric([host.host], value)
        return family

    yield gauge("nubes_agent_up", "1 while the host's agent runs and answers", 1)
    for name, value in (
        ("nubes_host_capacity_vcpus", host.capacity_vcpus),
        ("nubes_host_capacity_memory_bytes", host.capacity_memory_bytes),
        ("nubes_host_capacity_disk_bytes", host.capacity_disk_bytes),
    ):
        yield gauge(name, HOST_CAPACITY_HELP[name], value)
    yield gauge("nubes_host_vms_running", "QEMU processes running on the host", len(running))
    yield gauge(
        "nubes_host_used_vcpus",
        "vCPUs of the VMs running on the host",
        sum(v.vcpus for v in running),
    )
    yield gauge(
        "nubes_host_used_memory_bytes",
        "Guest memory of the VMs running on the host",
        sum(v.memory_bytes for v in running),
    )
    yield gauge(
        "nubes_host_state_dir_free_bytes",
        "Free space on the file system of the agent's state directory",
        host.state_dir_free_bytes,
    )
    yield gauge(
        "nubes_host_state_dir_size_bytes",
        "Size of the file system of the agent's state directory",
        host.state_dir_size_bytes,
    )


def _render_vms(vms: Sequence[VmSample]) -> Iterator[Metric]:
    labels = ["vm", "project"]
    vcpus = GaugeMetricFamily("nubes_vm_vcpus", "vCPUs of the VM's QEMU", labels=labels)
    memory = GaugeMetricFamily(
        "nubes_vm_memory_bytes", "Memory the guest was given (its flavor)", labels=labels
    )
    resident = GaugeMetricFamily(
        "nubes_vm_resident_memory_bytes", "Resident memory of the VM's QEMU process", labels=labels
    )
    cpu = CounterMetricFamily(
        "nubes_vm_cpu_seconds", "CPU time of the VM's QEMU process (user + system)", labels=labels
    )
    disk_labels = [*labels, "disk"]
    disk_families = {
        "read_bytes": CounterMetricFamily(
            "nubes_vm_disk_read_bytes", "Bytes the guest read from a disk", labels=disk_labels
        ),
        "write_bytes": CounterMetricFamily(
            "nubes_vm_disk_write_bytes", "Bytes the guest wrote to a disk", labels=disk_labels
        ),
        "read_ops": CounterMetricFamily(
            "nubes_vm_disk_read_ops", "Read requests the guest made of a disk", labels=disk_labels
        ),
        "write_ops": CounterMetricFamily(
            "nubes_vm_disk_write_ops", "Write requests the guest made of a disk", labels=disk_labels
        ),
    }
    nic_labels = [*labels, "port", "interface"]
    nic_families = {
        "receive_bytes": CounterMetricFamily(
            "nubes_vm_network_receive_bytes", "Bytes the guest received", labels=nic_labels
        ),
        "receive_packets": CounterMetricFamily(
            "nubes_vm_network_receive_packets", "Packets the guest received", labels=nic_labels
        ),
        "transmit_bytes": CounterMetricFamily(
            "nubes_vm_network_transmit_bytes", "Bytes the guest sent", labels=nic_labels
        ),
        "transmit_packets": CounterMetricFamily(
            "nubes_vm_network_transmit_packets", "Packets the guest sent", labels=nic_labels
        ),
    }
    for vm in vms:
        key = [vm.vm, vm.project]
        vcpus.add_metric(key, vm.vcpus)
        memory.add_metric(key, vm.memory_bytes)
        resident.add_metric(key, vm.resident_bytes)
        cpu.add_metric(key, vm.cpu_seconds)
        for disk in vm.disks:
            for attribute, family in disk_families.items():
                family.add_metric([*key, disk.disk], getattr(disk, attribute))
        for nic in vm.nics:
            for attribute, family in nic_families.items():
                family.add_metric([*key, nic.port, nic.interface], getattr(nic, attribute))
    yield from (vcpus, memory, resident, cpu)
    yield from disk_families.values()
    yield from nic_families.values()


def nic_counters_from_tap(
    port: str, interface: str, rx_bytes: int, rx_packets: int, tx_bytes: int, tx_packets: int
) -> NicCounters:
    """Turns a tap's host-side counters round: the tap receives what the guest sends."""
    return NicCounters(
        port=port,
        interface=interface,
        receive_bytes=tx_bytes,
        receive_packets=tx_packets,
        transmit_bytes=rx_bytes,
        transmit_packets=rx_packets,
    )
