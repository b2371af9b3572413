"""Tenant networking of one agent: the network records it follows, the ports its VMs
claim, one VPC controller per VPC present on this host, and the metadata service.

A VM controller calls `prepare` before it starts QEMU (the ports' taps, firewall, DHCP
entries and metadata identity are ready when it returns) and `release` once QEMU is
gone; the VPC controllers do the work and keep it true as records change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nubes.agent.compute.qemu_cmdline import NicPlan
from nubes.agent.context import AgentContext
from nubes.agent.network import names
from nubes.agent.network.links import list_netns
from nubes.agent.network.metadata.documents import InstanceMetadata, NicMetadata
from nubes.agent.network.metadata.server import MetadataServer
from nubes.agent.network.overlay import parse_underlay
from nubes.agent.network.plan import VpcPlan
from nubes.agent.network.planner import NetworkRecords, hostname_of, port_ipv6
from nubes.agent.network.vpc_controller import VpcController
from nubes.errors import InvalidInput, NotFound
from nubes.ids import IdKind, is_id
from nubes.model.host import HostRecord
from nubes.model.network import (
    FloatingIpRecord,
    KeypairRecord,
    NetworkRecord,
    PortRecord,
    PortStatus,
    SubnetRecord,
)
from nubes.model.security_group import SecurityGroupRecord
from nubes.model.vm import VmRecord
from nubes.store.base import JsonValue
from nubes.store.keys import Kind

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class VmNetwork:
    """What QEMU needs to plug a VM's ports: the namespace to run in and its NICs."""

    vpc_id: str
    netns: str
    ports: tuple[str, ...]
    nics: tuple[NicPlan, ...]


@dataclass(frozen=True)
class _Claim:
    vpc_id: str
    ports: tuple[str, ...]


class NetworkManager:
    def __init__(self, ctx: AgentContext, spawn: Callable[[Awaitable[None], str], None]) -> None:
        self.ctx = ctx
        self.records = NetworkRecords()
        self.keypairs: dict[tuple[str, str], KeypairRecord] = {}
        # The overlay across hosts: where each port is active, how each host is reached.
        self.port_statuses: dict[str, PortStatus] = {}
        self.underlays: dict[str, ipaddress.IPv4Address] = {}
        self.metadata = MetadataServer(self.resolve)
        self._spawn = spawn
        self._claims: dict[str, _Claim] = {}
        self._held: set[str] = set()  # VMs arriving by live migration
        self._controllers: dict[str, VpcController] = {}
        # (vpc, address) -> VM id, for the ports whose source address can be trusted
        self._identities: dict[str, dict[IpAddress, str]] = {}

    async def start(self) -> None:
        await self.metadata.start()

    async def stop(self) -> None:
        """Stops serving metadata; namespaces, taps and dnsmasq stay for the next agent."""
        await self.metadata.stop()

    # -- records ---------------------------------------------------------------------------

    def on_record(self, kind: Kind, name: str, value: JsonValue | None) -> None:
        """A network record changed in the store (None: deleted)."""
        table: dict[str, object]
        model: type[NetworkRecord | SubnetRecord | PortRecord | SecurityGroupRecord]
        if kind is Kind.KEYPAIR:
            self._on_keypair(name, value)
            return
        if kind is Kind.NETWORK and is_id(name, IdKind.NETWORK):
            table, model = self.records.networks, NetworkRecord  # type: ignore[assignment]
        elif kind is Kind.SUBNET and is_id(name, IdKind.SUBNET):
            table, model = self.records.subnets, SubnetRecord  # type: ignore[assignment]
        elif kind is Kind.PORT and is_id(name, IdKind.PORT):
            table, model = self.records.ports, PortRecord  # type: ignore[assignment]
        elif kind is Kind.SECURITY_GROUP and is_id(name, IdKind.SECURITY_GROUP):
            table, model = self.records.security_groups, SecurityGroupRecord  # type: ignore[assignment]
        elif kind is Kind.FLOATING_IP and is_id(name, IdKind.FLOATING_IP):
            table, model = self.records.floating_ips, FloatingIpRecord  # type: ignore[assignment]
        else:
            return
        record = None
        if value is not None:
            try:
                record = model.from_json(value)
            except InvalidInput as error:
                log.warning("ignoring invalid %s record %s: %s", kind.value, name, error)
        if record is None:
            table.pop(name, None)
        else:
            table[name] = record
        self._kick_affected(kind, name)

    def on_port_status(self, port_id: str, value: JsonValue | None) -> None:
        """A port's status changed (None: deleted): the VXLANs of its subnet follow it."""
        status = None
        if value is not None:
            with contextlib.suppress(InvalidInput):
                status = PortStatus.from_json(value)
        old = self.port_statuses.get(port_id)
        if status is None:
            self.port_statuses.pop(port_id, None)
        else:
            self.port_statuses[port_id] = status
        where = (status.state, status.host) if status is not None else None
        if old is not None and where == (old.state, old.host):
            return  # the same place: nothing to program
        port = self.records.ports.get(port_id)
        if port is None:
            self._kick_overlays(None)
        else:
            self._kick_overlays(port.spec.subnet)

    def on_host(self, name: str, value: JsonValue | None) -> None:
        """A host record changed (None: deleted): its underlay address may have too."""
        address = None
        if value is not None:
            with contextlib.suppress(InvalidInput):
                address = parse_underlay(HostRecord.from_json(value).underlay_address)
        if self.underlays.get(name) == address:
            return
        if address is None:
            self.underlays.pop(name, None)
        else:
            self.underlays[name] = address
        self._kick_overlays(None)

    def _kick_overlays(self, subnet_id: str | None) -> None:
        """The VPCs here that carry `subnet_id` (None: any) reprogram their VXLANs."""
        for controller in self._controllers.values():
            if subnet_id is None or controller.has_subnet(subnet_id):
                controller.kick_overlay()

    def _on_keypair(self, name: str, value: JsonValue | None) -> None:
        project, _, key_name = name.partition(":")
        if value is None:
            self.keypairs.pop((project, key_name), None)
            return
        with contextlib.suppress(InvalidInput):
            record = KeypairRecord.from_json(value)
            self.keypairs[(record.project, record.name)] = record

    def _kick_affected(self, kind: Kind, name: str) -> None:
        if kind in (Kind.PORT, Kind.SUBNET):
            record = (self.records.ports if kind is Kind.PORT else self.records.subnets).get(name)
            owner = record.spec.network if record is not None else None
            for vpc_id, controller in self._controllers.items():
                if owner is None or owner == vpc_id:
                    controller.kick()
            return
        # Groups, floating IPs and networks (external ones too) can touch any VPC here.
        for controller in self._controllers.values():
            controller.kick()

    # -- claims by VMs ---------------------------------------------------------------------

    async def prepare(self, vm: VmRecord) -> VmNetwork | None:
        """Makes the VM's ports ready on this host; None when it has none.

        Raises:
            NubesError: a port is missing, taken, or not in the VM's one network, or the
                host could not set it up; the message says which and what to do.
        """
        ports = vm.spec.ports
        if not ports:
            self.release(vm.id)
            return None
        vpc_id = self._check_ports(vm)
        previous = self._claims.get(vm.id)
        self._claims[vm.id] = _Claim(vpc_id, tuple(ports))
        if previous is not None and previous.vpc_id != vpc_id:
            self._controller(previous.vpc_id).kick()
        controller = self._controller(vpc_id)
        try:
            await controller.wait_applied(controller.ask())
        except BaseException:
            if previous is None:
                self.release(vm.id)
            raise
        nics = tuple(
            NicPlan(id=f"net{index}", tap=names.tap_name(port_id), mac=self._mac(port_id))
            for index, port_id in enumerate(ports)
        )
        return VmNetwork(vpc_id=vpc_id, netns=controller.netns, ports=tuple(ports), nics=nics)

    def preclaim(self, vm_id: str, vpc_id: str, ports: tuple[str, ...]) -> None:
        """At the agent's start, before any pass: a QEMU still runs with these ports.

        Every VM found running is claimed before the first VPC pass, so that pass never
        takes a neighbour's tap for stale while its VM waits for adoption.
        """
        if ports:
            self._claims[vm_id] = _Claim(vpc_id, ports)

    def adopt(self, vm_id: str, vpc_id: str, ports: tuple[str, ...]) -> None:
        """A running VM was taken over: its ports stay claimed (no wait: they exist)."""
        if ports:
            self._claims[vm_id] = _Claim(vpc_id, ports)
            self._controller(vpc_id).kick()

    def release(self, vm_id: str) -> None:
        """The VM's QEMU is gone from this host for good: its ports may go too."""
        self._held.discard(vm_id)
        claim = self._claims.pop(vm_id, None)
        if claim is not None:
            self._controller(claim.vpc_id).kick()

    def hold_statuses(self, vm_id: str) -> None:
        """A VM arriving by live migration: its ports are set up here (taps, firewall,
        DHCP), but their statuses, and so every host's forwarding to them, stay with the
        source host until the switch transaction moves them."""
        self._held.add(vm_id)

    def release_statuses(self, vm_id: str) -> None:
        """The switch (or a rollback) happened: this host speaks for the VM's ports again."""
        self._held.discard(vm_id)
        claim = self._claims.get(vm_id)
        if claim is not None:
            self._controller(claim.vpc_id).kick()

    def held_ports(self, vpc_id: str) -> set[str]:
        """The ports of `vpc_id` claimed here whose statuses another host owns: those of a
        VM arriving by live migration (the source's until the switch), and those of a VM
        the store has bound elsewhere (moved off this host while it was cut off: its QEMU
        here is about to be fenced, and must never take the port back)."""
        return {
            port_id
            for vm_id, claim in self._claims.items()
            if claim.vpc_id == vpc_id and (vm_id in self._held or self._bound_elsewhere(vm_id))
            for port_id in claim.ports
        }

    def _bound_elsewhere(self, vm_id: str) -> bool:
        vm = self.ctx.vms.get(vm_id)
        return vm is not None and vm.spec.host != self.ctx.host

    def claimed_ports(self, vpc_id: str) -> dict[str, str]:
        """Port id -> VM id, for the ports of `vpc_id` claimed on this host."""
        return {
            port_id: vm_id
            for vm_id, claim in self._claims.items()
            if claim.vpc_id == vpc_id
            for port_id in claim.ports
        }

    def sweep_leftovers(self) -> None:
        """Looks at the VPC namespaces this agent left behind: unclaimed ones go."""
        for netns in list_netns(self.ctx.config.prefix):
            vpc_id = names.vpc_of_netns(self.ctx.config.prefix, netns)
            if vpc_id is not None:
                self._controller(vpc_id).kick()

    def _check_ports(self, vm: VmRecord) -> str:
        networks: dict[str, str] = {}
        if len(set(vm.spec.ports)) != len(vm.spec.ports):
            raise InvalidInput(f"VM {vm.id} lists a port twice", hint="list each port once")
        for port_id in vm.spec.ports:
            port = self.records.ports.get(port_id)
            if port is None or port.deleting:
                raise NotFound(f"port {port_id} does not exist", hint="create the port first")
            if port.spec.vm not in (None, vm.id):
                raise InvalidInput(
                    f"port {port_id} belongs to VM {port.spec.vm}",
                    hint="give the VM a port of its own",
                )
            for other_id, claim in self._claims.items():
                if other_id != vm.id and port_id in claim.ports:
                    raise InvalidInput(
                        f"port {port_id} is in use by VM {other_id}",
                        hint="give the VM a port of its own",
                    )
            network = self.records.networks.get(port.spec.network)
            if network is None or network.deleting:
                raise NotFound(
                    f"network {port.spec.network} of port {port_id} does not exist",
                    hint="create the network, or use a port of an existing one",
                )
            if network.spec.external is not None:
                raise InvalidInput(
                    f"port {port_id} is on external network {network.id}",
                    hint="plug VMs into a tenant network and give them a floating IP",
                )
            subnet = self.records.subnets.get(port.spec.subnet)
            if subnet is None or subnet.deleting or subnet.spec.network != network.id:
                raise NotFound(
                    f"subnet {port.spec.subnet} of port {port_id} does not exist "
                    f"in network {network.id}",
                    hint="create the subnet first",
                )
            for address in port.spec.ipv4:
                if address not in subnet.spec.network_v4:
                    raise InvalidInput(
                        f"port {port_id} has address {address}, outside subnet "
                        f"{subnet.id} ({subnet.spec.cidr})",
                        hint="give the port an address of its subnet",
                    )
            networks[port_id] = network.id
        if len(set(networks.values())) > 1:
            shown = ", ".join(f"{p} is in {n}" for p, n in networks.items())
            raise InvalidInput(
                f"a VM's ports must all be in one network: {shown}",
                hint="route between networks through floating IPs, or use one network",
            )
        return next(iter(networks.values()))

    def _mac(self, port_id: str) -> str:
        return self.records.ports[port_id].spec.mac

    def _controller(self, vpc_id: str) -> VpcController:
        controller = self._controllers.get(vpc_id)
        if controller is None or controller.finished:
            controller = self._controllers[vpc_id] = VpcController(self, vpc_id)
            self._spawn(self._run(vpc_id, controller), f"vpc-{vpc_id}")
        return controller

    async def _run(self, vpc_id: str, controller: VpcController) -> None:
        try:
            await controller.run()
        finally:
            if self._controllers.get(vpc_id) is controller:
                del self._controllers[vpc_id]

    def kick_all(self, *, resync: bool = False) -> None:
        for controller in list(self._controllers.values()):
            controller.kick(resync=resync)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Waits until no VPC controller has a pass running or asked for."""
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.busy() for c in self._controllers.values() if not c.finished):
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.01)

    # -- metadata --------------------------------------------------------------------------

    def plan_applied(self, vpc_id: str, plan: VpcPlan | None) -> None:
        """A VPC controller made `plan` (None: tore the VPC down): who may ask for metadata."""
        if plan is None:
            self._identities.pop(vpc_id, None)
            return
        identities: dict[IpAddress, str] = {}
        for port in plan.ports:
            if not port.port_security or port.vm_id is None:
                continue  # its source address proves nothing
            addresses: list[IpAddress] = [*port.ipv4, *port.ipv6, port.ipv6_link_local]
            for address in addresses:
                identities[address] = port.vm_id
        self._identities[vpc_id] = identities

    def resolve(self, vpc_id: str, source: IpAddress) -> InstanceMetadata | None:
        """The VM that owns `source` in `vpc_id` on this host, as the metadata service shows it."""
        vm_id = self._identities.get(vpc_id, {}).get(source)
        vm = self.ctx.vms.get(vm_id) if vm_id is not None else None
        if vm is None:
            return None
        keys: dict[str, str] = {}
        for key_name in vm.spec.key_names:
            keypair = self.keypairs.get((vm.project, key_name))
            if keypair is not None:
                keys[key_name] = keypair.public_key
        return InstanceMetadata(
            instance_id=vm.id,
            name=vm.spec.name,
            hostname=hostname_of(vm.spec.name),
            project=vm.project,
            availability_zone="nova",
            public_keys=keys,
            user_data=vm.spec.user_data.encode() if vm.spec.user_data is not None else None,
            nics=tuple(self._nic_metadata(p) for p in vm.spec.ports if p in self.records.ports),
        )

    def _nic_metadata(self, port_id: str) -> NicMetadata:
        port = self.records.ports[port_id]
        subnet = self.records.subnets.get(port.spec.subnet)
        network = self.records.networks.get(port.spec.network)
        ipv4 = ipv6 = None
        gateway_v4 = gateway_v6 = None
        dhcp = False
        nameservers: tuple[str, ...] = ()
        if subnet is not None:
            spec = subnet.spec
            if port.spec.ipv4:
                ipv4 = ipaddress.IPv4Interface(f"{port.spec.ipv4[0]}/{spec.network_v4.prefixlen}")
                gateway_v4 = spec.gateway_v4
            v6 = port_ipv6(port, subnet)
            if v6 and spec.network_v6 is not None:
                ipv6 = ipaddress.IPv6Interface(f"{v6[0]}/64")
                gateway_v6 = spec.gateway_v6
            dhcp = spec.serves_dhcp
            nameservers = tuple(spec.dns_nameservers)
        floating = next(
            (
                ipaddress.IPv4Address(f.spec.address)
                for f in self.records.floating_ips.values()
                if f.spec.port == port_id and not f.deleting
            ),
            None,
        )
        return NicMetadata(
            port_id=port_id,
            mac=port.spec.mac,
            ipv4=ipv4,
            gateway_v4=gateway_v4,
            ipv6=ipv6,
            gateway_v6=gateway_v6,
            mtu=network.spec.mtu if network is not None else 1450,
            dhcp=dhcp,
            dns_nameservers=nameservers,
            floating_ipv4=floating,
        )
