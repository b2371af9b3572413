"""Where the agent keeps each thing on its host: one place that turns ids into paths.

Ids are validated before they become path components, so no string from a request
is ever used as a host path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nubes.agent.compute.qemu_cmdline import RuntimePaths
from nubes.ids import IdKind, validate_id


@dataclass(frozen=True)
class AgentPaths:
    """state: survives reboots (disks, logs, launch records); run: tmpfs (pidfiles, sockets)."""

    state_dir: Path
    run_dir: Path

    @property
    def vms_state(self) -> Path:
        return self.state_dir / "vms"

    @property
    def vms_run(self) -> Path:
        return self.run_dir / "vms"

    @property
    def volumes(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def image_cache(self) -> Path:
        return self.state_dir / "image-cache"

    @property
    def boot_id_file(self) -> Path:
        """The host boot id the agent last ran under; a different one means the host rebooted."""
        return self.state_dir / "boot-id"

    def vm_state_dir(self, vm_id: str) -> Path:
        validate_id(vm_id, IdKind.VM)
        return self.vms_state / vm_id

    def vm_run_dir(self, vm_id: str) -> Path:
        validate_id(vm_id, IdKind.VM)
        return self.vms_run / vm_id

    def launch_record(self, vm_id: str) -> Path:
        """The plan a running QEMU was started with: what adoption compares the spec to."""
        return self.vm_state_dir(vm_id) / "launch.json"

    def runtime(self, vm_id: str, *, vnc: bool = False) -> RuntimePaths:
        run = self.vm_run_dir(vm_id)
        return RuntimePaths(
            qmp_socket=run / "qmp.sock",
            serial_socket=run / "serial.sock",
            serial_log=self.vm_state_dir(vm_id) / "serial.log",
            pidfile=run / "qemu.pid",
            guest_agent_socket=run / "qga.sock",
            vnc_socket=run / "vnc.sock" if vnc else None,
        )

    def make_dirs(self) -> None:
        for directory in (self.vms_state, self.vms_run, self.volumes, self.image_cache):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
