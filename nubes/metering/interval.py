"""A usage interval: one resource billed on unchanged terms (a flavor, a size) from a
start to an end. The meter writes them; the report reads them.

A resource's open interval lives at one key of its own (`open_meter_key`), so "at most
one open interval per resource" is a compare on one key; closing moves it to the key of
its opening id (the store revision of the change that opened it) in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.errors import InvalidInput
from nubes.model.common import Model
from nubes.store.base import Store
from nubes.store.keys import METER_PREFIX, OPEN_METER_PREFIX, meter_key, open_meter_key

log = logging.getLogger(__name__)
PAGE = 1000


class MeteredKind(StrEnum):
    VM = "vm"
    VOLUME = "volume"
    FLOATING_IP = "floating_ip"


class MeteredFlavor(Model):
    """The size a VM ran with."""

    name: str
    vcpus: int
    memory_mb: int


class UsageInterval(Model):
    project: str
    resource: str
    kind: MeteredKind
    opening: str = Field(description="the revision of the change that opened it, zero-padded")
    flavor: MeteredFlavor | None = Field(default=None, description="VMs")
    size_gb: int | None = Field(default=None, description="volumes (GiB)")
    started_at: datetime
    ended_at: datetime | None = Field(default=None, description="None while open")

    @property
    def key(self) -> str:
        """Where it lives: the resource's open key while open, its opening's once closed."""
        if self.ended_at is None:
            return open_meter_key(self.project, self.resource)
        return meter_key(self.project, self.resource, self.opening)

    def same_terms(self, other: UsageInterval) -> bool:
        """Whether both bill the same thing the same way (times aside)."""
        return (self.kind, self.flavor, self.size_gb) == (other.kind, other.flavor, other.size_gb)


def opening_id(revision: int) -> str:
    """The opening id of a change at `revision`: zero-padded, so ids sort as numbers."""
    return f"{revision:016d}"


async def read_intervals(store: Store, project: str) -> list[UsageInterval]:
    """Every usage interval of `project`, closed and open, read in pages (records that
    are not intervals are skipped with a log line).

    The pages are read at different revisions, and closing moves an interval from its
    open key to a closed one in one transaction: reading the open ones first, then the
    closed ones, finds an interval closed in between twice (once per key, kept closed)
    rather than never.

    Raises:
        StoreError: the store cannot be reached.
    """
    found: dict[tuple[str, str], UsageInterval] = {}
    for prefix in (OPEN_METER_PREFIX, METER_PREFIX):
        async for interval in _read_prefix(store, f"{prefix}{project}/"):
            found[(interval.resource, interval.opening)] = interval  # closed wins: read last
    return list(found.values())


async def _read_prefix(store: Store, prefix: str) -> AsyncIterator[UsageInterval]:
    start: str | None = None
    while True:
        page = (await store.range(prefix, limit=PAGE, start=start)).kvs
        for kv in page:
            try:
                yield UsageInterval.from_json(kv.value)
            except InvalidInput as error:
                log.error("%s is not a usage interval, skipped: %s", kv.key, error)
        if len(page) < PAGE:
            return
        start = page[-1].key + "\x00"
