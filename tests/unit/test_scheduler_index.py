"""The scheduler's host index: pure, no store. It must choose as the plain filters and
weighers would, while looking at only a few hosts."""

from __future__ import annotations

import random

import pytest

from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.scheduler.filters import Overcommit, PlacementRequest, passing_hosts
from nubes.scheduler.index import HostIndex, allocation_document, parse_allocations
from nubes.scheduler.weighers import Strategy, best_host
from nubes.store.base import KeyValue
from nubes.store.keys import host_allocations_key

SIZES = [
    HostCapacity(vcpus=4, memory_mb=8192, disk_gb=100),
    HostCapacity(vcpus=16, memory_mb=65536, disk_gb=1000),
]


def record(name: str, size: int = 0, **labels: str) -> HostRecord:
    return HostRecord(
        name=name,
        capacity=SIZES[size],
        accel="tcg",
        labels=labels,
        agent_version="test",
        boot_id="b",
        started_at=now(),
    )


def allocations(host: str, revision: int, **vms: tuple[int, int, int, str | None]) -> KeyValue:
    value = {"vms": {vm: allocation_document(usage) for vm, usage in vms.items()}}
    return KeyValue(host_allocations_key(host), value, 1, revision, revision)


def add_host(index: HostIndex, name: str, size: int = 0, alive: bool = True, **labels: str) -> None:
    index.set_record(name, record(name, size, **labels))
    index.set_alive(name, alive)


@pytest.mark.parametrize("strategy", [Strategy.SPREAD, Strategy.PACK])
@pytest.mark.parametrize("seed", range(20))
def test_the_index_chooses_what_filters_and_weighers_choose_on_a_small_cluster(
    strategy: Strategy, seed: int
) -> None:
    rng = random.Random(seed)
    overcommit = Overcommit(cpu=2.0)
    index = HostIndex(overcommit, strategy)
    for number in range(6):  # fewer hosts than the index weighs: it must match exactly
        name = f"host-{number}"
        add_host(
            index,
            name,
            rng.randrange(2),
            alive=rng.random() > 0.2,
            **({"zone": "a"} if rng.random() > 0.5 else {}),
        )
        vms = {
            f"i-{number}{k}": (
                rng.randrange(1, 4),
                rng.randrange(1, 8) * 512,
                10,
                rng.choice([None, "web"]),
            )
            for k in range(rng.randrange(6))
        }
        index.set_allocations(name, allocations(name, number + 2, **vms))
    for _ in range(10):
        request = PlacementRequest(
            vcpus=rng.randrange(1, 5),
            memory_mb=rng.randrange(1, 9) * 512,
            disk_gb=10,
            labels=rng.choice([{}, {"zone": "a"}]),
            anti_affinity_group=rng.choice([None, "web"]),
        )
        passing, _ = passing_hosts(index.states(), request, overcommit)
        expected = best_host(passing, request, overcommit, strategy)
        chosen = index.choose(request)
        assert (chosen.name if chosen else None) == (expected.name if expected else None)


def test_held_vms_take_room_until_dropped_and_full_hosts_are_skipped() -> None:
    index = HostIndex(Overcommit(cpu=1.0), Strategy.SPREAD)
    add_host(index, "a")
    add_host(index, "b")
    request = PlacementRequest(vcpus=2, memory_mb=1024, disk_gb=1)
    placed: list[str] = []
    while (chosen := index.choose(request)) is not None:
        index.hold(chosen.name, f"i-{len(placed)}", (2, 1024, 1, None))
        placed.append(chosen.name)
    assert sorted(placed) == ["a", "a", "b", "b"]  # 4 vCPUs each, spread alternates
    assert "2 hosts: not enough vCPUs" in index.explain(request)
    index.drop_holds(["a"])
    chosen = index.choose(request)
    assert chosen is not None
    assert chosen.name == "a"


def test_a_stored_record_replaces_the_holds_it_contains_and_older_records_are_ignored() -> None:
    index = HostIndex(Overcommit(cpu=1.0), Strategy.SPREAD)
    add_host(index, "a")
    index.hold("a", "i-1", (1, 512, 1, None))
    index.set_allocations("a", allocations("a", 10, **{"i-1": (1, 512, 1, None)}))
    assert index.hosts["a"].used == [1, 512, 1]  # counted once
    assert index.vm_host == {"i-1": "a"}
    freed = index.set_allocations("a", allocations("a", 9))
    assert freed == set()
    assert index.hosts["a"].used == [1, 512, 1]
    freed = index.set_allocations("a", allocations("a", 11))
    assert freed == {"i-1"}
    assert index.hosts["a"].used == [0, 0, 0]
    assert index.vm_host == {}


def test_a_host_with_unreadable_allocations_is_never_chosen() -> None:
    index = HostIndex(Overcommit(), Strategy.SPREAD)
    add_host(index, "a")
    index.set_allocations("a", KeyValue(host_allocations_key("a"), {"vms": {"i-1": 3}}, 1, 5, 1))
    assert index.choose(PlacementRequest(vcpus=1, memory_mb=64, disk_gb=0)) is None


def test_labelled_requests_only_land_on_hosts_with_the_labels() -> None:
    index = HostIndex(Overcommit(), Strategy.SPREAD)
    for number in range(50):
        add_host(index, f"plain-{number:02d}", size=1)
    add_host(index, "gpu", gpu="yes")
    request = PlacementRequest(vcpus=1, memory_mb=64, disk_gb=0, labels={"gpu": "yes"})
    chosen = index.choose(request)
    assert chosen is not None
    assert chosen.name == "gpu"
    index.set_alive("gpu", False)
    assert index.choose(request) is None
    assert "1 host: down" in index.explain(request)
    assert "50 hosts: labels do not match" in index.explain(request)


def test_a_salt_orders_equal_hosts_differently_for_each_scheduler() -> None:
    picks = set()
    for salt in ("one", "two", "three", "four"):
        index = HostIndex(Overcommit(), Strategy.SPREAD, salt=salt)
        for number in range(20):
            add_host(index, f"host-{number:02d}")
        chosen = index.choose(PlacementRequest(vcpus=1, memory_mb=64, disk_gb=0))
        assert chosen is not None
        picks.add(chosen.name)
    assert len(picks) > 1


def test_on_a_large_cluster_spread_still_keeps_hosts_level() -> None:
    index = HostIndex(Overcommit(cpu=1.0), Strategy.SPREAD)
    for number in range(200):
        add_host(index, f"host-{number:03d}")
    request = PlacementRequest(vcpus=1, memory_mb=1024, disk_gb=1)
    for vm in range(400):
        chosen = index.choose(request)
        assert chosen is not None
        index.hold(chosen.name, f"i-{vm}", (1, 1024, 1, None))
    assert {entry.used[0] for entry in index.hosts.values()} == {2}


def test_allocations_documents_are_read_strictly() -> None:
    assert parse_allocations({"vms": {"i-1": allocation_document((1, 2, 3, "g"))}}) == {
        "i-1": (1, 2, 3, "g")
    }
    bad: object
    for bad in (
        [],
        {"vms": []},
        {"vms": {"i-1": {"vcpus": 1}}},
        {"vms": {"i-1": {"vcpus": "1", "memory_mb": 1, "disk_gb": 1}}},
    ):
        with pytest.raises(ValueError, match="allocation"):
            parse_allocations(bad)
