"""The KVM check: does /dev/kvm answer the KVM API, and what `[agent] accel` will do here.

A /dev/kvm that answers may still hang every guest (as on nested hosts gone wrong); only
booting a kernel proves it, which the agent does once per host boot when accel = "auto"
(nubes.agent.host.choose_accelerator). The doctor reads that remembered answer and never
boots anything itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nubes.agent.host import KVM_PROBE_FILE, host_boot_id
from nubes.config import Accel
from nubes.doctor.report import Check, fail, ok, warn

KVM_DEVICE = Path("/dev/kvm")
# <linux/kvm.h>: KVM_GET_API_VERSION is _IO(0xAE, 0) and the stable API has answered 12
# since Linux 2.6.22 (the same constants as nubes.agent.host.kvm_usable).
_KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
_TCG_WAY_OUT = 'if guests hang at boot, set [agent] accel = "tcg" in nubes.toml'


@dataclass(frozen=True)
class KvmProbe:
    """What /dev/kvm did when opened: missing, refused (why), or the API version it gave."""

    present: bool
    open_error: str | None = None
    api_version: int | None = None


def probe_kvm(device: Path = KVM_DEVICE) -> KvmProbe:
    """Opens the device read-write and asks its API version, as the agent does."""
    if not device.exists():
        return KvmProbe(present=False)
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return KvmProbe(present=True, open_error=error.strerror or str(error))
    try:
        return KvmProbe(present=True, api_version=fcntl.ioctl(fd, _KVM_GET_API_VERSION))
    except OSError as error:
        return KvmProbe(present=True, open_error=f"KVM_GET_API_VERSION: {error.strerror}")
    finally:
        os.close(fd)


def remembered_kvm_boot(agent_state_dir: Path) -> bool | None:
    """Whether KVM booted the agent's test kernel during this host boot; None if unknown."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((agent_state_dir / KVM_PROBE_FILE).read_text())
        if record.get("boot_id") == host_boot_id() and isinstance(record.get("kvm_boots"), bool):
            return bool(record["kvm_boots"])
    return None


def evaluate_kvm(setting: Accel, probe: KvmProbe, booted: bool | None = None) -> Check:
    """The check from what /dev/kvm did, the accel setting and the agent's remembered boot."""
    usable = probe.api_version == KVM_API_VERSION
    if not probe.present:
        found = "no /dev/kvm (no virtualisation in firmware, kvm module not loaded, or a VM)"
    elif probe.open_error is not None:
        found = f"/dev/kvm cannot be opened read-write: {probe.open_error}"
    elif not usable:
        found = f"/dev/kvm answers KVM API version {probe.api_version}, not {KVM_API_VERSION}"
    else:
        found = f"/dev/kvm answers KVM API version {KVM_API_VERSION}"
    no_kvm_fix = (
        "enable virtualisation (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd "
        "(modprobe kvm_intel); as a non-root user: adduser $USER kvm"
    )

    if setting is Accel.TCG:
        if usable:
            return warn(
                "kvm",
                f'{found}, but accel = "tcg": guests run emulated (slow)',
                'set [agent] accel = "auto" if guests boot under KVM on this host',
            )
        return ok("kvm", f'{found}; accel = "tcg": guests run emulated, KVM not needed')
    if setting is Accel.KVM:
        if usable:
            return ok("kvm", f'{found}; accel = "kvm": guests use KVM ({_TCG_WAY_OUT})')
        return fail("kvm", f'{found}, and accel = "kvm" insists on KVM', no_kvm_fix)
    if not usable:
        return warn("kvm", f'{found}; accel = "auto" runs guests emulated (slow)', no_kvm_fix)
    if booted is False:
        return warn(
            "kvm",
            f'{found}, but it did not boot the test kernel this host boot: accel = "auto" '
            "runs guests emulated (slow)",
            'check nested virtualisation on the host below; accel = "kvm" insists anyway',
        )
    if booted is True:
        return ok("kvm", f'{found} and booted a test kernel: accel = "auto" uses KVM')
    return ok(
        "kvm",
        f'{found}: KVM looks usable; accel = "auto" boots a test kernel at agent start '
        f"and uses KVM if it boots ({_TCG_WAY_OUT})",
    )
