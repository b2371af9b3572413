"""The VM record: strict specs, and the one table of status transitions."""

from __future__ import annotations

import pytest

from nubes.errors import InvalidInput
from nubes.model.vm import (
    TRANSITIONS,
    IllegalTransition,
    VmRecord,
    VmState,
    VmStatus,
    check_transition,
)


def _record(**spec: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "name": "web-1",
        "flavor": {"name": "tiny", "vcpus": 1, "memory_mb": 64, "disk_gb": 0},
        "image": "img-0123456789",
    }
    fields.update(spec)
    return {"id": "i-0123456789", "spec": fields, "created_at": "2026-11-21T00:00:00Z"}


def test_a_valid_record_round_trips_through_json() -> None:
    record = VmRecord.from_json(_record())
    assert VmRecord.from_json(record.to_json()) == record
    assert record.spec.power_state == "running"
    assert record.spec.restart_policy == "on-failure"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"flavr": "x"}, "spec.flavr"),
        ({"cpu_weight": 0}, "spec.cpu_weight"),
        ({"power_state": "paused"}, "spec.power_state"),
        ({"flavor": {"name": "x", "vcpus": 0, "memory_mb": 64, "disk_gb": 0}}, "vcpus"),
        ({"name": "../etc"}, "spec.name"),
    ],
)
def test_an_invalid_record_names_the_field_that_is_wrong(
    spec: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        VmRecord.from_json(_record(**spec))


def test_every_state_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(VmState)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (VmState.SCHEDULED, VmState.BUILDING),
        (VmState.BUILDING, VmState.RUNNING),
        (VmState.RUNNING, VmState.CRASHED),
        (VmState.CRASHED, VmState.BUILDING),
        (VmState.STOPPED, VmState.BUILDING),
        (VmState.ERROR, VmState.BUILDING),
        (VmState.RUNNING, VmState.RUNNING),
    ],
)
def test_the_transitions_the_agent_makes_are_allowed(current: VmState, target: VmState) -> None:
    check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (VmState.PENDING, VmState.RUNNING),
        (VmState.RUNNING, VmState.BUILDING),
        (VmState.DELETING, VmState.RUNNING),
        (VmState.STOPPED, VmState.CRASHED),
    ],
)
def test_other_transitions_are_refused(current: VmState, target: VmState) -> None:
    with pytest.raises(IllegalTransition, match=f"from {current} to {target}"):
        check_transition(current, target)


def test_a_status_without_a_state_is_refused() -> None:
    with pytest.raises(InvalidInput, match="state"):
        VmStatus.from_json({"updated_at": "2026-11-21T00:00:00Z"})
