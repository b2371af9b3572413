"""`nubes store copy`: a one-machine cloud's SQLite state moves into a real, empty etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nubes.store.base import Compare, Put
from nubes.store.etcd import EtcdStore
from nubes.store.sqlite import SqliteStore
from tests.support.etcd import running_etcd

pytestmark = pytest.mark.integration


def copy(config: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUBES_")}
    env["NUBES_CONFIG"] = str(config)
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "nubes"),
            "store",
            "copy",
            "--to",
            endpoint,
            "-o",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def test_every_record_moves_to_an_empty_etcd_and_a_second_copy_is_refused(
    tmp_path: Path,
) -> None:
    config = tmp_path / "nubes.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n')
    source = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        written = {f"/nubes/vms/i-{index:010d}": {"spec": {"n": index}} for index in range(1234)}
        written["/nubes/vms/i-0000000001/status"] = {"state": "running"}
        written["/nubes/names/vms/default/web"] = "i-0000000001"
        items = list(written.items())
        for start in range(0, len(items), 100):
            await source.txn([], [Put(key, value) for key, value in items[start : start + 100]])
        lease = await source.lease_grant(60)
        await source.put(
            "/nubes/images/img-aaaaaaaaaa/status", {"state": "importing"}, lease=lease.id
        )
    finally:
        await source.close()

    with running_etcd(tmp_path / "etcd") as etcd:
        completed = copy(config, etcd.endpoint)
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout) == {
            "copied": len(written),
            "leased_skipped": 1,
            "endpoints": [etcd.endpoint],
        }
        target = await EtcdStore.connect([etcd.endpoint])
        try:
            copied = (await target.range("/nubes/")).kvs
            assert {kv.key: kv.value for kv in copied} == written  # not the import in progress
            again = copy(config, etcd.endpoint)
            assert again.returncode != 0
            assert "store_not_empty" in again.stderr
            assert len((await target.range("/nubes/")).kvs) == len(written)
        finally:
            await target.close()


async def test_a_store_whose_agent_is_alive_is_not_copied(tmp_path: Path) -> None:
    config = tmp_path / "nubes.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n')
    source = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        await source.put("/nubes/vms/i-0000000001", {"spec": {}})
        lease = await source.lease_grant(60)
        await source.put("/nubes/hosts/node1/alive", {}, lease=lease.id)
    finally:
        await source.close()
    with running_etcd(tmp_path / "etcd") as etcd:
        completed = copy(config, etcd.endpoint)
        assert completed.returncode != 0
        assert "daemons_running" in completed.stderr
        assert "nubes down" in completed.stderr
        target = await EtcdStore.connect([etcd.endpoint])
        try:
            assert (await target.range("/nubes/")).kvs == []
            assert (await target.txn([Compare.absent("/nubes/vms/i-0000000001")])).succeeded
        finally:
            await target.close()
