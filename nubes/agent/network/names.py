"""The names nubes gives to what it makes on a host for tenant networks.

Every name derives from a validated id and the agent's prefix, so several agents can
share one machine (tests) and the orphan sweep can tell nubes' things from others.
Links inside a VPC namespace need no prefix: the namespace is the agent's own.
Linux link names are at most 15 characters.
"""

from __future__ import annotations

from nubes.ids import IdKind, is_id, validate_id

EXTERNAL_LINK = "ext0"  # the VPC namespace's end of its external veth
MAX_LINK_NAME = 15


def netns_name(prefix: str, vpc_id: str) -> str:
    """The network namespace of a VPC on this host: `<prefix>-vpc-<id>`."""
    validate_id(vpc_id, IdKind.NETWORK)
    return f"{prefix}-{vpc_id}"


def vpc_of_netns(prefix: str, name: str) -> str | None:
    """The VPC id of one of this agent's namespaces, or None for any other name."""
    head = f"{prefix}-"
    if not name.startswith(head):
        return None
    vpc_id = name[len(head) :]
    return vpc_id if is_id(vpc_id, IdKind.NETWORK) else None


def _suffix(value: str, kind: IdKind) -> str:
    validate_id(value, kind)
    return value.split("-", 1)[1]


def bridge_name(subnet_id: str) -> str:
    """A subnet's bridge inside the VPC namespace."""
    return f"br-{_suffix(subnet_id, IdKind.SUBNET)}"


def vxlan_name(subnet_id: str) -> str:
    """A subnet's VXLAN device, once inside the VPC namespace."""
    return f"vx-{_suffix(subnet_id, IdKind.SUBNET)}"


def vxlan_staging_name(prefix: str, vni: int) -> str:
    """The VXLAN device's name in the host namespace, before it moves into the VPC's."""
    return f"{prefix}v{vni:x}"


def tap_name(port_id: str) -> str:
    """A port's tap device inside the VPC namespace."""
    return f"tp-{_suffix(port_id, IdKind.PORT)}"


def external_host_link(prefix: str, vpc_id: str) -> str:
    """The host end of a VPC's external veth, enslaved to the external bridge."""
    return f"{prefix}x{_suffix(vpc_id, IdKind.NETWORK)[:8]}"
