"""Scheduler filters and weighers: pure, no store."""

from __future__ import annotations

from collections import Counter

from nubes.model.host import HostCapacity
from nubes.scheduler.filters import (
    HostState,
    Overcommit,
    PlacementRequest,
    explain,
    passing_hosts,
)
from nubes.scheduler.weighers import Strategy, best_host

CAPACITY = HostCapacity(vcpus=4, memory_mb=8192, disk_gb=100)
SMALL = PlacementRequest(vcpus=1, memory_mb=1024, disk_gb=10)


def host(name: str, **state: object) -> HostState:
    fields: dict[str, object] = {"name": name, "alive": True, "capacity": CAPACITY}
    fields.update(state)
    return HostState(**fields)  # type: ignore[arg-type]


def test_down_full_mislabelled_and_anti_affine_hosts_are_filtered_out_with_reasons() -> None:
    hosts = [
        host("down", alive=False),
        host("full-memory", used_memory_mb=7500),
        host("full-cpu", used_vcpus=16),
        host("gpu", labels={"gpu": "yes"}),
        host("plain"),
        host("has-sibling", anti_affinity_groups=frozenset({"web"})),
    ]
    request = PlacementRequest(
        vcpus=1, memory_mb=1024, disk_gb=10, labels={}, anti_affinity_group="web"
    )
    passing, refused = passing_hosts(hosts, request, Overcommit())
    assert [h.name for h in passing] == ["gpu", "plain"]
    assert refused == Counter(
        {
            "down": 1,
            "not enough memory": 1,
            "not enough vCPUs": 1,
            "runs a VM of anti-affinity group web": 1,
        }
    )
    labelled = PlacementRequest(vcpus=1, memory_mb=1024, disk_gb=10, labels={"gpu": "yes"})
    passing, _ = passing_hosts(hosts, labelled, Overcommit())
    assert [h.name for h in passing] == ["gpu"]


def test_overcommit_ratios_stretch_capacity() -> None:
    busy = host("busy", used_vcpus=4, used_memory_mb=8192)
    passing, _ = passing_hosts([busy], SMALL, Overcommit(cpu=4.0, memory=1.0))
    assert passing == []
    passing, _ = passing_hosts([busy], SMALL, Overcommit(cpu=4.0, memory=1.5))
    assert passing == [busy]


def test_spread_takes_the_emptiest_host_and_pack_the_fullest_that_fits() -> None:
    hosts = [host("a", used_memory_mb=4096), host("b"), host("c", used_memory_mb=6144)]
    assert best_host(hosts, SMALL, Overcommit(), Strategy.SPREAD) == hosts[1]
    assert best_host(hosts, SMALL, Overcommit(), Strategy.PACK) == hosts[2]
    assert best_host([], SMALL, Overcommit(), Strategy.PACK) is None


def test_ties_go_to_the_first_name_so_a_decision_is_repeatable() -> None:
    hosts = [host("host-b"), host("host-a"), host("host-ab")]
    assert best_host(hosts, SMALL, Overcommit(), Strategy.SPREAD) == hosts[1]
    assert best_host(hosts, SMALL, Overcommit(), Strategy.PACK) == hosts[1]


def test_the_reason_says_what_turned_each_host_away() -> None:
    assert "start an agent" in explain(Counter(), SMALL)
    line = explain(Counter({"down": 2, "not enough memory": 3}), SMALL)
    assert line == (
        "no host can take this VM (1 vCPUs, 1024 MiB, 10 GB): "
        "3 hosts: not enough memory, 2 hosts: down"
    )
