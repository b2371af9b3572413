"""The recorder's pure part: which events a change of a store key means."""

from __future__ import annotations

from typing import Any

from nubes.events.changes import UNKNOWN, Change, KeyPath, events_of, parse_key
from nubes.model.event import EventType
from nubes.store.keys import Kind

VM_ID = "i-abcdefghij"


def vm_record(**spec: Any) -> dict[str, Any]:
    return {
        "id": VM_ID,
        "project": "alpha",
        "deleting": spec.pop("deleting", False),
        "created_at": "2025-01-01T00:00:00Z",
        "spec": {"name": "web", "host": None, "power_state": "running", **spec},
    }


def vm_status(state: str, **fields: Any) -> dict[str, Any]:
    return {"state": state, "updated_at": "2025-01-01T00:01:00Z", **fields}


def change(part: str, before: Any, after: Any, **others: Any) -> Change:
    return Change(KeyPath(Kind.VM, VM_ID, part), 42, before, after, **others)


def test_only_spec_records_and_statuses_of_resources_are_recorded() -> None:
    assert parse_key(f"/nubes/vms/{VM_ID}") == KeyPath(Kind.VM, VM_ID, "record")
    assert parse_key(f"/nubes/vms/{VM_ID}/status") == KeyPath(Kind.VM, VM_ID, "status")
    for ignored in (
        "/nubes/tokens/t1",
        "/nubes/hosts/h1/alive",
        "/nubes/hosts/h1/allocations",
        "/nubes/projects/p/usage",
        f"/nubes/vms/{VM_ID}/migration",
        "/nubes/names/vms/p/web",
        "/nubes/claims/mac/x",
        "/nubes/events/i-abcdefghij/q1",
    ):
        assert parse_key(ignored) is None, ignored


def test_a_new_vm_is_created_then_pending() -> None:
    created, pending = events_of(change("record", None, vm_record()))
    assert created.type is EventType.CREATED
    assert created.project == "alpha"
    assert created.message == f"VM web ({VM_ID}) created"
    assert (pending.type, pending.state, pending.previous_state) == (
        EventType.STATE,
        "pending",
        None,
    )
    assert created.id != pending.id
    assert created.id.startswith(f"{VM_ID}:r0000000000000042-")


def test_binding_a_host_is_the_schedulers_scheduled_state() -> None:
    events = events_of(change("record", vm_record(), vm_record(host="h1")))
    updated, scheduled = events
    assert updated.type is EventType.UPDATED
    assert "spec.host none -> h1" in updated.message
    assert (scheduled.state, scheduled.previous_state, scheduled.actor) == (
        "scheduled",
        "pending",
        "scheduler",
    )


def test_the_agents_status_moves_the_state_with_its_host_as_actor() -> None:
    record = vm_record(host="h1")
    (event,) = events_of(
        change(
            "status",
            vm_status("building", host="h1"),
            vm_status("running", host="h1"),
            record=record,
        )
    )
    assert (event.previous_state, event.state, event.actor) == ("building", "running", "agent:h1")
    assert event.at.isoformat() == "2025-01-01T00:01:00+00:00"


def test_a_status_write_that_keeps_the_state_is_no_event() -> None:
    record = vm_record(host="h1")
    before = vm_status("running", host="h1", pid=1)
    assert events_of(change("status", before, {**before, "pid": 2}, record=record)) == []


def test_an_unplaceable_vm_is_in_error_by_the_scheduler_with_the_reason() -> None:
    reason = "no host can take this VM (64 vCPUs): 1 host: not enough vCPUs"
    (event,) = events_of(
        change("status", None, vm_status("error", reason=reason), record=vm_record())
    )
    assert (event.previous_state, event.state, event.actor) == ("pending", "error", "scheduler")
    assert event.reason == reason
    assert reason in event.message


def test_a_new_error_reason_is_an_event_even_in_the_same_state() -> None:
    record = vm_record()
    events = events_of(
        change(
            "status", vm_status("error", reason="a"), vm_status("error", reason="b"), record=record
        )
    )
    assert [e.reason for e in events] == ["b"]


def test_a_host_down_error_is_the_host_monitors() -> None:
    record = vm_record(host="h1")
    down = vm_status("error", host="h1", reason="host-down: host h1 stopped answering")
    (event,) = events_of(change("status", vm_status("running", host="h1"), down, record=record))
    assert event.actor == "host-monitor"


def test_deleting_then_deleted_by_the_agent() -> None:
    status = vm_status("running", host="h1")
    record = vm_record(host="h1")
    _, deleting = events_of(change("record", record, {**record, "deleting": True}, status=status))
    assert (deleting.previous_state, deleting.state) == ("running", "deleting")
    (deleted,) = events_of(change("record", {**record, "deleting": True}, None, status=status))
    assert deleted.type is EventType.DELETED
    assert deleted.actor == "agent:h1"
    assert deleted.previous_state == "deleting"
    assert deleted.project == "alpha"


def test_user_and_project_changes_name_fields_never_values() -> None:
    before = {"name": "ann", "password_hash": "$argon2id$old", "role": "member"}
    after = {"name": "ann", "password_hash": "$argon2id$new", "role": "admin"}
    (event,) = events_of(Change(KeyPath(Kind.USER, "ann", "record"), 7, before, after))
    assert "password_hash" in event.message
    assert "role" in event.message
    assert "argon2" not in event.message
    assert "admin" not in event.message
    assert event.project is None


def test_secret_looking_fields_show_no_values_on_any_kind() -> None:
    (updated,) = events_of(change("record", vm_record(user_data="a"), vm_record(user_data="b")))
    assert "spec.user_data" in updated.message
    assert " a -> b" not in updated.message


def test_a_host_going_down_is_the_host_monitors_state_event_for_admins() -> None:
    path = KeyPath(Kind.HOST, "h1", "status")
    down = {"state": "down", "since": "2025-01-01T00:02:00Z", "reason": "heartbeat expired"}
    (event,) = events_of(
        Change(path, 9, {"state": "up", "since": "x"}, down, record={"name": "h1"})
    )
    assert (event.state, event.previous_state, event.actor, event.project) == (
        "down",
        "up",
        "host-monitor",
        None,
    )


def test_a_change_from_an_unknown_value_says_what_is_known() -> None:
    record = vm_record(host="h1")
    (event,) = events_of(change("status", UNKNOWN, vm_status("stopped", host="h1"), record=record))
    assert (event.previous_state, event.state) == (None, "stopped")
    updated, state = events_of(change("record", UNKNOWN, record))
    assert updated.type is EventType.UPDATED
    assert state.state == "scheduled"
