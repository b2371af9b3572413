"""The pure parts of the compute benchmark: comparing command lines, reading agent log
times, and turning figures into verdicts."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from bench.compute import TARGETS, command_line_shape, log_times, ratios, verdicts
from nubes.agent.compute.qemu_cmdline import (
    Accelerator,
    DiskFormat,
    DiskPlan,
    KernelBoot,
    QemuPlan,
    RuntimePaths,
    build_qemu_argv,
)


def argv_of(vm_id: str, prefix: str, home: Path, image: Path, memory_mb: int = 96) -> list[str]:
    return build_qemu_argv(
        QemuPlan(
            vm_id=vm_id,
            prefix=prefix,
            accel=Accelerator.TCG,
            machine="q35",
            vcpus=1,
            memory_mb=memory_mb,
            paths=RuntimePaths(
                qmp_socket=home / "qmp.sock",
                serial_socket=home / "serial.sock",
                serial_log=home / "serial.log",
                pidfile=home / "qemu.pid",
                guest_agent_socket=home / "qga.sock",
            ),
            disks=(DiskPlan("root", home / "root.qcow2", DiskFormat.QCOW2, "root"),),
            kernel_boot=KernelBoot(image / "vmlinuz", image / "initrd.img", "console=ttyS0"),
        )
    )


def test_two_vms_of_one_flavor_have_the_same_command_line_shape() -> None:
    ours = argv_of("i-0123456789", "t1a2b", Path("/tmp/nb-x/run/vms/i-0123456789"), Path("/a"))
    theirs = argv_of("i-9876543210", "b3c4d", Path("/tmp/nbb-y/0"), Path("/b/c"))

    assert ours != theirs
    assert command_line_shape(ours, vm_id="i-0123456789", prefix="t1a2b") == command_line_shape(
        theirs, vm_id="i-9876543210", prefix="b3c4d"
    )


def test_a_different_memory_size_shows_in_the_command_line_shape() -> None:
    home, image = Path("/tmp/nb-x/0"), Path("/a")
    small = argv_of("i-0123456789", "t1a2b", home, image, memory_mb=64)
    large = argv_of("i-0123456789", "t1a2b", home, image, memory_mb=96)

    assert command_line_shape(small, vm_id="i-0123456789", prefix="t1a2b") != command_line_shape(
        large, vm_id="i-0123456789", prefix="t1a2b"
    )


def test_log_times_reads_the_timestamp_of_each_agent_log_line() -> None:
    text = (
        "2026-11-21 13:57:11,328 DEBUG asyncio: Using selector: EpollSelector\n"
        "  a continuation line without a timestamp\n"
        "2026-11-21 13:57:11,370 INFO nubes.agent.agent: agent lab-host up (tcg, 0 VMs)\n"
    )

    lines = log_times(text)

    assert [line for _, line in lines] == [
        "DEBUG asyncio: Using selector: EpollSelector",
        "INFO nubes.agent.agent: agent lab-host up (tcg, 0 VMs)",
    ]
    first = datetime(2026, 11, 21, 13, 57, 11, 328_000).timestamp()
    assert abs(lines[0][0] - first) < 1e-6
    assert abs(lines[1][0] - lines[0][0] - 0.042) < 1e-6


def results(single: float, batch: float, restart: float, pss_growth_kib: int) -> dict[str, Any]:
    """Figures of a run where nubes takes `single` / `batch` times as long as bare QEMU."""

    def pair(ratio: float) -> dict[str, list[dict[str, float]]]:
        return {
            "nubes": [{"seconds": ratio, "cpu": 0.0, "tools_cpu": 0.0}],
            "bare": [{"seconds": 1.0, "cpu": 0.0, "tools_cpu": 0.0}],
        }

    restart_figures = {
        "seconds": restart,
        "adopted": 2,
        "left_running": [],
        "pids_changed": False,
        "restarts": 0,
    }
    return {
        "single": pair(single),
        "batch": pair(batch),
        "restarts": [restart_figures],
        "memory_kib": {
            "created_0": {"pss": 1000},
            "created_2": {"pss": 1000 + pss_growth_kib},
            "fresh_0": {"pss": 1000},
            "adopted_2": {"pss": 1000},
        },
        "helpers": [],
    }


def test_ratios_divide_each_nubes_round_by_its_bare_round() -> None:
    pair = {
        "nubes": [{"seconds": 3.0}, {"seconds": 1.0}],
        "bare": [{"seconds": 2.0}, {"seconds": 1.0}],
    }

    assert ratios(pair) == [1.5, 1.0]


def test_every_target_is_met_when_each_figure_is_within_it() -> None:
    figures = results(TARGETS["single_ratio"], TARGETS["batch_ratio"], 0.5, 1024)

    assert [met for _, _, met in verdicts(figures, 2)] == [True, True, True, True]


def test_a_figure_beyond_its_target_is_missed() -> None:
    figures = results(1.6, 1.0, 1.5, 4 * 1024)

    assert [met for _, _, met in verdicts(figures, 2)] == [False, True, False, False]


def test_a_vm_restarted_by_the_new_agent_misses_the_restart_target() -> None:
    figures = results(1.0, 1.0, 0.5, 0)
    figures["restarts"][0]["restarts"] = 1

    assert [met for _, _, met in verdicts(figures, 2)] == [True, True, False, True]
