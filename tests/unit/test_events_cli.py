"""`nubes event list` and the history in `nubes vm show`: how events read in a table and
a line, and the verbs against a real API over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from nubes.cli.event import event_line, event_row, follow_start, state_text
from nubes.cli.main import app
from tests.support.api_lab import add_image
from tests.support.api_server import ApiServer, serve_api

STATE_EVENT = {
    "id": "i-abcdefghij:r0000000000000042-vms-status-0",
    "at": "2025-03-04T05:06:07.123456Z",
    "project": "alpha",
    "kind": "vms",
    "resource": "i-abcdefghij",
    "type": "state",
    "actor": "agent:h1",
    "action": None,
    "state": "running",
    "previous_state": "building",
    "reason": None,
    "outcome": None,
    "message": "VM web (i-abcdefghij) building -> running",
}


def test_an_event_row_has_time_kind_resource_type_actor_state_and_message() -> None:
    assert event_row(STATE_EVENT) == [
        "2025-03-04 05:06:07",
        "vms",
        "i-abcdefghij",
        "state",
        "agent:h1",
        "building -> running",
        "VM web (i-abcdefghij) building -> running",
    ]


def test_states_read_as_transitions() -> None:
    assert state_text({"state": "pending"}) == "pending"
    assert state_text({"type": "deleted", "previous_state": "deleting"}) == "deleting -> (gone)"
    assert state_text({"type": "request"}) == ""


def test_a_followed_event_is_one_line_without_empty_cells() -> None:
    request = {**STATE_EVENT, "type": "request", "state": None, "previous_state": None}
    line = event_line({**request, "actor": "ann", "message": "ann asked POST /v1/vms"})
    assert line == "2025-03-04 05:06:07  vms  i-abcdefghij  request  ann  ann asked POST /v1/vms"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with serve_api(tmp_path_factory.mktemp("api")) as server:
        yield server


def nubes(api: ApiServer, home: Path, *args: str) -> Result:
    env = {"XDG_CONFIG_HOME": str(home), "NUBES_URL": api.url, "NUBES_TOKEN": api.token()}
    return CliRunner().invoke(app, list(args), env=env)


def ok(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def test_event_list_and_vm_show_read_the_log(api: ApiServer, tmp_path: Path) -> None:
    api.run(add_image(api.lab, "default"))
    vm = ok(
        nubes(
            api,
            tmp_path,
            "vm",
            "create",
            "hist",
            "--image",
            "tiny",
            "--flavor",
            "tiny",
            "-o",
            "json",
        )
    )
    for _ in range(100):  # the request's event is written just after the answer
        listed = ok(
            nubes(
                api, tmp_path, "event", "list", "--resource", "hist", "--kind", "vms", "-o", "json"
            )
        )
        if listed:
            break
        time.sleep(0.05)
    assert [(e["resource"], e["action"]) for e in listed] == [(vm["id"], "POST /v1/vms")]
    shown = ok(nubes(api, tmp_path, "vm", "show", "hist", "-o", "json"))
    assert [e["id"] for e in shown["history"]] == [e["id"] for e in listed]
    table = nubes(api, tmp_path, "vm", "show", "hist")
    assert table.exit_code == 0
    assert "history" in table.stdout
    assert "POST /v1/vms" in table.stdout
    text = nubes(api, tmp_path, "event", "list")
    assert text.exit_code == 0
    assert vm["id"] in text.stdout


def test_follow_replays_from_a_little_before_the_last_event_listed() -> None:
    moment = datetime(2025, 3, 4, 5, 10, tzinfo=UTC)
    # 2025-03-04T05:06:07.123456Z less 5 seconds, in microseconds since 1970.
    assert follow_start([STATE_EVENT], moment) == "1741064762123456_-"
    # Nothing listed: from a little before now (the watch skips nothing written since).
    assert follow_start([], moment) == f"{int(moment.timestamp() * 1_000_000) - 5_000_000}_-"
