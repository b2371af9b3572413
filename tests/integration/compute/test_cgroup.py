"""CPU weights of VMs: the real QEMU process moved into its group with every thread, the
weight read back from the kernel, and the group removed once QEMU has gone. The mountinfo
reading and the cgroup v2 writes are also checked on a fake tree, since a host has either
the v1 or the v2 cpu controller, never both.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nubes.agent.compute.cgroup import (
    CgroupError,
    CgroupVersion,
    CpuHierarchy,
    CpuWeights,
    find_cpu_hierarchy,
    parse_mountinfo,
    shares_to_weight,
    weight_to_shares,
)
from nubes.agent.compute.process import signal_process, wait_exited
from nubes.errors import InvalidId
from tests.integration.compute.conftest import MakeVm

pytestmark = pytest.mark.integration

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def cpu_groups_of_threads(pid: int, version: CgroupVersion) -> set[str]:
    """The group of every thread of `pid` in the hierarchy that has the cpu controller."""
    groups = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if version is CgroupVersion.V2 and controllers == "":
                groups.add(path)
            if version is CgroupVersion.V1 and "cpu" in controllers.split(","):
                groups.add(path)
    return groups


def host_cpu_hierarchy() -> CpuHierarchy | None:
    return find_cpu_hierarchy(Path("/proc/self/mountinfo").read_text())


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@pytest.mark.usefixtures("cgroup_cleanup")
async def test_a_vm_gets_its_cpu_weight_and_its_group_goes_after_qemu(
    make_vm: MakeVm, prefix: str
) -> None:
    weights = CpuWeights(prefix)
    hierarchy = host_cpu_hierarchy()
    if hierarchy is None:
        pytest.skip("this host has no cgroup cpu controller")
    assert weights.available() == hierarchy.version
    vm = make_vm()
    pid = await vm.launch()
    vm_id = vm.plan.vm_id
    group = hierarchy.mount / f"nubes-{prefix}" / vm_id

    assert weights.apply(vm_id, pid, 250) == 250
    assert weights.read(vm_id) == 250
    if hierarchy.version is CgroupVersion.V1:
        assert (group / "cpu.shares").read_text() == "2560\n"
    else:
        assert (group / "cpu.weight").read_text() == "250\n"
    # QEMU runs many threads (vCPU, I/O, RCU...): every one of them moved.
    assert thread_count(pid) > 1
    assert cpu_groups_of_threads(pid, hierarchy.version) == {f"/nubes-{prefix}/{vm_id}"}
    assert weights.apply(vm_id, pid, 20000) == 10000  # clamped, applied again in place
    assert weights.orphans([]) == [vm_id]
    assert weights.orphans([vm_id]) == []

    with pytest.raises(CgroupError, match="a process still runs in it"):
        weights.remove(vm_id)
    signal_process(pid, signal.SIGKILL)
    assert await wait_exited(pid, 5)
    weights.remove(vm_id)  # QEMU may still be a zombie: that does not hold the group
    weights.remove(vm_id)
    assert not group.exists()
    assert weights.read(vm_id) is None
    assert weights.orphans([]) == []
    weights.remove_root()
    assert not group.parent.exists()


@pytest.mark.usefixtures("cgroup_cleanup")
def test_a_weight_for_a_process_that_is_gone_fails_and_leaves_no_group(prefix: str) -> None:
    weights = CpuWeights(prefix)
    if weights.available() is None:
        pytest.skip("this host has no cgroup cpu controller")
    with pytest.raises(CgroupError, match=r"cannot set the CPU weight of i-0123456789: .*procs"):
        weights.apply("i-0123456789", 2**22 + 1, 100)
    assert weights.read("i-0123456789") is None


def test_the_cpu_controller_is_found_in_v1_on_a_hybrid_host_whose_v2_lacks_it(
    tmp_path: Path,
) -> None:
    hierarchy = find_cpu_hierarchy(HYBRID_MOUNTINFO)
    assert hierarchy is not None
    assert (hierarchy.version, hierarchy.mount) == ("v1", Path("/sys/fs/cgroup/cpu"))


def test_cgroup_v2_is_preferred_when_it_has_the_cpu_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mountinfo = HYBRID_MOUNTINFO + f"50 23 0:40 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    hierarchy = find_cpu_hierarchy(mountinfo)
    assert hierarchy is not None
    assert (hierarchy.version, hierarchy.mount) == ("v2", tmp_path)


def test_escaped_mount_points_are_read_back_as_they_are() -> None:
    line = r"60 23 0:50 / /mnt/with\040space\134x rw - cgroup cgroup rw,cpu,cpuacct"
    assert parse_mountinfo(line) == [(Path("/mnt/with space\\x"), "cgroup", "rw,cpu,cpuacct")]
    assert parse_mountinfo("garbage\n\n1 2 3 - x\n") == []


def test_no_cpu_controller_means_no_weights(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    weights = CpuWeights("t1", mountinfo=mountinfo)
    assert weights.available() is None
    assert weights.apply("i-0123456789", 1, 100) is None
    assert weights.read("i-0123456789") is None
    assert weights.orphans([]) == []
    weights.remove("i-0123456789")


def test_cgroup_v2_weights_enable_the_controller_down_to_the_vm_group(tmp_path: Path) -> None:
    """On a fake v2 tree (plain files): the writes the kernel would get, in order."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"50 23 0:40 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    weights = CpuWeights("t1", mountinfo=mountinfo)

    assert weights.apply("i-0123456789", 4242, 300) == 300

    group = tmp_path / "nubes-t1" / "i-0123456789"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu\n"
    assert (tmp_path / "nubes-t1" / "cgroup.subtree_control").read_text() == "+cpu\n"
    assert (group / "cpu.weight").read_text() == "300\n"
    assert (group / "cgroup.procs").read_text() == "4242\n"


def test_v1_shares_and_weights_convert_both_ways_without_drift() -> None:
    assert weight_to_shares(100) == 1024
    assert weight_to_shares(1) == 10
    assert weight_to_shares(10000) == 102400
    assert all(shares_to_weight(weight_to_shares(weight)) == weight for weight in range(1, 10001))
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262144) == 10000


def test_a_vm_id_cannot_name_a_path_outside_the_group(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"32 31 0:29 / {tmp_path} rw - cgroup cgroup rw,cpu\n")
    weights = CpuWeights("t1", mountinfo=mountinfo)
    with pytest.raises(InvalidId):
        weights.read("../../etc")
