"""The scheduler benchmark's final check finds overbooking, double binding and strays."""

from __future__ import annotations

import random
from typing import Any

from bench.scheduler import host_documents, verify, vm_documents
from nubes.config import SchedulerConfig
from nubes.scheduler.index import allocation_document


def bound_cluster() -> dict[str, Any]:
    documents = dict(host_documents(2))
    vms = dict(vm_documents(4, random.Random(1)))
    allocations: dict[str, dict[str, Any]] = {"host-00000": {}, "host-00001": {}}
    for number, (_key, value) in enumerate(vms.items()):
        host = f"host-0000{number % 2}"
        value["spec"]["host"] = host
        flavor = value["spec"]["flavor"]
        usage = (flavor["vcpus"], flavor["memory_mb"], flavor["disk_gb"], None)
        allocations[host][value["id"]] = allocation_document(usage)
    documents |= vms
    for host, entries in allocations.items():
        documents[f"/nubes/hosts/{host}/allocations"] = {"vms": entries}
    return documents


def test_a_consistent_cluster_passes() -> None:
    check = verify(bound_cluster(), SchedulerConfig())
    assert check.problems == []
    assert check.bound == 4


def test_double_binding_overbooking_and_unbound_vms_are_found() -> None:
    documents = bound_cluster()
    first = documents["/nubes/hosts/host-00000/allocations"]["vms"]
    second = documents["/nubes/hosts/host-00001/allocations"]["vms"]
    vm_id = next(iter(first))
    second[vm_id] = first[vm_id]  # recorded on both hosts
    first["i-ghost00000"] = allocation_document((1000, 1, 1, None))  # overbooks, no record
    unbound = next(k for k, v in documents.items() if k.count("/") == 3 and "spec" in v)
    documents[unbound]["spec"]["host"] = None
    problems = "\n".join(verify(documents, SchedulerConfig()).problems)
    assert f"{vm_id} recorded on 2 hosts" in problems
    assert "host-00000: 100" in problems
    assert "vCPUs bound, over capacity" in problems
    assert "i-ghost00000 recorded but has no record" in problems
    assert "is not bound" in problems
