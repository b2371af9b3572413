"""Forgetting the tracked connections of floating IPs that left their port or moved.

NAT is decided when a connection starts and kept in its conntrack entry, so without
this a ping or a TCP session through a removed floating IP would keep flowing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from ipaddress import IPv4Address

from pyroute2 import Conntrack  # type: ignore[import-untyped]

from nubes.agent.network import nsutil


def forget_connections(netns: str, addresses: Collection[IPv4Address]) -> int:
    """Deletes the conntrack entries in `netns` to or from any of `addresses`; how many.

    Raises:
        NetnsError: the namespace is missing.
    """
    wanted = {str(address) for address in addresses}

    def forget() -> int:
        table = Conntrack()
        try:
            doomed = [
                entry
                for entry in table.dump_entries()
                if {entry.tuple_orig.daddr, entry.tuple_orig.saddr, entry.tuple_reply.daddr}
                & wanted
            ]
            for entry in doomed:
                table.delete(entry)
            return len(doomed)
        finally:
            table.close()

    return nsutil.call_in_netns(netns, forget) if wanted else 0


async def forget_connections_async(netns: str, addresses: Collection[IPv4Address]) -> int:
    """`forget_connections` without blocking the event loop."""
    return await asyncio.to_thread(forget_connections, netns, addresses)
