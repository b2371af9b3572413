"""The orphan sweep: what this host holds that the store does not know of — QEMU processes,
VM directories, volume files, cached images, cgroups, VPC namespaces (with their dnsmasq)
and host links carrying this agent's marks.

`find_orphans` only looks; `remove_orphans` removes, checking each one against the
store again right before, so a record created meanwhile is never swept.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from nubes.agent.compute.cgroup import CpuWeights
from nubes.agent.compute.process import scan_qemu_processes, signal_process, wait_exited
from nubes.agent.network import names
from nubes.agent.network.dhcp import Dnsmasq
from nubes.agent.network.links import delete_link, delete_netns, list_netns
from nubes.agent.paths import AgentPaths
from nubes.errors import InvalidInput
from nubes.ids import IdKind, is_id
from nubes.model.network import PortRecord
from nubes.model.vm import VmRecord
from nubes.model.volume import VolumeRecord
from nubes.store.base import Store
from nubes.store.keys import Kind, kind_prefix, resource_key

KILL_WAIT_SECONDS = 5.0


class OrphanKind(StrEnum):
    PROCESS = "process"
    VM_FILES = "vm-files"
    VOLUME = "volume"
    CACHED_IMAGE = "cached-image"
    CGROUP = "cgroup"
    NAMESPACE = "namespace"
    LINK = "link"


@dataclass(frozen=True)
class Orphan:
    kind: OrphanKind
    id: str
    where: str  # a pid or a path, for people

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "id": self.id, "where": self.where}


async def _known(store: Store, host: str) -> tuple[set[str], set[str], set[str]]:
    """(VMs bound here, volumes kept here, images that exist) according to the store."""
    vms: set[str] = set()
    for kv in (await store.range(kind_prefix(Kind.VM))).kvs:
        if kv.key.count("/") != 3:
            continue
        with contextlib.suppress(InvalidInput):
            record = VmRecord.from_json(kv.value)
            if record.spec.host == host:
                vms.add(record.id)
    volumes: set[str] = set()
    for kv in (await store.range(kind_prefix(Kind.VOLUME))).kvs:
        if kv.key.count("/") != 3:
            continue
        with contextlib.suppress(InvalidInput):
            volume = VolumeRecord.from_json(kv.value)
            if volume.spec.host == host:
                volumes.add(volume.id)
    images = {
        kv.key.rsplit("/", 1)[1]
        for kv in (await store.range(kind_prefix(Kind.IMAGE))).kvs
        if kv.key.count("/") == 3
    }
    return vms, volumes, images


async def find_orphans(store: Store, host: str, prefix: str, paths: AgentPaths) -> list[Orphan]:
    """Everything on this host with the agent's marks that the store does not know."""
    vms, volumes, images = await _known(store, host)
    orphans = [
        Orphan(OrphanKind.PROCESS, vm_id, str(pid))
        for vm_id, pid in sorted(scan_qemu_processes(prefix).items())
        if vm_id not in vms
    ]
    for directory in (paths.vms_state, paths.vms_run):
        for entry in _entries(directory):
            if is_id(entry.name, IdKind.VM) and entry.name not in vms:
                orphans.append(Orphan(OrphanKind.VM_FILES, entry.name, str(entry)))
    for entry in _entries(paths.volumes):
        volume_id = entry.name.removesuffix(".qcow2")
        if is_id(volume_id, IdKind.VOLUME) and volume_id not in volumes:
            orphans.append(Orphan(OrphanKind.VOLUME, volume_id, str(entry)))
    for entry in _entries(paths.image_cache):
        if is_id(entry.name, IdKind.IMAGE) and entry.name not in images:
            orphans.append(Orphan(OrphanKind.CACHED_IMAGE, entry.name, str(entry)))
    orphans.extend(
        Orphan(OrphanKind.CGROUP, vm_id, "cgroup") for vm_id in CpuWeights(prefix).orphans(vms)
    )
    orphans.extend(await _network_orphans(store, host, prefix))
    return orphans


async def _vpcs_in_use(store: Store, host: str) -> set[str]:
    """The VPCs some VM bound to this host has a port in."""
    ports: set[str] = set()
    for kv in (await store.range(kind_prefix(Kind.VM))).kvs:
        if kv.key.count("/") == 3:
            with contextlib.suppress(InvalidInput):
                record = VmRecord.from_json(kv.value)
                if record.spec.host == host:
                    ports.update(record.spec.ports)
    vpcs: set[str] = set()
    for kv in (await store.range(kind_prefix(Kind.PORT))).kvs:
        if kv.key.count("/") == 3 and kv.key.rsplit("/", 1)[1] in ports:
            with contextlib.suppress(InvalidInput):
                vpcs.add(PortRecord.from_json(kv.value).spec.network)
    return vpcs


async def _network_orphans(store: Store, host: str, prefix: str) -> list[Orphan]:
    in_use = await _vpcs_in_use(store, host)
    orphans = []
    for netns in list_netns(prefix):
        vpc_id = names.vpc_of_netns(prefix, netns)
        if vpc_id is not None and vpc_id not in in_use:
            orphans.append(Orphan(OrphanKind.NAMESPACE, vpc_id, netns))
    # VXLAN devices stranded between creation and their move into a namespace, and
    # external veths whose namespace is gone.
    staging = re.compile(rf"{re.escape(prefix)}[vx][0-9a-z]+")
    for link in _entries(Path("/sys/class/net")):
        if staging.fullmatch(link.name):
            vpc = next(
                (v for v in in_use if names.external_host_link(prefix, v) == link.name), None
            )
            if vpc is None:
                orphans.append(Orphan(OrphanKind.LINK, link.name, link.name))
    return orphans


async def remove_orphans(
    store: Store, host: str, prefix: str, paths: AgentPaths, orphans: list[Orphan]
) -> list[Orphan]:
    """Removes the orphans still unknown to the store; returns those it removed."""
    removed = []
    for orphan in orphans:
        kind = (
            Kind.IMAGE
            if orphan.kind is OrphanKind.CACHED_IMAGE
            else (Kind.VOLUME if orphan.kind is OrphanKind.VOLUME else Kind.VM)
        )
        if orphan.kind in (OrphanKind.NAMESPACE, OrphanKind.LINK):
            if await _network_orphan_removed(store, host, prefix, paths, orphan):
                removed.append(orphan)
            continue
        if await _still_bound(store, kind, orphan.id, host):
            continue
        if orphan.kind is OrphanKind.PROCESS:
            pid = scan_qemu_processes(prefix).get(orphan.id)
            if pid is not None and str(pid) == orphan.where:
                signal_process(pid, signal.SIGKILL)
                await wait_exited(pid, KILL_WAIT_SECONDS)
        elif orphan.kind is OrphanKind.CGROUP:
            CpuWeights(prefix).remove(orphan.id)
        else:
            _remove_path(Path(orphan.where))
        removed.append(orphan)
    return removed


async def _network_orphan_removed(
    store: Store, host: str, prefix: str, paths: AgentPaths, orphan: Orphan
) -> bool:
    if orphan.kind is OrphanKind.LINK:
        await delete_link(None, orphan.where)
        return True
    if orphan.id in await _vpcs_in_use(store, host):
        return False
    directory = paths.run_dir / "vpcs" / orphan.id
    await Dnsmasq(orphan.where, directory, marker=f"nubes:{prefix}").stop()
    await delete_link(None, names.external_host_link(prefix, orphan.id))
    await delete_netns(orphan.where)
    _remove_path(directory)
    return True


async def _still_bound(store: Store, kind: Kind, name: str, host: str) -> bool:
    kv = await store.get(resource_key(kind, name))
    if kv is None:
        return False
    if kind is Kind.IMAGE:
        return True
    host_of = kv.value.get("spec", {}).get("host") if isinstance(kv.value, dict) else None
    return bool(host_of == host)


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []
