"""The event log after real actions on a real node (`nubes up`, a TCG guest): a VM's
history holds who asked (create, stop, delete) and every state it went through, in order;
a VM no host can take has a state event with the reason; `--follow` prints new events."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.node.conftest import NUBES, NodeLab
from tests.integration.node.test_end_to_end import cli, eventually

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 150.0


@pytest.fixture(scope="module")
def lab() -> Iterator[NodeLab]:
    """One node for the whole file (starting one takes most of a test's time)."""
    node = NodeLab()
    failed = True
    try:
        node.up()
        yield node
        failed = False
    finally:
        if failed:
            sys.stderr.write(f"--- node log ---\n{node.log_text()[-8000:]}\n")
        node.close()


def history(lab: NodeLab, vm_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = cli(lab, "event", "list", "--resource", vm_id)
    return events


@pytest.mark.timeout(600)
def test_a_vms_history_says_who_asked_and_which_states_followed(lab: NodeLab) -> None:
    vm = cli(lab, "vm", "create", "ev1", "--image", "tiny", "--flavor", "tiny", "--wait")
    vm_id = vm["id"]
    cli(lab, "vm", "stop", "ev1", "--force", "--wait")
    shown = cli(lab, "vm", "show", "ev1")
    states = [e["state"] for e in shown["history"] if e["type"] == "state"]
    assert states[-1] == "stopped", shown["history"]
    table = lab.nubes("vm", "show", "ev1")
    assert table.returncode == 0
    assert "history" in table.stdout
    cli(lab, "vm", "delete", "ev1", "--wait")

    def deleted() -> list[dict[str, Any]] | None:
        events = history(lab, vm_id)
        return events if any(e["type"] == "deleted" for e in events) else None

    events = eventually(deleted, timeout=60, what="the deleted event")
    requests = [(e["actor"], e["action"], e["outcome"]) for e in events if e["type"] == "request"]
    assert requests == [
        ("admin", "POST /v1/vms", "ok"),
        ("admin", "POST /v1/vms/{vm}/stop", "ok"),
        ("admin", "DELETE /v1/vms/{vm}", "ok"),
    ]
    # The states the VM went through, each request before what it caused.
    story = [
        e["action"] or e["state"] or e["type"]
        for e in events
        if e["type"] in ("request", "state", "deleted")
    ]
    expected = [
        "POST /v1/vms",
        "pending",
        "scheduled",
        "building",
        "running",
        "POST /v1/vms/{vm}/stop",
        "stopped",
        "DELETE /v1/vms/{vm}",
        "deleting",
        "deleted",
    ]
    assert [step for step in story if step in expected] == expected, story
    host = f"agent:{lab.prefix}-host"
    by_state = {e["state"]: e for e in events if e["type"] == "state"}
    assert by_state["scheduled"]["actor"] == "scheduler"
    assert by_state["running"]["actor"] == host
    assert by_state["stopped"]["actor"] == host
    assert all(e["project"] == "default" for e in events)
    assert events == sorted(events, key=lambda e: e["at"])


def _lines(process: subprocess.Popen[str], into: queue.Queue[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        into.put(line)


@pytest.mark.timeout(300)
def test_an_unplaceable_vm_has_an_error_event_that_follow_prints(lab: NodeLab) -> None:
    follower = subprocess.Popen(
        [NUBES, "event", "list", "--follow", "--kind", "vms", "-o", "json", "--limit", "1"],
        env=lab.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(follower, lines), daemon=True).start()
    try:
        time.sleep(2.0)  # let the follower list and start its watch
        vm = cli(
            lab, "vm", "create", "nowhere", "--image", "tiny", "--flavor", "tiny",
            "--label", "zone=nowhere",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        followed: list[dict[str, Any]] = []
        while not any(e.get("state") == "error" for e in followed):
            assert time.monotonic() < deadline, f"--follow printed only {followed}"
            try:
                event = json.loads(lines.get(timeout=1.0))
            except queue.Empty:
                assert follower.poll() is None, follower.stderr.read() if follower.stderr else ""
                continue
            if event["resource"] == vm["id"]:
                followed.append(event)
        error = next(e for e in followed if e["state"] == "error")
        assert error["actor"] == "scheduler"
        assert "labels do not match" in error["reason"], error
        assert "request" in [e["type"] for e in followed]
    finally:
        follower.terminate()
        try:
            follower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()
    listed = history(lab, vm["id"])
    assert any(e["state"] == "error" and e["reason"] == error["reason"] for e in listed)
    cli(lab, "vm", "delete", "nowhere")
