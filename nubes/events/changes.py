"""From one change of one store key to the events it means: pure functions, no store.

A change is a key's value before and after (the recorder remembers the before, since
watch events carry only the after). Spec records give created/updated/deleted; a status
whose `state` moves gives a state event with who moved it; a VM's state is the one users
see (deleting, else its status's, else scheduled or pending by whether it has a host).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from nubes.model.event import EventRecord, EventType
from nubes.store.base import JsonValue
from nubes.store.keys import NOUNS, ROOT, Kind


class _Unknown:
    """The value a key had is not known (the recorder was down while it changed)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
Before = JsonValue | _Unknown

# Kinds whose records hold secrets or personal data: updates name fields, never values.
OPAQUE_KINDS = frozenset({Kind.USER, Kind.PROJECT})
RECORDED_KINDS = frozenset(Kind) - {Kind.TOKEN}
RECORDED_PARTS = ("record", "status")
SHORT_VALUE = 40
SECRET_WORDS = ("password", "secret", "token", "hash", "user_data", "key", "totp")
HOST_DOWN_PREFIX = "host-down"  # nubes.scheduler.hosts.HOST_DOWN, not imported: no cycle


@dataclass(frozen=True, slots=True)
class KeyPath:
    """What a store key is: the kind, the resource's store id and the part."""

    kind: Kind
    ident: str
    part: str

    @property
    def resource(self) -> str:
        """The id the API shows (a key pair's name without its project)."""
        if self.kind is Kind.KEYPAIR and ":" in self.ident:
            return self.ident.split(":", 1)[1]
        return self.ident


def parse_key(key: str) -> KeyPath | None:
    """The recorded key `key` names, or None for one the log ignores (tokens, claims,
    names, allocations, usage, heartbeats, migration progress, the log itself)."""
    if not key.startswith(ROOT):
        return None
    parts = key[len(ROOT) :].split("/")
    if len(parts) not in (2, 3) or not parts[1]:
        return None
    try:
        kind = Kind(parts[0])
    except ValueError:
        return None
    part = "record" if len(parts) == 2 else parts[2]
    if kind not in RECORDED_KINDS or part not in RECORDED_PARTS:
        return None
    return KeyPath(kind, parts[1], part)


@dataclass(frozen=True, slots=True)
class Change:
    """One key's change at `revision`: `before` (UNKNOWN when not known) and `after`
    (None: deleted); `record` and `status` are the resource's other part as known."""

    path: KeyPath
    revision: int
    before: Before
    after: JsonValue
    record: JsonValue = None  # the spec record, when the change is of the status
    status: JsonValue = None  # the status, when the change is of the spec record
    seen_at: datetime | None = None  # when the recorder saw it (for records without a time)


def events_of(change: Change) -> list[EventRecord]:
    """The events one change means, in the order they happened."""
    maker = _Maker(change)
    if change.path.part == "record":
        maker.record_change()
    else:
        maker.status_change()
    return maker.events


class _Maker:
    def __init__(self, change: Change) -> None:
        self.change = change
        self.path = change.path
        self.events: list[EventRecord] = []

    # -- spec records -----------------------------------------------------------------------

    def record_change(self) -> None:
        before, after = self.change.before, self.change.after
        if isinstance(before, _Unknown) and after is not None:
            self._emit(EventType.UPDATED, after, message=f"{self._title(after)} changed")
            self._vm_state(UNKNOWN, after, self.change.status, self.change.status)
            return
        if before is None and after is not None:
            at = _time(after, "created_at", "started_at")
            self._emit(EventType.CREATED, after, at=at, message=f"{self._title(after)} created")
            self._vm_state(None, after, self.change.status, self.change.status, at=at)
            return
        if after is None:
            known = before if isinstance(before, dict) else None
            previous = self._state_of(known, self.change.status)
            self._emit(
                EventType.DELETED,
                known,
                previous_state=previous,
                actor=self._deleter(),
                message=f"{self._title(known)} deleted",
            )
            return
        changed = list(_changed_fields(before, after))
        if changed:
            shown = [self._field_text(name, old, new) for name, old, new in changed]
            self._emit(
                EventType.UPDATED,
                after,
                message=f"{self._title(after)} changed: " + "; ".join(shown),
            )
        self._vm_state(before, after, self.change.status, self.change.status)

    def _field_text(self, name: str, old: JsonValue, new: JsonValue) -> str:
        if self.path.kind in OPAQUE_KINDS or not (_short(old) and _short(new)):
            return name
        if any(word in name.lower() for word in SECRET_WORDS):
            return name
        return f"{name} {_scalar(old)} -> {_scalar(new)}"

    def _deleter(self) -> str | None:
        if self.path.kind is not Kind.VM:
            return None
        host = _get(self.change.status, "host")
        if isinstance(host, str):
            return f"agent:{host}"  # the agent deletes a VM's record after its teardown
        return "scheduler"  # the janitor deletes one that never had a host

    # -- statuses ---------------------------------------------------------------------------

    def status_change(self) -> None:
        before, after, record = self.change.before, self.change.after, self.change.record
        if after is None:
            return  # a status goes with its record, whose deletion is the event
        if self.path.kind is Kind.VM:
            self._vm_state(record, record, before, after)
            return
        old_state = None if isinstance(before, _Unknown) else _get(before, "state")
        new_state = _get(after, "state")
        if not isinstance(new_state, str) or new_state == old_state:
            return
        self._state_event(
            str(old_state) if isinstance(old_state, str) else None,
            new_state,
            after,
            at=_time(after, "updated_at", "since"),
        )

    def _vm_state(
        self,
        record_before: Before,
        record_after: JsonValue,
        status_before: Before,
        status_after: JsonValue,
        at: datetime | None = None,
    ) -> None:
        """A state event when the state users see moved (or an error's reason did)."""
        if self.path.kind is not Kind.VM or not isinstance(record_after, dict):
            return
        new = self._state_of(record_after, status_after)
        if new is None:
            return
        unknown = isinstance(record_before, _Unknown) or isinstance(status_before, _Unknown)
        old = None if unknown else self._state_of(record_before, status_before)
        reason = _get(status_after, "reason") if status_after is not None else None
        old_reason = None if unknown else _get(status_before, "reason")
        if new == old and not (new in ("error", "crashed") and reason != old_reason):
            return
        if at is None and status_after is not status_before:
            at = _time(status_after, "updated_at")
        self._state_event(old, new, status_after, at=at, record=record_after)

    def _state_of(self, record: JsonValue, status: Before) -> str | None:
        if self.path.kind is not Kind.VM:
            state = _get(status, "state")
            return state if isinstance(state, str) else None
        if not isinstance(record, dict):
            return None
        if record.get("deleting") is True:
            return "deleting"
        state = _get(status, "state")
        if isinstance(state, str):
            return state
        return "scheduled" if _get(record, "spec", "host") else "pending"

    def _state_event(
        self,
        previous: str | None,
        state: str,
        status: JsonValue,
        *,
        at: datetime | None,
        record: JsonValue = None,
    ) -> None:
        reason = _get(status, "reason")
        reason = reason if isinstance(reason, str) else None
        text = f"{self._title(record or self.change.record)} "
        text += f"{previous} -> {state}" if previous else f"is {state}"
        if reason:
            text += f": {reason}"
        self._emit(
            EventType.STATE,
            record or self.change.record,
            at=at,
            state=state,
            previous_state=previous,
            reason=reason,
            actor=self._state_actor(state, status),
            message=text,
        )

    def _state_actor(self, state: str, status: JsonValue) -> str | None:
        kind = self.path.kind
        if kind is Kind.HOST:
            return "host-monitor"
        if kind is Kind.IMAGE:
            return "api"  # the API uploads and imports images
        if kind is not Kind.VM:
            host = _get(status, "host")
            return f"agent:{host}" if isinstance(host, str) else None
        if status is None:
            # Derived from the spec: a host bound (the scheduler) or a delete (the API).
            return "scheduler" if state == "scheduled" else None
        reason = _get(status, "reason")
        if isinstance(reason, str) and reason.startswith(HOST_DOWN_PREFIX):
            return "host-monitor"
        host = _get(status, "host")
        if state == "error" and not host:
            return "scheduler"  # no host could take it
        return f"agent:{host}" if isinstance(host, str) else None

    # -- building events --------------------------------------------------------------------

    def _title(self, record: JsonValue) -> str:
        noun = NOUNS.get(self.path.kind, self.path.kind.value)
        name = _get(record, "spec", "name") or _get(record, "name")
        resource = self.path.resource
        if isinstance(name, str) and name != resource:
            return f"{noun} {name} ({resource})"
        return f"{noun} {resource}"

    def _emit(
        self,
        event_type: EventType,
        record: JsonValue,
        *,
        message: str,
        at: datetime | None = None,
        state: str | None = None,
        previous_state: str | None = None,
        reason: str | None = None,
        actor: str | None = None,
    ) -> None:
        # Deterministic: every recorder makes the same key for the same change. The kind is
        # in it since a user, a project and a host may share a name (and a transaction).
        suffix = f"r{self.change.revision:016d}-{self.path.kind.value}-{self.path.part}"
        suffix += f"-{len(self.events)}"
        project = _get(record, "project") if self.path.kind is not Kind.HOST else None
        self.events.append(
            EventRecord(
                id=f"{self.path.resource}:{suffix}",
                at=at or self.change.seen_at or datetime.now(UTC),
                project=project if isinstance(project, str) else None,
                kind=self.path.kind.value,
                resource=self.path.resource,
                type=event_type,
                actor=actor,
                state=state,
                previous_state=previous_state,
                reason=reason,
                message=message,
            )
        )


def _get(value: JsonValue, *path: str) -> JsonValue:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _time(value: JsonValue, *fields: str) -> datetime | None:
    for name in fields:
        text = _get(value, name)
        if isinstance(text, str):
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                continue
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def _changed_fields(
    before: JsonValue, after: JsonValue, prefix: str = "", depth: int = 0
) -> Iterator[tuple[str, JsonValue, JsonValue]]:
    """(dotted name, old, new) of every field that differs; nested records down to 3
    levels, deeper ones and lists compared whole."""
    if isinstance(before, dict) and isinstance(after, dict) and depth < 3:
        for name in sorted(set(before) | set(after)):
            yield from _changed_fields(
                before.get(name), after.get(name), f"{prefix}{name}.", depth + 1
            )
    elif before != after:
        yield prefix.removesuffix("."), before, after


def _short(value: JsonValue) -> bool:
    if value is None or isinstance(value, bool | int | float):
        return True
    return isinstance(value, str) and len(value) <= SHORT_VALUE


def _scalar(value: JsonValue) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
