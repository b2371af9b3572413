"""The control plane's janitor: what a deleted VM leaves in the store goes with it.

A deleted VM's allocation is released, the ports made for it (`auto_delete`) are deleted
and its other ports unplugged; floating IPs of a deleted port are unbound. Every write is
compare-and-swap on the record read, so a janitor racing the API or another janitor
changes nothing twice. A resync finds what a crash left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from nubes.errors import InvalidInput
from nubes.model.network import FloatingIpRecord, PortRecord
from nubes.scheduler.binding import release
from nubes.store.base import Compare, Delete, JsonValue, KeyValue, Put, Store, TxnOperation
from nubes.store.keys import Kind, claim_key, resource_key, status_key

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 10

PortDeletion = Callable[[PortRecord], Sequence[TxnOperation]]
"""The writes that delete a port: its record and status, and whatever the API keeps
beside it (name and address claims, usage), all in one transaction."""


def delete_port_records(port: PortRecord) -> list[TxnOperation]:
    """The default PortDeletion: the port's record and its status."""
    return [Delete(resource_key(Kind.PORT, port.id)), Delete(status_key(Kind.PORT, port.id))]


def _field(value: JsonValue, *path: str) -> JsonValue:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class Janitor:
    """Keeps who-points-at-whom (ports → VM, floating IPs → port) from the watches, and
    cleans up after deletions."""

    def __init__(self, store: Store, port_deletion: PortDeletion = delete_port_records) -> None:
        self.store = store
        self.port_deletion = port_deletion
        self.port_vm: dict[str, tuple[str, bool]] = {}  # port -> (VM, auto_delete)
        self.vm_ports: dict[str, set[str]] = {}
        self.fip_port: dict[str, str] = {}
        self.port_fips: dict[str, set[str]] = {}
        # Seen pointing at a missing record in the last sweep: acted on if still so in
        # the next, since the API may write a port before the VM it is made for.
        self._suspect_ports: set[str] = set()
        self._suspect_fips: set[str] = set()

    # -- the index ----------------------------------------------------------------------

    def on_port(self, port_id: str, value: JsonValue | None) -> None:
        old = self.port_vm.pop(port_id, None)
        if old is not None:
            self.vm_ports.get(old[0], set()).discard(port_id)
        vm = _field(value, "spec", "vm")
        if isinstance(vm, str):
            self.port_vm[port_id] = (vm, _field(value, "spec", "auto_delete") is True)
            self.vm_ports.setdefault(vm, set()).add(port_id)

    def on_floating_ip(self, fip_id: str, value: JsonValue | None) -> None:
        old = self.fip_port.pop(fip_id, None)
        if old is not None:
            self.port_fips.get(old, set()).discard(fip_id)
        port = _field(value, "spec", "port")
        if isinstance(port, str):
            self.fip_port[fip_id] = port
            self.port_fips.setdefault(port, set()).add(fip_id)

    def clear(self) -> None:
        self.port_vm.clear()
        self.vm_ports.clear()
        self.fip_port.clear()
        self.port_fips.clear()

    # -- after a deletion ---------------------------------------------------------------

    async def vm_gone(self, vm_id: str, host: str | None, ports: Iterable[str]) -> None:
        """The VM's record is deleted: release its room, delete or unplug its ports."""
        if host is not None:
            try:
                if not await release(self.store, host, {vm_id}):
                    log.warning("%s: could not release it on %s (busy); resync will", vm_id, host)
            except InvalidInput as error:
                log.error("%s: cannot release it on %s: %s", vm_id, host, error)
        for port_id in sorted(set(ports) | self.vm_ports.pop(vm_id, set())):
            await self.unplug_port(port_id, vm_id)

    async def unplug_port(self, port_id: str, vm_id: str) -> None:
        """Deletes the port if it was made for `vm_id`, else clears its `spec.vm`."""
        key = resource_key(Kind.PORT, port_id)
        for _ in range(CAS_ATTEMPTS):
            kv = await self.store.get(key)
            if kv is None:
                return
            try:
                port = PortRecord.from_json(kv.value)
            except InvalidInput as error:
                log.error("port %s: unreadable, left as it is: %s", port_id, error)
                return
            if port.spec.vm != vm_id:
                return
            operations: Sequence[TxnOperation]
            if port.spec.auto_delete:
                operations = self.port_deletion(port)
            else:
                spec = port.spec.model_copy(update={"vm": None})
                operations = [Put(key, port.model_copy(update={"spec": spec}).to_json())]
            if (await self.store.txn([Compare.unchanged(kv)], operations)).succeeded:
                if port.spec.auto_delete:
                    log.info("port %s: deleted with VM %s", port_id, vm_id)
                    await self.port_gone(port_id)
                return
        log.warning("port %s: kept changing; the next resync looks again", port_id)

    async def port_gone(self, port_id: str) -> None:
        """The port's record is deleted: floating IPs that pointed at it point nowhere."""
        for fip_id in sorted(self.port_fips.pop(port_id, set())):
            await self.unbind_floating_ip(fip_id, port_id)

    async def unbind_floating_ip(self, fip_id: str, port_id: str) -> None:
        key = resource_key(Kind.FLOATING_IP, fip_id)
        for _ in range(CAS_ATTEMPTS):
            kv = await self.store.get(key)
            if kv is None:
                return
            try:
                fip = FloatingIpRecord.from_json(kv.value)
            except InvalidInput as error:
                log.error("floating IP %s: unreadable, left as it is: %s", fip_id, error)
                return
            if fip.spec.port != port_id:
                return
            spec = fip.spec.model_copy(update={"port": None, "fixed_ip": None})
            value = fip.model_copy(update={"spec": spec}).to_json()
            operations: list[TxnOperation] = [Put(key, value)]
            if fip.spec.fixed_ip is not None:
                # The API's claim giving that port address to this floating IP goes too.
                operations.append(Delete(claim_key(f"fip-{port_id}", fip.spec.fixed_ip)))
            if (await self.store.txn([Compare.unchanged(kv)], operations)).succeeded:
                log.info("floating IP %s: unbound from deleted port %s", fip_id, port_id)
                return
        log.warning("floating IP %s: kept changing; the next resync looks again", fip_id)

    async def delete_unbound(self, vm_kv: KeyValue) -> None:
        """A VM marked deleting before it had a host has nothing on a host to tear down:
        its record and status go now (unless it changed meanwhile)."""
        vm_id = vm_kv.key.rsplit("/", 1)[-1]
        result = await self.store.txn(
            [Compare.unchanged(vm_kv)], [Delete(vm_kv.key), Delete(status_key(Kind.VM, vm_id))]
        )
        if result.succeeded:
            log.info("%s: deleted before it was placed", vm_id)

    # -- after a crash ------------------------------------------------------------------

    async def sweep(
        self,
        vm_ids: set[str],
        allocations: dict[str, set[str]],
        ports: list[KeyValue],
        floating_ips: list[KeyValue],
    ) -> None:
        """Cleans what deleted VMs and ports left: `vm_ids` are the VMs listed after the
        hosts' `allocations` (host -> VMs), so an allocation of a VM not listed is stale."""
        for host, allocated in sorted(allocations.items()):
            stale = allocated - vm_ids
            if stale:
                log.warning("host %s: releasing %d deleted VMs: %s", host, len(stale), stale)
                await self.vm_gone_allocations(host, stale)
        port_ids = set()
        suspects: dict[str, str] = {}
        for kv in ports:
            port_id = kv.key.rsplit("/", 1)[-1]
            port_ids.add(port_id)
            vm = _field(kv.value, "spec", "vm")
            if isinstance(vm, str) and vm not in vm_ids:
                suspects[port_id] = vm
        for port_id, vm in sorted(suspects.items()):
            if port_id in self._suspect_ports:
                await self.unplug_port(port_id, vm)
        self._suspect_ports = set(suspects)
        fip_suspects: dict[str, str] = {}
        for kv in floating_ips:
            port = _field(kv.value, "spec", "port")
            if isinstance(port, str) and port not in port_ids:
                fip_suspects[kv.key.rsplit("/", 1)[-1]] = port
        for fip_id, port in sorted(fip_suspects.items()):
            if fip_id in self._suspect_fips:
                await self.unbind_floating_ip(fip_id, port)
        self._suspect_fips = set(fip_suspects)

    async def vm_gone_allocations(self, host: str, vm_ids: set[str]) -> None:
        try:
            await release(self.store, host, vm_ids)
        except InvalidInput as error:
            log.error("host %s: cannot release %s: %s", host, sorted(vm_ids), error)
