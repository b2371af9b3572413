"""Usage accounting on a real `nubes up` node, through the CLI: a TCG VM, a volume and a
floating IP are metered; `nubes usage` shows the VM's minutes between bounds its own
statuses give, the volume's GiB-hours and the floating IP's hours, and a stopped VM
stops counting."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.integration.node.conftest import NodeLab

pytestmark = pytest.mark.integration

RUN_SECONDS = 20.0


def cli(lab: NodeLab, *arguments: str) -> Any:
    completed = lab.nubes(*arguments, "-o", "json")
    assert completed.returncode == 0, f"nubes {' '.join(arguments)}:\n{completed.stderr}"
    return json.loads(completed.stdout) if completed.stdout.strip() else None


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def line_of(report: dict[str, Any], resource: str) -> dict[str, Any]:
    lines: list[dict[str, Any]] = report["resources"]
    [line] = [line for line in lines if line["resource"] == resource]
    return line


@pytest.mark.timeout(600)
def test_usage_shows_vm_minutes_volume_gib_hours_and_floating_ip_hours(
    node_lab: NodeLab,
) -> None:
    lab = node_lab
    lab.up()
    before_create = datetime.now(UTC)
    vm = cli(
        lab, "vm", "create", "metered", "--image", "tiny", "--flavor", "tiny",
        "--network", "default", "--wait",
    )  # fmt: skip
    running_at = at(cli(lab, "vm", "show", vm["id"])["status"]["updated_at"])
    volume = cli(lab, "volume", "create", "data", "--size", "2", "--wait")
    fip = cli(lab, "floating-ip", "create", "--network", "public")
    time.sleep(RUN_SECONDS)
    cli(lab, "vm", "stop", vm["id"], "--force", "--wait")
    stopped_at = at(cli(lab, "vm", "show", vm["id"])["status"]["updated_at"])

    first_read = datetime.now(UTC)
    report = cli(lab, "usage")
    after_read = datetime.now(UTC)
    vm_line = line_of(report, vm["id"])
    seconds = vm_line["seconds"]
    # The meter starts at the first `running` status, which is no later than the one read
    # after the wait and no earlier than the create; it ends at the `stopped` status.
    assert (stopped_at - running_at).total_seconds() - 1 <= seconds
    assert seconds <= (stopped_at - before_create).total_seconds() + 1
    assert seconds >= RUN_SECONDS
    assert not vm_line["running"]
    [flavor] = report["vms"]["flavors"]
    assert flavor["flavor"] == "tiny"
    assert flavor["minutes"] == pytest.approx(seconds / 60, abs=1e-3)

    created = at(volume["created_at"])
    low = 2 * (first_read - created).total_seconds() / 3600
    high = 2 * (after_read - created).total_seconds() / 3600
    assert low - 1e-3 <= report["volumes"]["gib_hours"] <= high + 1e-3
    assert line_of(report, volume["id"])["running"]
    assert report["floating_ips"]["hours"] > 0
    assert line_of(report, fip["id"])["running"]

    time.sleep(3)
    again = cli(lab, "usage")
    assert line_of(again, vm["id"])["seconds"] == seconds  # stopped: no longer counting
    assert again["volumes"]["gib_hours"] > report["volumes"]["gib_hours"]

    # People read a table; a bad date is a clear error.
    table = lab.nubes("usage", "--from", "2020-01-01")
    assert table.returncode == 0, table.stderr
    assert "VM-minutes" in table.stdout
    assert "tiny" in table.stdout
    refused = lab.nubes("usage", "--from", "someday")
    assert refused.returncode != 0
    assert "not a date" in refused.stderr
