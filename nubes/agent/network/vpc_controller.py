"""The reconciler of one VPC on this host: its namespace, subnet bridges and VXLANs, the
taps of the ports claimed here, firewall, DHCP, metadata listeners, external gateway and
floating IPs.

Each pass rebuilds the plan from the store and makes the host match it, idempotently;
the firewall is replaced in one atomic load. With no port claimed here, the pass tears
the VPC down from this host (the reference count of the design: the namespace goes with
its last subnet, the subnet with its last port).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from typing import TYPE_CHECKING

from nubes.agent.controller import Controller
from nubes.agent.network import conntrack, firewall, forwarding, links, names
from nubes.agent.network.dhcp import Dnsmasq
from nubes.agent.network.overlay import build_overlay_plan
from nubes.agent.network.plan import VpcPlan
from nubes.agent.network.planner import PlanProblem, build_vpc_plan
from nubes.agent.status import StatusWriter, differs
from nubes.errors import NubesError
from nubes.model.common import now
from nubes.model.network import FloatingIpStatus, LinkState, PortStatus
from nubes.store.keys import Kind, status_key

if TYPE_CHECKING:
    from nubes.agent.network.manager import NetworkManager

log = logging.getLogger(__name__)

METADATA_ADDRESS = ipaddress.IPv4Interface("169.254.169.254/32")


class VpcController(Controller):
    """Owns one VPC's presence on this host while ports of it are claimed here."""

    def __init__(self, manager: NetworkManager, vpc_id: str) -> None:
        super().__init__(manager.ctx, Kind.NETWORK, vpc_id)
        self.manager = manager
        self.vpc_id = vpc_id
        prefix = manager.ctx.config.prefix
        self.netns = names.netns_name(prefix, vpc_id)
        self.dnsmasq = Dnsmasq(
            self.netns, manager.ctx.paths.run_dir / "vpcs" / vpc_id, marker=f"nubes:{prefix}"
        )
        self.plan: VpcPlan | None = None
        self._asked = 0
        self._applied = 0
        self._failure: tuple[int, NubesError] | None = None
        self._passed = asyncio.Condition()
        self._port_writers: dict[str, StatusWriter] = {}
        self._fip_writers: dict[str, StatusWriter] = {}
        self._external_made = False
        self._floating: dict[ipaddress.IPv4Address, ipaddress.IPv4Address] = {}
        self._written: dict[str, PortStatus | FloatingIpStatus] = {}
        self._full_pass = True  # False: only the overlay entries may have changed
        self._unreachable_logged: frozenset[str] = frozenset()

    def kick(self, *, resync: bool = False) -> None:
        self._full_pass = True
        super().kick(resync=resync)

    def kick_overlay(self) -> None:
        """Asks for a pass that only reprograms the VXLANs' forwarding and neighbour
        entries (a port moved between other hosts); any other kick makes it a full pass."""
        super().kick()

    def has_subnet(self, subnet_id: str) -> bool:
        """Whether the subnet is on this host, as the last pass made it."""
        return self.plan is not None and any(s.subnet_id == subnet_id for s in self.plan.subnets)

    # -- asked by VM controllers -----------------------------------------------------------

    def ask(self) -> int:
        """Asks for a pass that sees the claims made so far; returns its number."""
        self._asked += 1
        self.kick()
        return self._asked

    async def wait_applied(self, number: int) -> None:
        """Waits for the pass `ask` numbered to have been applied.

        Raises:
            NubesError: that pass failed; the message says what could not be made.
        """
        async with self._passed:
            while self._applied < number:
                if self._failure is not None and self._failure[0] >= number:
                    raise self._failure[1]
                await self._passed.wait()

    # -- one pass --------------------------------------------------------------------------

    async def reconcile(self, *, resync: bool = False) -> None:
        full, self._full_pass = self._full_pass, False
        if not full and not resync and self.plan is not None:
            try:
                await self._converge_overlay(self.plan)
            except Exception:
                self._full_pass = True
                raise
            return
        number = self._asked
        try:
            await self._converge()
        except Exception as error:
            failure = (
                error
                if isinstance(error, NubesError)
                else NubesError(f"setting up network {self.vpc_id} failed: {error}")
            )
            async with self._passed:
                self._failure = (number, failure)
                self._passed.notify_all()
            raise
        async with self._passed:
            self._applied = max(self._applied, number)
            self._failure = None
            self._passed.notify_all()

    async def _converge(self) -> None:
        ctx = self.ctx
        plan, problems = build_vpc_plan(
            prefix=ctx.config.prefix,
            vpc_id=self.vpc_id,
            records=self.manager.records,
            claimed=self.manager.claimed_ports(self.vpc_id),
            vms=ctx.vms,
            external_bridges=ctx.config.external_bridges,
        )
        if not plan.ports:
            await self._teardown()
            if not self.manager.claimed_ports(self.vpc_id):
                self.finished = True
            else:
                self.kick()  # a VM claimed a port while we tore down: build again
            return
        await links.ensure_netns(self.netns)
        existing = await links.list_links(self.netns)
        for subnet in plan.subnets:
            addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
            if subnet.gateway is not None:
                addresses.append(
                    ipaddress.IPv4Interface(f"{subnet.gateway}/{subnet.cidr.prefixlen}")
                )
            if subnet.ipv6_gateway is not None and subnet.ipv6_cidr is not None:
                addresses.append(
                    ipaddress.IPv6Interface(f"{subnet.ipv6_gateway}/{subnet.ipv6_cidr.prefixlen}")
                )
            await links.ensure_bridge(
                self.netns, subnet.bridge, mtu=subnet.mtu, addresses=addresses
            )
            await links.ensure_vxlan(
                self.netns,
                subnet.vxlan,
                staging_name=names.vxlan_staging_name(ctx.config.prefix, subnet.vni),
                vni=subnet.vni,
                local=ctx.config.underlay_address,
                bridge=subnet.bridge,
                mtu=subnet.mtu,
                dstport=ctx.config.vxlan_port,
                underlay_netns=ctx.config.underlay_netns,
            )
        await self._converge_overlay(plan)
        for port in plan.ports:
            subnet_plan = plan.subnet(port.subnet_id)
            await links.ensure_tap(
                self.netns, port.tap, bridge=subnet_plan.bridge, mtu=subnet_plan.mtu
            )
        await self._remove_stale_links(plan, existing)
        await links.ensure_address(self.netns, "lo", METADATA_ADDRESS)
        plan = await self._converge_external(plan, problems)
        await firewall.apply_ruleset(self.netns, firewall.build_ruleset(plan))
        await self._forget_moved_floating_ips(plan)
        if any(subnet.dhcp for subnet in plan.subnets):
            await self.dnsmasq.ensure(plan)
        else:
            await self.dnsmasq.stop()
        served = [subnet.bridge for subnet in plan.subnets if subnet.gateway is not None]
        await self.manager.metadata.add_vpc(self.vpc_id, self.netns, served)
        self.plan = plan
        self.manager.plan_applied(self.vpc_id, plan)
        await self._write_statuses(plan, problems)

    async def _converge_overlay(self, plan: VpcPlan) -> None:
        """Each subnet's VXLAN carries the flood, FDB and neighbour entries of the ports
        active on other hosts (l2pop, overlay.py)."""
        started = time.perf_counter()
        manager = self.manager
        unreachable: set[str] = set()
        for subnet in plan.subnets:
            overlay = build_overlay_plan(
                host=self.ctx.host,
                subnet=subnet,
                records=manager.records,
                port_statuses=manager.port_statuses,
                underlays=manager.underlays,
            )
            unreachable |= overlay.unreachable_hosts
            changes = await forwarding.ensure_overlay(self.netns, subnet.vxlan, overlay)
            if changes.written or changes.removed:
                log.debug(
                    "%s: overlay of %s: %d written, %d removed in %.1f ms",
                    self.vpc_id,
                    subnet.subnet_id,
                    changes.written,
                    changes.removed,
                    (time.perf_counter() - started) * 1000,
                )
        if unreachable and frozenset(unreachable) != self._unreachable_logged:
            log.warning(
                "%s: ports are active on hosts with no known underlay address: %s",
                self.vpc_id,
                ", ".join(sorted(unreachable)),
            )
        self._unreachable_logged = frozenset(unreachable)

    async def _remove_stale_links(self, plan: VpcPlan, existing: dict[str, str]) -> None:
        wanted = {port.tap for port in plan.ports}
        for subnet in plan.subnets:
            wanted.update((subnet.bridge, subnet.vxlan))
        # VXLANs and taps first, then the bridges they were on.
        stale = [n for n in existing if n.startswith(("tp-", "vx-")) and n not in wanted]
        stale += [n for n in existing if n.startswith("br-") and n not in wanted]
        for name in stale:
            await links.delete_link(self.netns, name)

    async def _converge_external(self, plan: VpcPlan, problems: list[PlanProblem]) -> VpcPlan:
        """Makes the external gateway and floating IPs; the plan comes back without them
        when the host cannot make them (the VPC still works inside)."""
        external = plan.external
        host_link = names.external_host_link(self.ctx.config.prefix, self.vpc_id)
        if external is None:
            if self._external_made or self.plan is None:
                await links.remove_external(self.netns, host_link=host_link)
                self._external_made = False
            return plan
        try:
            await links.ensure_external(
                self.netns,
                link=external.link,
                host_link=external.host_link,
                host_bridge=external.host_bridge,
                address=external.address,
                gateway=external.gateway,
            )
        except NubesError as error:
            # The VPC works inside without its way out; the floating IPs say why.
            problems.append(PlanProblem(self.vpc_id, error.message))
            return dataclasses.replace(plan, external=None, floating_ips=())
        self._external_made = True
        mapping = {
            fip.address: (fip.fixed_ip, plan.subnet(self._subnet_of(plan, fip.port_id)).bridge)
            for fip in plan.floating_ips
        }
        await links.ensure_floating_ips(self.netns, link=external.link, mapping=mapping)
        return plan

    async def _forget_moved_floating_ips(self, plan: VpcPlan) -> None:
        """Connections through a floating IP that left its port or moved end with it."""
        now_mapped = {fip.address: fip.fixed_ip for fip in plan.floating_ips}
        moved = [a for a, fixed in self._floating.items() if now_mapped.get(a) != fixed]
        if moved:
            forgotten = await conntrack.forget_connections_async(self.netns, moved)
            log.info("%s: forgot %d connections of %s", self.vpc_id, forgotten, moved)
        self._floating = now_mapped

    @staticmethod
    def _subnet_of(plan: VpcPlan, port_id: str) -> str:
        return next(port.subnet_id for port in plan.ports if port.port_id == port_id)

    async def _teardown(self) -> None:
        await self.manager.metadata.remove_vpc(self.vpc_id)
        self.manager.plan_applied(self.vpc_id, None)
        await self.dnsmasq.stop()
        host_link = names.external_host_link(self.ctx.config.prefix, self.vpc_id)
        await links.remove_external(self.netns, host_link=host_link)
        # Deleting the namespace deletes every link in it, and its nftables tables.
        await links.delete_netns(self.netns)
        self.plan = None
        self._external_made = False
        self._floating = {}
        await self._write_statuses(None, [])

    # -- statuses --------------------------------------------------------------------------

    async def _write_statuses(self, plan: VpcPlan | None, problems: list[PlanProblem]) -> None:
        records = self.manager.records
        host = self.ctx.host
        active = {port.port_id: port for port in (plan.ports if plan else ())}
        held = self.manager.held_ports(self.vpc_id)
        for port_id in sorted(set(active) | set(self._port_writers)):
            if port_id in held:
                continue  # neither written nor released: the source owns it until the switch
            writer = self._port_writers.setdefault(
                port_id, StatusWriter(self.ctx.store, status_key(Kind.PORT, port_id))
            )
            port = active.get(port_id)
            if port is not None:
                status = PortStatus(
                    state=LinkState.ACTIVE,
                    host=host,
                    vm=port.vm_id,
                    device=port.tap,
                    updated_at=now(),
                )
                await self._write(writer, PortStatus, status)
                continue
            await self._release_status(writer, records.ports.get(port_id) is not None, PortStatus)
            del self._port_writers[port_id]
        reasons = {p.subject: p.message for p in problems}
        vpc_problem = reasons.get(self.vpc_id)
        floating = {fip.fip_id: fip for fip in (plan.floating_ips if plan else ())}
        ports_here = set(active)
        for fip_id, record in sorted(records.floating_ips.items()):
            if record.spec.port not in ports_here and fip_id not in self._fip_writers:
                continue
            writer = self._fip_writers.setdefault(
                fip_id, StatusWriter(self.ctx.store, status_key(Kind.FLOATING_IP, fip_id))
            )
            if fip_id in floating:
                fip_status = FloatingIpStatus(
                    state=LinkState.ACTIVE,
                    host=host,
                    fixed_ip=str(floating[fip_id].fixed_ip),
                    updated_at=now(),
                )
            elif record.spec.port in ports_here:
                fip_status = FloatingIpStatus(
                    state=LinkState.ERROR,
                    reason=reasons.get(fip_id) or vpc_problem or "not set up on this host",
                    host=host,
                    updated_at=now(),
                )
            else:
                await self._release_status(writer, True, FloatingIpStatus)
                del self._fip_writers[fip_id]
                continue
            await self._write(writer, FloatingIpStatus, fip_status)
        for fip_id in [f for f in self._fip_writers if f not in records.floating_ips]:
            await self._release_status(self._fip_writers.pop(fip_id), False, FloatingIpStatus)

    async def _write(
        self,
        writer: StatusWriter,
        model: type[PortStatus] | type[FloatingIpStatus],
        status: PortStatus | FloatingIpStatus,
    ) -> None:
        old = self._written.get(writer.key)
        if old is None:
            known = await writer.read()
            if known is not None:
                try:
                    old = model.from_json(known.value)
                except NubesError:
                    old = None
        if differs(old, status) and not await writer.write(status):
            await writer.write(status)  # it changed under us: once more on what is there
        self._written[writer.key] = status

    async def _release_status(
        self,
        writer: StatusWriter,
        record_exists: bool,
        model: type[PortStatus] | type[FloatingIpStatus],
    ) -> None:
        """The thing left this host: say it is down here, or drop the status with the record."""
        self._written.pop(writer.key, None)
        known = await writer.read()
        if known is None:
            return
        try:
            old = model.from_json(known.value)
        except NubesError:
            old = None
        if old is not None and old.host not in (None, self.ctx.host):
            return  # another host owns it now
        if not record_exists:
            await writer.delete()
            return
        if isinstance(old, PortStatus):
            await writer.write(
                PortStatus(state=LinkState.DOWN, host=self.ctx.host, updated_at=now())
            )
        else:
            await writer.write(FloatingIpStatus(state=LinkState.DOWN, updated_at=now()))
