"""The netlink half of the overlay: makes a VXLAN's forwarding (FDB) and neighbour entries
exactly those of an `OverlayPlan`, idempotently (what is there is compared with what
should be; only the difference is written).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ndmsg import (  # type: ignore[import-untyped]
    NTF_MASTER,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
)

from nubes.agent.network.links import _failing_as, _required_link, _rtnl
from nubes.agent.network.overlay import ZERO_MAC, IpAddress, OverlayPlan

_PERMANENT = NUD_PERMANENT | NUD_NOARP


@dataclass(frozen=True)
class OverlayChanges:
    """How many entries a call wrote and removed (0 and 0: it was already so)."""

    written: int = 0
    removed: int = 0


def _forwarding_entry(entry: Any) -> tuple[str, ipaddress.IPv4Address] | None:
    """(MAC, underlay address) of one of the VXLAN's own entries; None for the bridge's."""
    if entry["flags"] & NTF_MASTER or not entry["flags"] & NTF_SELF:
        return None
    mac, destination = entry.get("NDA_LLADDR"), entry.get("NDA_DST")
    if mac is None or destination is None:
        return None
    try:
        return str(mac).lower(), ipaddress.IPv4Address(destination)
    except ValueError:
        return None  # an IPv6 underlay: not one nubes makes


async def _forwarding_entries(ipr: Any, index: int) -> set[tuple[str, ipaddress.IPv4Address]]:
    found: set[tuple[str, ipaddress.IPv4Address]] = set()
    async for entry in await ipr.fdb("dump"):
        if entry["ifindex"] == index:
            pair = _forwarding_entry(entry)
            if pair is not None:
                found.add(pair)
    return found


async def _neighbour_entries(ipr: Any, index: int) -> dict[IpAddress, str]:
    found: dict[IpAddress, str] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        async for entry in await ipr.neigh("dump", family=family):
            if entry["ifindex"] != index or not entry["state"] & NUD_PERMANENT:
                continue
            destination, mac = entry.get("NDA_DST"), entry.get("NDA_LLADDR")
            if destination is not None and mac is not None:
                found[ipaddress.ip_address(destination)] = str(mac).lower()
    return found


async def _ignoring_missing(request: Any) -> None:
    try:
        await request
    except NetlinkError as error:
        if error.code not in (errno.ENOENT, errno.ESRCH):
            raise


async def ensure_overlay(netns: str, vxlan: str, plan: OverlayPlan) -> OverlayChanges:
    """VXLAN `vxlan` in `netns` carries exactly the flood, FDB and neighbour entries of
    `plan`: new ones are written first, then stale ones removed, so a port that moves
    between hosts is never without an entry.

    Raises:
        LinkError: the namespace or the VXLAN is missing, or netlink refused an entry.
    """
    with _failing_as(f"program the overlay entries of {vxlan} in namespace {netns}"):
        async with _rtnl(netns) as ipr:
            index = (await _required_link(ipr, vxlan, netns))["index"]
            present = await _forwarding_entries(ipr, index)
            wanted = {(ZERO_MAC, address) for address in plan.flood}
            wanted |= {(mac.lower(), address) for mac, address in plan.fdb.items()}
            written = removed = 0
            for mac, address in sorted(wanted - present):
                if mac == ZERO_MAC:  # one MAC, many destinations: appended
                    await ipr.fdb("append", ifindex=index, lladdr=mac, dst=str(address))
                else:
                    await ipr.fdb(
                        "replace",
                        ifindex=index,
                        lladdr=mac,
                        dst=str(address),
                        state=_PERMANENT,
                        flags=NTF_SELF,
                    )
                written += 1
            # After a replace, the MAC's old destination is already gone.
            present = await _forwarding_entries(ipr, index) if written else present
            for mac, address in sorted(present - wanted):
                await _ignoring_missing(ipr.fdb("del", ifindex=index, lladdr=mac, dst=str(address)))
                removed += 1
            neighbours = await _neighbour_entries(ipr, index)
            for ip, mac in sorted(plan.neighbours.items(), key=lambda item: str(item[0])):
                if neighbours.get(ip) != mac.lower():
                    await ipr.neigh(
                        "replace",
                        ifindex=index,
                        family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                        dst=str(ip),
                        lladdr=mac,
                        state=NUD_PERMANENT,
                    )
                    written += 1
            for ip in sorted(set(neighbours) - set(plan.neighbours), key=str):
                await _ignoring_missing(
                    ipr.neigh(
                        "del",
                        ifindex=index,
                        family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                        dst=str(ip),
                    )
                )
                removed += 1
            return OverlayChanges(written=written, removed=removed)


async def read_overlay(netns: str, vxlan: str) -> OverlayPlan:
    """The entries VXLAN `vxlan` in `netns` carries now, as a plan (for checks and tests).

    Raises:
        LinkError: the namespace or the VXLAN is missing.
    """
    with _failing_as(f"read the overlay entries of {vxlan} in namespace {netns}"):
        async with _rtnl(netns) as ipr:
            index = (await _required_link(ipr, vxlan, netns))["index"]
            pairs = await _forwarding_entries(ipr, index)
            neighbours = await _neighbour_entries(ipr, index)
    return OverlayPlan(
        flood=frozenset(address for mac, address in pairs if mac == ZERO_MAC),
        fdb={mac: address for mac, address in pairs if mac != ZERO_MAC},
        neighbours=neighbours,
    )
