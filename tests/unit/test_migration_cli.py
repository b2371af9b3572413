"""`nubes vm migrate` against the real API over HTTP: it asks for the move, `--wait` follows
the progress record to its end (written here as the agents would), and a failed move
exits non-zero with the reason."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.model.common import now
from nubes.model.migration import MigrationState, MigrationStatus
from nubes.model.vm import VmState
from nubes.store.keys import migration_key
from tests.support.api_lab import add_image
from tests.support.api_server import ApiServer, serve_api
from tests.unit.test_api_vms import add_key, add_network, bind, report
from tests.unit.test_cli_api import failed, nubes, ok
from tests.unit.test_migration_api import add_host


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    with serve_api(tmp_path / "api") as server:
        server.run(add_host(server.lab, "node1", alive=True))
        server.run(add_host(server.lab, "node2", alive=True))
        server.run(add_image(server.lab, "default"))
        server.run(add_network(server.lab, "default"))
        server.run(add_key(server.lab, "default"))
        yield server


def running_vm(api: ApiServer, home: Path, token: str) -> str:
    made = ok(
        nubes(home, "vm", "create", "web", "--flavor", "small", "--image", "tiny",
              "--storage-pool", "shared", "-o", "json", url=api.url, token=token)
    )  # fmt: skip
    api.run(bind(api.lab, made["id"], "node1"))
    api.run(report(api.lab, made["id"], VmState.RUNNING, host="node1"))
    return str(made["id"])


def finish_later(
    api: ApiServer, vm_id: str, state: MigrationState, reason: str | None
) -> threading.Thread:
    """What the agents would write a moment later: the end of the move."""

    def finish() -> None:
        time.sleep(0.5)

        async def write() -> None:
            kv = await api.lab.store.get(migration_key(vm_id))
            assert kv is not None
            progress = MigrationStatus.from_json(kv.value)
            done = progress.model_copy(
                update={"state": state, "reason": reason, "downtime_ms": 7, "updated_at": now()}
            )
            await api.lab.store.put(kv.key, done.to_json())

        api.run(write())

    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    return thread


def test_migrate_asks_once_and_refuses_a_second_move(api: ApiServer, tmp_path: Path) -> None:
    home, token = tmp_path / "config", api.token()
    vm_id = running_vm(api, home, token)
    asked = ok(
        nubes(home, "vm", "migrate", vm_id, "--to", "node2", "-o", "json", url=api.url, token=token)
    )
    assert asked["spec"]["migration"]["target"] == "node2"
    again = failed(nubes(home, "vm", "migrate", vm_id, "-o", "json", url=api.url, token=token), 1)
    assert again["code"] == "migration_in_progress"


def test_migrate_wait_reports_the_move_and_its_downtime(api: ApiServer, tmp_path: Path) -> None:
    home, token = tmp_path / "config", api.token()
    vm_id = running_vm(api, home, token)
    thread = finish_later(api, vm_id, MigrationState.COMPLETED, None)
    result = nubes(home, "vm", "migrate", vm_id, "--wait", url=api.url, token=token)
    thread.join()
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "from node1 to node2 (downtime 7 ms)" in result.stdout


def test_migrate_wait_fails_with_the_reason(api: ApiServer, tmp_path: Path) -> None:
    home, token = tmp_path / "config", api.token()
    vm_id = running_vm(api, home, token)
    thread = finish_later(api, vm_id, MigrationState.FAILED, "host node2 broke")
    result = nubes(home, "vm", "migrate", vm_id, "--wait", "-o", "json", url=api.url, token=token)
    thread.join()
    assert result.exit_code == 1
    assert "host node2 broke" in json.loads(result.stderr)["message"]
