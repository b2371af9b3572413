"""The event record: one line of a resource's history (who asked for what, what changed,
which state it reached and why), kept under `/nubes/events/by-time/` (nubes.events.storage).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import Model


class EventType(StrEnum):
    REQUEST = "request"  # someone asked the API to change something
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    STATE = "state"  # the resource's observed state changed


class EventRecord(Model):
    """One event; `id` is unique and, with `at`, orders the log."""

    id: str = Field(description="<resource>:<suffix>, unique in the log")
    at: datetime = Field(description="when it happened (UTC)")
    project: str | None = Field(default=None, description="null: admins only (hosts, users)")
    kind: str = Field(description="the kind, as in the API paths: vms, volumes, hosts...")
    resource: str = Field(description="the resource's id ('-' for a create that made none)")
    type: EventType
    actor: str | None = Field(
        default=None, description="a user, 'scheduler', 'host-monitor', 'agent:<host>'"
    )
    action: str | None = Field(default=None, description="request events: 'POST /v1/vms'")
    state: str | None = None
    previous_state: str | None = None
    reason: str | None = None
    outcome: str | None = Field(default=None, description="request events: 'ok' or an error code")
    message: str = Field(description="one sentence for people")
