"""Storage pools: where disks live, the refusal of a pool a host lacks, the shared base
image made once however many makers race, and the pool settings of the agent config."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from nubes.agent.storage import pools as pools_module
from nubes.agent.storage.images import CachedImage
from nubes.agent.storage.pools import StoragePools, UnknownPool, shared_base
from nubes.config import AgentConfig
from nubes.errors import InvalidId
from nubes.model.image import ImageFormat

VM = "i-abcdefghij"
VOLUME = "vol-abcdefghij"
IMAGE = "img-abcdefghij"


def test_local_is_the_state_dir_with_todays_layout_and_shared_pools_are_their_own(
    tmp_path: Path,
) -> None:
    pools = StoragePools(tmp_path / "agent", {"shared": tmp_path / "nfs"})
    local, shared = pools.get("local", host="h1"), pools.get("shared", host="h1")
    assert not local.shared
    assert local.root_disk(VM) == tmp_path / "agent" / "vms" / VM / "root.qcow2"
    assert local.volume(VOLUME) == tmp_path / "agent" / "volumes" / f"{VOLUME}.qcow2"
    assert shared.shared
    assert shared.root_disk(VM) == tmp_path / "nfs" / "vms" / VM / "root.qcow2"
    assert shared.base_image(IMAGE, "qcow2") == tmp_path / "nfs" / "images" / f"{IMAGE}.qcow2"
    assert pools.shared_names == ["shared"]


def test_a_pool_the_host_lacks_is_refused_with_what_it_has_and_what_to_do(
    tmp_path: Path,
) -> None:
    pools = StoragePools(tmp_path, {"shared": tmp_path / "nfs"})
    with pytest.raises(UnknownPool) as raised:
        pools.get("ceph", host="h7")
    assert raised.value.code == "unknown_storage_pool"
    assert "'ceph' is not configured on host h7 (it has: local, shared)" in raised.value.message
    assert raised.value.hint is not None
    assert "storage_pools" in raised.value.hint


def test_paths_are_only_made_from_valid_ids(tmp_path: Path) -> None:
    pool = StoragePools(tmp_path, {}).get("local", host="h1")
    with pytest.raises(InvalidId):
        pool.root_disk("../../etc")
    with pytest.raises(InvalidId):
        pool.volume("vol-../x")


def cached(tmp_path: Path) -> CachedImage:
    disk = tmp_path / "cache" / IMAGE / "disk"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"Q" * 100_000)
    return CachedImage(
        id=IMAGE,
        disk=disk,
        format=ImageFormat.QCOW2,
        virtual_size=1 << 20,
        kernel=None,
        initrd=None,
        cmdline=None,
    )


async def test_the_shared_base_is_copied_once_whole_however_many_makers_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = cached(tmp_path)
    pool = StoragePools(tmp_path, {"shared": tmp_path / "nfs"}).get("shared", host="h1")
    copies = 0
    lock = threading.Lock()
    real_copy = pools_module.shutil.copyfile

    def counting_copy(source: Path, target: Path) -> object:
        nonlocal copies
        with lock:
            copies += 1
        return real_copy(source, target)

    monkeypatch.setattr(pools_module.shutil, "copyfile", counting_copy)
    results = await asyncio.gather(*(shared_base(pool, image) for _ in range(8)))

    target = tmp_path / "nfs" / "images" / f"{IMAGE}.qcow2"
    assert {result.disk for result in results} == {target}
    assert target.read_bytes() == image.disk.read_bytes()
    assert copies == 1
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_the_config_takes_shared_pools_and_reserves_local() -> None:
    config = AgentConfig(storage_pools={"shared": "/srv/nubes-shared"})
    assert config.storage_pools == {"shared": Path("/srv/nubes-shared")}
    with pytest.raises(ValidationError, match="reserved"):
        AgentConfig(storage_pools={"local": "/srv/x"})
    with pytest.raises(ValidationError, match="not a storage pool name"):
        AgentConfig(storage_pools={"../x": "/srv/x"})
    with pytest.raises(ValidationError, match="absolute"):
        AgentConfig(storage_pools={"shared": "relative/dir"})


def test_the_default_heartbeat_lets_a_dead_host_be_down_within_10_seconds() -> None:
    # etcd ends an expired lease within 0.5 s of its TTL; the watch and the monitor's
    # write take milliseconds.
    assert AgentConfig().heartbeat_ttl + 0.5 < 10
