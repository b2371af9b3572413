"""`accel = auto`: KVM only when it boots a kernel, remembered for the host's boot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nubes.agent import host
from nubes.agent.compute.qemu_cmdline import Accelerator
from nubes.config import Accel


def fake_qemu(directory: Path, body: str) -> str:
    script = directory / "qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_a_kvm_that_exits_after_the_panic_boots_guests(tmp_path: Path) -> None:
    assert host.kvm_boots_guests(fake_qemu(tmp_path, "exit 0"), tmp_path / "vmlinuz")


def test_a_kvm_that_hangs_or_fails_does_not(tmp_path: Path) -> None:
    assert not host.kvm_boots_guests(fake_qemu(tmp_path, "sleep 30"), tmp_path / "k", timeout=0.3)
    assert not host.kvm_boots_guests(fake_qemu(tmp_path, "exit 1"), tmp_path / "k")


def test_auto_probes_once_per_host_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "images" / "img-1" / "kernel"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"bzImage")
    monkeypatch.setattr(host, "kvm_usable", lambda: True)
    counter = tmp_path / "runs"
    qemu = fake_qemu(tmp_path, f"echo run >> {counter}; sleep 30")
    monkeypatch.setattr(host, "KVM_PROBE_SECONDS", 0.3)

    def choose() -> Accelerator:
        return host.choose_accelerator(
            Accel.AUTO, qemu=qemu, state_dir=tmp_path / "state", image_dir=tmp_path / "images"
        )

    assert choose() is Accelerator.TCG
    assert choose() is Accelerator.TCG
    assert counter.read_text().count("run") == 1
    record = json.loads((tmp_path / "state" / host.KVM_PROBE_FILE).read_text())
    assert record == {"boot_id": host.host_boot_id(), "kvm_boots": False}
    assert host.choose_accelerator(Accel.KVM) is Accelerator.KVM
