"""The key layout of the store: the one place that knows where each record lives.

/nubes/<kind>/<id>            spec and metadata of a resource
/nubes/<kind>/<id>/status     observed status, written by its owner only
/nubes/hosts/<name>/alive     lease-bound heartbeat of a host's agent
/nubes/hosts/<name>/allocations  what the scheduler bound to the host (its CAS guard)
/nubes/projects/<name>/usage     what a project holds, against its quota
/nubes/names/<kind>/<project>/<name>  -> id: makes names unique per project and findable
/nubes/claims/<what>/<value>     -> id: one owner for an address, a VNI, ...
/nubes/meter/<project>/<resource>/<opening>  closed usage intervals (nubes/metering/)
/nubes/meter-open/<project>/<resource>       the open one of a resource, if any
/nubes/events/by-time/<time>_<id>  the event log (nubes/events/), in time order
/nubes/events/newest/<inverse time>_<id>  -> its by-time name: the newest first
/nubes/events/by-resource/<resource>/<suffix>  -> its by-time name: one history
"""

from __future__ import annotations

from enum import StrEnum

ROOT = "/nubes/"


class Kind(StrEnum):
    """Kinds of record; the value is the path segment under ROOT."""

    PROJECT = "projects"
    USER = "users"
    TOKEN = "tokens"  # noqa: S105 - a key path segment, not a secret
    FLAVOR = "flavors"
    KEYPAIR = "keypairs"
    IMAGE = "images"
    NETWORK = "networks"
    SUBNET = "subnets"
    PORT = "ports"
    SECURITY_GROUP = "security-groups"
    FLOATING_IP = "floating-ips"
    VOLUME = "volumes"
    VM = "vms"
    HOST = "hosts"


# The singular a user reads in messages, per kind.
NOUNS: dict[Kind, str] = {
    Kind.PROJECT: "project",
    Kind.USER: "user",
    Kind.TOKEN: "token",
    Kind.FLAVOR: "flavor",
    Kind.KEYPAIR: "key pair",
    Kind.IMAGE: "image",
    Kind.NETWORK: "network",
    Kind.SUBNET: "subnet",
    Kind.PORT: "port",
    Kind.SECURITY_GROUP: "security group",
    Kind.FLOATING_IP: "floating IP",
    Kind.VOLUME: "volume",
    Kind.VM: "VM",
    Kind.HOST: "host",
}


def kind_prefix(kind: Kind) -> str:
    """The prefix of every key of `kind`, for range and watch."""
    return f"{ROOT}{kind.value}/"


def resource_key(kind: Kind, name: str) -> str:
    """The key of a resource's spec record."""
    _check_name(name)
    return f"{ROOT}{kind.value}/{name}"


def status_key(kind: Kind, name: str) -> str:
    """The key of a resource's observed status."""
    return f"{resource_key(kind, name)}/status"


def host_alive_key(host: str) -> str:
    """The lease-bound key whose presence says a host's agent is alive."""
    return f"{resource_key(Kind.HOST, host)}/alive"


def host_stopped_key(host: str) -> str:
    """Written by a clean agent stop (bound to a lease the host's fencer keeps alive): the
    host runs its VMs on without an agent, which is not a host failure."""
    return f"{resource_key(Kind.HOST, host)}/stopped"


def _check_name(name: str) -> None:
    if not name or "/" in name or not name.isascii() or not name.isprintable():
        raise ValueError(f"a record name is printable ASCII without '/', got {name!r}")


def host_allocations_key(host: str) -> str:
    """The scheduler's record of the VMs bound to a host and their sizes."""
    return f"{resource_key(Kind.HOST, host)}/allocations"


def usage_key(project: str) -> str:
    """What a project holds, changed in the same transaction as the records it counts."""
    return f"{resource_key(Kind.PROJECT, project)}/usage"


def name_key(kind: Kind, project: str, name: str) -> str:
    """The guard that makes `name` unique among a project's resources of `kind`."""
    _check_name(project)
    _check_name(name)
    return f"{ROOT}names/{kind.value}/{project}/{name}"


def claim_key(what: str, value: str) -> str:
    """The guard that gives `value` (an address in a subnet, a VNI) to one owner."""
    _check_name(what)
    _check_name(value)
    return f"{ROOT}claims/{what}/{value}"


def migration_key(vm_id: str) -> str:
    """The progress of a VM's move to another host, written by the agents of both ends."""
    return f"{resource_key(Kind.VM, vm_id)}/migration"


EVENTS_PREFIX = f"{ROOT}events/"
"""Every key of the event log: the events by time and their two indexes."""

EVENTS_BY_TIME_PREFIX = f"{EVENTS_PREFIX}by-time/"
"""The events themselves, in time order: pages and pruning are bounded range reads."""

EVENTS_NEWEST_PREFIX = f"{EVENTS_PREFIX}newest/"
"""The by-time names again, newest first (the store has no reverse range): the tail."""

EVENTS_BY_RESOURCE_PREFIX = f"{EVENTS_PREFIX}by-resource/"
"""The by-time names by resource: a resource's history is one prefix range, and its
deterministic keys make each event written once."""

EVENT_CURSOR_KEY = f"{ROOT}event-recorder/cursor"
METER_CURSOR_KEY = f"{ROOT}meter-cursor"  # how far the meter has replayed VM changes
"""The last store revision the event recorder wrote events for (where a restart resumes)."""

_EVENT_TIME_DIGITS = 20  # microseconds since 1970, zero-padded: key order is time order


def event_time_name(micros: int, event_id: str) -> str:
    """The name of an event in the log's time order (also an event listing's cursor)."""
    _check_name(event_id)
    return f"{micros:0{_EVENT_TIME_DIGITS}d}_{event_id}"


def event_time_key(time_name: str) -> str:
    """The key that holds the event named `time_name`."""
    _check_name(time_name)
    return f"{EVENTS_BY_TIME_PREFIX}{time_name}"


def event_newest_key(micros: int, event_id: str) -> str:
    """The key of the event in the newest-first index (later times sort first)."""
    inverse = 10**_EVENT_TIME_DIGITS - 1 - micros
    return f"{EVENTS_NEWEST_PREFIX}{event_time_name(inverse, event_id)}"


def resource_events_prefix(resource: str) -> str:
    """The prefix of one resource's events."""
    _check_name(resource)
    return f"{EVENTS_BY_RESOURCE_PREFIX}{resource}/"


def event_key(resource: str, suffix: str) -> str:
    """The key of one event of `resource` in the by-resource index; `suffix` is unique
    within the resource."""
    _check_name(suffix)
    return f"{resource_events_prefix(resource)}{suffix}"


METER_PREFIX = f"{ROOT}meter/"
"""Closed usage intervals, by project then resource: a project's history is one range."""

OPEN_METER_PREFIX = f"{ROOT}meter-open/"
"""Open usage intervals, one key per billed resource: a restarted meter reads only these."""


def meter_key(project: str, resource: str, opening: str) -> str:
    """The key of the closed usage interval of `resource` that `opening` started."""
    for part in (project, resource, opening):
        _check_name(part)
    return f"{METER_PREFIX}{project}/{resource}/{opening}"


def open_meter_key(project: str, resource: str) -> str:
    """The key of the open usage interval of `resource`: one key, so there is at most one."""
    for part in (project, resource):
        _check_name(part)
    return f"{OPEN_METER_PREFIX}{project}/{resource}"


def attachment_claim(volume_id: str) -> str:
    """The claim a VM attach holds on a volume (volume id -> VM id); a volume delete
    requires it absent."""
    return claim_key("volume-attachments", volume_id)
