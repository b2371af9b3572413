"""The netlink door of tenant networking: namespaces, bridges, VXLANs, taps, veths, routes.

Every function is idempotent ("make it so") and speaks netlink through pyroute2's
AsyncIPRoute, one socket per namespace per call; whatever fails raises `LinkError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface
from typing import Any

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]
from pyroute2.netlink import NETLINK_ROUTE  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import RTM_GETNEIGH  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY, ndmsg  # type: ignore[import-untyped]

from nubes.agent.network import nsutil
from nubes.errors import CommandFailed, NubesError, ToolMissing
from nubes.process import run_tool_async

# The metadata service's IPv6 address, on every bridge (the IPv4 one, 169.254.169.254,
# lives on lo: see ensure_address).
METADATA_LINK_LOCAL = IPv6Interface("fe80::a9fe:a9fe/64")

# A VPC namespace is the router of its subnets. Reverse-path filtering is loose: the
# anti-spoofing is per port in nftables, and strict mode would drop the asymmetric paths
# of floating IPs. It never learns routes from router advertisements: it sends them.
# No duplicate address detection: a subnet's gateway addresses, and its bridge's MAC and
# so its link-local address, are the same on every host (an anycast gateway).
_NETNS_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
    "net/ipv4/conf/all/rp_filter": "2",
    "net/ipv4/conf/default/rp_filter": "2",
    "net/ipv6/conf/all/accept_ra": "0",
    "net/ipv6/conf/default/accept_ra": "0",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
}
_MAIN_TABLE = 254
_IFF_UP = 0x1
_RCVBUF = 1 << 20
# <linux/if_tun.h>; struct ifreq is 40 bytes: a 16-byte name, then a union.
_TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000

# A VNI still held by the VXLAN of a dying namespace: how long to wait for it.
VXLAN_BUSY_ATTEMPTS = 25
VXLAN_BUSY_PAUSE = 0.2


class LinkError(NubesError):
    """A namespace, link, address, route or neighbour entry could not be made as asked."""

    code = "link_error"


# ------------------------------------------------------------------ the door itself


@contextlib.contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """Turns what netlink, the kernel and `ip` say into a LinkError about `what`."""
    try:
        yield
    except LinkError:
        raise
    except NetlinkError as error:
        raise LinkError(f"cannot {what}: {os.strerror(error.code)}") from error
    except (OSError, nsutil.NetnsError, CommandFailed, ToolMissing) as error:
        raise LinkError(f"cannot {what}: {error}") from error


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)


@contextlib.asynccontextmanager
async def _rtnl(netns: str | None) -> AsyncIterator[Any]:
    """An AsyncIPRoute speaking to namespace `netns`, or to the agent's own when None.

    The socket is made on a thread that entered the namespace (nsutil): cheaper than
    pyroute2's forked helper process, and the event loop never changes namespace.
    """
    if netns is None:
        sock = _netlink_socket()
    else:
        sock = await nsutil.call_in_netns_async(netns, _netlink_socket)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        async with AsyncIPRoute(use_socket=sock) as ipr:
            yield ipr
    finally:
        sock.close()  # AsyncIPRoute leaves a socket it was handed open


def _where(netns: str | None) -> str:
    return f"namespace {netns}" if netns else "the agent's namespace"


async def _link(ipr: Any, name: str) -> Any | None:
    """The link message of `name`, or None when there is no such link."""
    try:
        (link,) = await ipr.link("get", ifname=name)
    except NetlinkError as error:
        if error.code == errno.ENODEV:
            return None
        raise
    return link


async def _required_link(ipr: Any, name: str, netns: str | None) -> Any:
    link = await _link(ipr, name)
    if link is None:
        raise LinkError(f"there is no link {name} in {_where(netns)}")
    return link


def _kind(link: Any) -> str:
    return str(link.get(("linkinfo", "kind")) or "")


def _info(link: Any, attribute: str) -> Any:
    return link.get(("linkinfo", "data", attribute))


async def _delete_index(ipr: Any, index: int) -> None:
    try:
        await ipr.link("del", index=index)
    except NetlinkError as error:
        if error.code != errno.ENODEV:
            raise


async def _set_up(
    ipr: Any,
    link: Any,
    *,
    mtu: int | None = None,
    master: int | None = None,
    mac: str | None = None,
) -> None:
    """One request that sets whatever differs of MTU, master, MAC and the up flag."""
    changes: dict[str, Any] = {}
    if mac is not None and link.get("address") != mac:
        changes["address"] = mac
    if mtu is not None and link.get("mtu") != mtu:
        changes["mtu"] = mtu
    if master is not None and link.get("master") != master:
        changes["master"] = master
    if not link["flags"] & _IFF_UP:
        changes["state"] = "up"
    if changes:
        await ipr.link("set", index=link["index"], **changes)


Interface = IPv4Interface | IPv6Interface


async def _addresses(ipr: Any, index: int) -> set[Interface]:
    found: set[Interface] = set()
    async for message in await ipr.addr("dump", index=index):
        found.add(ipaddress.ip_interface(f"{message.get('address')}/{message['prefixlen']}"))
    return found


async def _add_address(ipr: Any, index: int, address: Interface, *, nodad: bool) -> None:
    # Without NODAD a new IPv6 address stays tentative for a second, and the gateway
    # address of a subnet is the same on every host (anycast): DAD would only fail.
    flags = IFA_F_NODAD if nodad and address.version == 6 else 0
    try:
        await ipr.addr(
            "add",
            index=index,
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
            flags=flags,
        )
    except NetlinkError as error:
        if error.code != errno.EEXIST:
            raise


async def _remove_address(ipr: Any, index: int, address: Interface) -> None:
    try:
        await ipr.addr(
            "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
        )
    except NetlinkError as error:
        if error.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
            raise


# ------------------------------------------------------------------ namespaces


async def ensure_netns(name: str) -> None:
    """The namespace `name` exists, with lo up and the sysctls of a VPC router.

    Raises:
        LinkError: the namespace cannot be made or set up.
    """
    with _failing_as(f"create network namespace {name}"):
        if not nsutil.netns_exists(name):
            try:
                await run_tool_async(["ip", "netns", "add", name])
            except CommandFailed:
                if not nsutil.netns_exists(name):  # else a concurrent caller made it
                    raise
        async with _rtnl(name) as ipr:
            await _set_up(ipr, await _required_link(ipr, "lo", name))
        await asyncio.to_thread(nsutil.write_sysctl, name, _NETNS_SYSCTLS)


async def delete_netns(name: str) -> None:
    """The namespace `name` is gone (processes still inside keep it alive until they end).

    Raises:
        LinkError: it exists and cannot be removed.
    """
    with _failing_as(f"delete network namespace {name}"):
        if not nsutil.netns_exists(name):
            return
        # A namespace outlives its name while a process (a QEMU zombie for ~2 s) is in it,
        # and so do its VXLAN devices, which keep their VNI on the host's shared UDP
        # socket: the same VPC made again at once would fail with "File exists".
        for link, kind in (await list_links(name)).items():
            if kind == "vxlan":
                await delete_link(name, link)
        try:
            await run_tool_async(["ip", "netns", "delete", name])
        except CommandFailed:
            if nsutil.netns_exists(name):
                raise


def list_netns(prefix: str) -> list[str]:
    """The names in /run/netns that start with `<prefix>-`, sorted."""
    try:
        names = os.listdir(nsutil.NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(f"{prefix}-"))


# ------------------------------------------------------------------ links of a subnet


def bridge_mac(name: str) -> str:
    """The MAC of bridge `name`: locally administered, derived from the name, so the
    subnet's gateway has one MAC on every host and keeps it as ports come and go (a
    bridge otherwise takes the lowest MAC of its ports)."""
    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (0x02, *digest[:5]))


async def ensure_bridge(
    netns: str, name: str, *, mtu: int, addresses: Sequence[IPv4Interface | IPv6Interface]
) -> None:
    """Bridge `name` is up in `netns` with `bridge_mac(name)`, without STP, with `mtu`
    and exactly `addresses`.

    The kernel's own link-local address stays, and the metadata service's
    fe80::a9fe:a9fe/64 is always added (without duplicate address detection).

    Raises:
        LinkError: the namespace is missing, `name` is another kind of link, or netlink
            refused a change.
    """
    with _failing_as(f"set up bridge {name} in namespace {netns}"):
        async with _rtnl(netns) as ipr:
            link = await _link(ipr, name)
            bridge_options = {"br_stp_state": 0, "br_forward_delay": 0, "br_mcast_snooping": 0}
            if link is None:
                await ipr.link(
                    "add",
                    ifname=name,
                    kind="bridge",
                    address=bridge_mac(name),
                    mtu=mtu,
                    state="up",
                    **bridge_options,
                )
                link = await _required_link(ipr, name, netns)
            elif _kind(link) != "bridge":
                raise LinkError(
                    f"link {name} in namespace {netns} is a {_kind(link) or 'device'}, not a bridge"
                )
            else:
                if _info(link, "IFLA_BR_STP_STATE") or _info(link, "IFLA_BR_FORWARD_DELAY"):
                    await ipr.link("set", index=link["index"], kind="bridge", **bridge_options)
                await _set_up(ipr, link, mtu=mtu, mac=bridge_mac(name))
            index = link["index"]
            wanted: set[Interface] = {*addresses, METADATA_LINK_LOCAL}
            present = await _addresses(ipr, index)
            for address in present - wanted:
                if not (address.version == 6 and address.ip.is_link_local):
                    await _remove_address(ipr, index, address)
            for address in wanted - present:
                await _add_address(ipr, index, address, nodad=True)


async def ensure_vxlan(
    netns: str,
    name: str,
    *,
    staging_name: str,
    vni: int,
    local: IPv4Address,
    bridge: str,
    mtu: int,
    dstport: int = 4789,
    underlay_netns: str | None = None,
) -> None:
    """VXLAN `name` with `vni` is up in `netns` and enslaved to `bridge`.

    Its UDP socket must bind the underlay, in `underlay_netns` (None: the agent's own
    namespace). A VXLAN opens its socket in the namespace the creating request came from,
    so one request sent from the underlay namespace creates it right inside `netns`,
    named, enslaved and up: the same as making it there and moving it, without the move
    (10-20 ms of RCU grace periods). `staging_name` is the name such a move would use; a
    leftover device by that name in the underlay namespace is removed. Learning is off
    and ARP/ND proxy on: forwarding and neighbour entries are programmed from the store
    (`ensure_overlay`). One with another VNI, address, port or those flags is replaced.

    Raises:
        LinkError: the namespace or the bridge is missing, or netlink refused a change.
    """
    with _failing_as(f"set up VXLAN {name} (VNI {vni}) in namespace {netns}"):
        async with _rtnl(netns) as ipr:
            master = (await _required_link(ipr, bridge, netns))["index"]
            link = await _link(ipr, name)
            if link is not None:
                same = (
                    _kind(link) == "vxlan"
                    and _info(link, "IFLA_VXLAN_ID") == vni
                    and _info(link, "IFLA_VXLAN_LOCAL") == str(local)
                    and _info(link, "IFLA_VXLAN_PORT") == dstport
                    and not _info(link, "IFLA_VXLAN_LEARNING")
                    and _info(link, "IFLA_VXLAN_PROXY")
                )
                if same:
                    await _set_up(ipr, link, mtu=mtu, master=master)
                    return
                await _delete_index(ipr, link["index"])
        # The kernel refuses to change proxy or learning on a VXLAN: it is made anew.
        async with _rtnl(underlay_netns) as host:
            leftover = await _link(host, staging_name)
            if leftover is not None:
                await _delete_index(host, leftover["index"])
            for attempt in range(VXLAN_BUSY_ATTEMPTS):
                try:
                    await host.link(
                        "add",
                        ifname=name,
                        kind="vxlan",
                        vxlan_id=vni,
                        vxlan_local=str(local),
                        vxlan_port=dstport,
                        vxlan_learning=0,
                        vxlan_proxy=1,
                        mtu=mtu,
                        net_ns_fd=netns,
                        master=master,  # an index in the new link's namespace
                        state="up",
                    )
                    return
                except NetlinkError as error:
                    # EEXIST: the VNI is still held on the shared UDP socket by the VXLAN
                    # of a namespace that is going away (a process kept it alive a moment).
                    if error.code != errno.EEXIST or attempt + 1 == VXLAN_BUSY_ATTEMPTS:
                        raise
                    await asyncio.sleep(VXLAN_BUSY_PAUSE)


def _make_persistent_tap(name: str) -> None:
    """Creates tap `name` in the calling thread's namespace and lets it outlive the fd."""
    request = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI)
    fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, request)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


async def ensure_tap(netns: str, name: str, *, bridge: str, mtu: int) -> None:
    """A persistent tap `name` is up in `netns` on `bridge`, for QEMU to open by name.

    Raises:
        LinkError: the namespace or the bridge is missing, or the tap cannot be made.
    """
    with _failing_as(f"set up tap {name} in namespace {netns}"):
        async with _rtnl(netns) as ipr:
            master = (await _required_link(ipr, bridge, netns))["index"]
            link = await _link(ipr, name)
            if link is not None and not (
                _kind(link) == "tun" and _info(link, "IFLA_TUN_TYPE") == _IFF_TAP
            ):
                await _delete_index(ipr, link["index"])
                link = None
            if link is None:
                # Taps have no netlink constructor: an ioctl on a thread in the namespace.
                await nsutil.call_in_netns_async(netns, lambda: _make_persistent_tap(name))
                link = await _required_link(ipr, name, netns)
            await _set_up(ipr, link, mtu=mtu, master=master)


async def delete_link(netns: str | None, name: str) -> None:
    """Link `name` is not in `netns` (None: the agent's own namespace); a missing
    namespace is fine too.

    Raises:
        LinkError: it exists and netlink refused to delete it.
    """
    if netns is not None and not nsutil.netns_exists(netns):
        return
    with _failing_as(f"delete link {name} in {_where(netns)}"):
        async with _rtnl(netns) as ipr:
            link = await _link(ipr, name)
            if link is not None:
                await _delete_index(ipr, link["index"])


async def list_links(netns: str) -> dict[str, str]:
    """Every link in `netns` by name, with its kind ("bridge", "vxlan", "tun", "veth";
    "" for a device without one, like lo).

    Raises:
        LinkError: the namespace is missing.
    """
    with _failing_as(f"list the links of namespace {netns}"):
        async with _rtnl(netns) as ipr:
            return {link.get("ifname"): _kind(link) async for link in await ipr.link("dump")}


async def ensure_address(
    netns: str, link: str, address: IPv4Interface | IPv6Interface, *, nodad: bool = False
) -> None:
    """`address` is on `link` in `netns` (others stay), e.g. 169.254.169.254/32 on lo.

    Raises:
        LinkError: the namespace or the link is missing, or netlink refused the address.
    """
    with _failing_as(f"add {address} to {link} in namespace {netns}"):
        async with _rtnl(netns) as ipr:
            index = (await _required_link(ipr, link, netns))["index"]
            await _add_address(ipr, index, address, nodad=nodad)


# ------------------------------------------------------------------ the outside


async def ensure_external(
    netns: str,
    *,
    link: str,
    host_link: str,
    host_bridge: str,
    address: IPv4Interface,
    gateway: IPv4Address | None,
    mtu: int = 1500,
) -> None:
    """A veth joins `netns` (as `link`, with `address` and the default route) to the
    host's external bridge `host_bridge` (as `host_link`).

    Raises:
        LinkError: the external bridge does not exist, or netlink refused a change.
    """
    with _failing_as(f"connect namespace {netns} to external bridge {host_bridge}"):
        async with _rtnl(None) as host, _rtnl(netns) as inner:
            bridge = await _link(host, host_bridge)
            if bridge is None or _kind(bridge) != "bridge":
                raise LinkError(
                    f"the external bridge {host_bridge} does not exist on this host",
                    hint="create it, or name an existing bridge in the setting "
                    "`external_bridges` of the agent configuration",
                )
            outer: Any = await _link(host, host_link)
            peer: Any = await _link(inner, link)
            paired = (
                outer is not None
                and peer is not None
                and _kind(outer) == "veth"
                and outer.get("IFLA_LINK") == peer["index"]
                and peer.get("IFLA_LINK") == outer["index"]
            )
            if not paired:
                for ipr, old in ((host, outer), (inner, peer)):
                    if old is not None:
                        await _delete_index(ipr, old["index"])
                await host.link(
                    "add",
                    ifname=host_link,
                    kind="veth",
                    mtu=mtu,
                    peer={"ifname": link, "net_ns_fd": netns, "mtu": mtu},
                )
                outer = await _required_link(host, host_link, None)
                peer = await _required_link(inner, link, netns)
            await _set_up(host, outer, mtu=mtu, master=bridge["index"])
            await _set_up(inner, peer, mtu=mtu)
            index = peer["index"]
            present = await _addresses(inner, index)
            for old_address in present:
                if old_address.version == 4 and old_address != address:
                    await _remove_address(inner, index, old_address)
            if address not in present:
                await _add_address(inner, index, address, nodad=False)
            # Proxy ARP for floating IPs answers at once, not after up to 0.8 s at random.
            # (A namespace has no neigh/default sysctls: this is per link.)
            await asyncio.to_thread(
                nsutil.write_sysctl, netns, {f"net/ipv4/neigh/{link}/proxy_delay": "0"}
            )
            if gateway is None:
                await inner.route("replace", dst="0.0.0.0/0", oif=index, scope=253)
            else:
                await inner.route("replace", dst="0.0.0.0/0", gateway=str(gateway), oif=index)


async def remove_external(netns: str, *, host_link: str) -> None:
    """The external veth of `netns` is gone (deleting the host end deletes both).

    Raises:
        LinkError: it exists and netlink refused to delete it.
    """
    await delete_link(None, host_link)


async def _proxy_entries(ipr: Any) -> AsyncIterator[Any]:
    """The proxy neighbour entries of the namespace (a dump with NTF_PROXY in the header,
    which pyroute2's neigh("dump") cannot ask for)."""
    request = ndmsg()
    request["family"] = socket.AF_INET
    request["flags"] = NTF_PROXY
    async for entry in await ipr.nlm_request(request, RTM_GETNEIGH):
        yield entry


async def ensure_floating_ips(
    netns: str, *, link: str, mapping: Mapping[IPv4Address, tuple[IPv4Address, str]]
) -> None:
    """Each floating address answers ARP on `link` and routes to its fixed address.

    For floating -> (fixed, bridge): a proxy neighbour entry for floating on `link` and a
    route floating/32 via fixed dev bridge, which is what makes the kernel proxy ARP (the
    target must route out of another device). Entries and /32 routes of floating
    addresses no longer in `mapping` go.

    Raises:
        LinkError: the namespace, `link` or a bridge is missing, or netlink refused.
    """
    with _failing_as(f"set the floating IPs of namespace {netns}"):
        async with _rtnl(netns) as ipr:
            external = (await _required_link(ipr, link, netns))["index"]
            bridges = {
                item.get("ifname"): item["index"]
                async for item in await ipr.link("dump")
                if _kind(item) == "bridge"
            }
            targets: dict[IPv4Address, tuple[IPv4Address, int]] = {}
            for floating, (fixed, bridge) in mapping.items():
                if bridge not in bridges:
                    raise LinkError(f"there is no bridge {bridge} in namespace {netns}")
                targets[floating] = (fixed, bridges[bridge])
            nubes_bridges = set(bridges.values())
            async for route in await ipr.route("dump", family=socket.AF_INET):
                if (
                    route.get("table") == _MAIN_TABLE
                    and route["dst_len"] == 32
                    and route.get("gateway")
                    and route.get("oif") in nubes_bridges
                    and IPv4Address(route.get("dst")) not in targets
                ):
                    await ipr.route(
                        "del",
                        dst=f"{route.get('dst')}/32",
                        gateway=route.get("gateway"),
                        oif=route.get("oif"),
                    )
            stale = [
                entry.get("dst")
                async for entry in _proxy_entries(ipr)
                if entry["ifindex"] == external and IPv4Address(entry.get("dst")) not in targets
            ]
            for destination in stale:
                await ipr.neigh("del", dst=destination, ifindex=external, flags=NTF_PROXY)
            for floating, (fixed, bridge_index) in targets.items():
                await ipr.neigh("replace", dst=str(floating), ifindex=external, flags=NTF_PROXY)
                await ipr.route(
                    "replace", dst=f"{floating}/32", gateway=str(fixed), oif=bridge_index
                )
