"""An agent's /metrics: on each scrape, sample the host and every live QEMU (QMP block
counters through the agent's own sessions, in parallel and briefly; CPU, memory and tap
counters from /proc), then render them with the reconcile and store metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry

from nubes.agent.compute.process import ProcessState, process_state
from nubes.agent.network.names import tap_name
from nubes.errors import NubesError
from nubes.metrics.http import MetricsServer
from nubes.metrics.procfs import sample_process
from nubes.metrics.samples import (
    MIB,
    AgentSnapshot,
    DiskCounters,
    HostSample,
    NicCounters,
    VmSample,
    nic_counters_from_tap,
    parse_blockstats,
    render_snapshot,
)
from nubes.metrics.store import store_metrics_of

if TYPE_CHECKING:
    from nubes.agent.context import AgentContext
    from nubes.agent.runtime import VmRuntime

log = logging.getLogger(__name__)

QMP_SAMPLE_TIMEOUT_SECONDS = 1.0
GIB = 1024 * MIB


class _SnapshotCollector:
    """Hands the registry the families of the snapshot the current scrape gathered."""

    def __init__(self) -> None:
        self.snapshot: AgentSnapshot | None = None

    def collect(self) -> Iterable[Metric]:
        return [] if self.snapshot is None else list(render_snapshot(self.snapshot))


class AgentMetrics:
    """One agent's registry, and its endpoint when `[agent] metrics_port` is not 0."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.registry = CollectorRegistry()
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        ctx.reconcile_metrics.register(self.registry)
        store_metrics = store_metrics_of(ctx.store)
        if store_metrics is not None:
            store_metrics.register(self.registry)
        self.server: MetricsServer | None = None

    async def start(self) -> None:
        """Serves /metrics; a port that cannot be bound is logged and the agent runs on."""
        config = self.ctx.config
        if config.metrics_port == 0:
            return
        server = MetricsServer(self.scrape, listen=config.metrics_listen, port=config.metrics_port)
        try:
            await server.start()
        except OSError as error:
            log.warning(
                "agent metrics are off: cannot listen on %s port %d (%s); set [agent] "
                "metrics_port to a free port, or 0 to turn them off",
                config.metrics_listen,
                config.metrics_port,
                error.strerror or error,
            )
            return
        self.server = server
        log.info("agent metrics at http://%s:%d/metrics", config.metrics_listen, server.bound_port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def scrape(self) -> bytes:
        """The exposition text of everything the agent measures, sampled now."""
        self._collector.snapshot = await self.snapshot()
        return generate_latest(self.registry)

    async def snapshot(self) -> AgentSnapshot:
        runtimes = self.ctx.runtimes()
        samples = await asyncio.gather(
            *(self._sample_vm_or_none(vm_id, rt) for vm_id, rt in sorted(runtimes.items()))
        )
        return AgentSnapshot(host=self._sample_host(), vms=[s for s in samples if s is not None])

    async def _sample_vm_or_none(self, vm_id: str, runtime: VmRuntime) -> VmSample | None:
        """One VM's sample, or None: a VM that cannot be read loses its series for this
        scrape, and the host and the other VMs are served all the same."""
        try:
            return await self._sample_vm(vm_id, runtime)
        except (OSError, ValueError) as error:
            log.warning("metrics: cannot sample VM %s, left out of this scrape: %s", vm_id, error)
        except Exception:
            log.exception("metrics: sampling VM %s failed; left out of this scrape", vm_id)
        return None

    def _sample_host(self) -> HostSample:
        capacity = self.ctx.capacity
        free = size = 0
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(self.ctx.paths.state_dir)
            free, size = usage.free, usage.total
        return HostSample(
            host=self.ctx.host,
            capacity_vcpus=capacity.vcpus,
            capacity_memory_bytes=capacity.memory_mb * MIB,
            capacity_disk_bytes=capacity.disk_gb * GIB,
            state_dir_free_bytes=free,
            state_dir_size_bytes=size,
        )

    async def _sample_vm(self, vm_id: str, runtime: VmRuntime) -> VmSample | None:
        # A daemonized QEMU lingers as a zombie for a while after it ends: gone already.
        if process_state(runtime.pid) is not ProcessState.RUNNING:
            return None
        process = sample_process(runtime.pid)
        if process is None:
            return None
        launch = runtime.launch
        record = self.ctx.vms.get(vm_id)
        nics: list[NicCounters] = []
        for port in launch.ports:
            tap = tap_name(port)
            counters = process.interfaces.get(tap)
            if counters is not None:
                nics.append(
                    nic_counters_from_tap(
                        port,
                        tap,
                        counters.rx_bytes,
                        counters.rx_packets,
                        counters.tx_bytes,
                        counters.tx_packets,
                    )
                )
        return VmSample(
            vm=vm_id,
            project=record.project if record is not None else "",
            vcpus=launch.flavor.vcpus,
            memory_bytes=launch.flavor.memory_mb * MIB,
            cpu_seconds=process.cpu_seconds,
            resident_bytes=process.resident_bytes,
            disks=await self._block_counters(vm_id, runtime),
            nics=nics,
        )

    async def _block_counters(self, vm_id: str, runtime: VmRuntime) -> list[DiskCounters]:
        """From the VM's QMP session the agent already holds; none when it is not connected
        or slow (a scrape never waits on one stuck QEMU for long)."""
        session = runtime.session
        if session is None or not runtime.connected:
            return []
        try:
            async with asyncio.timeout(QMP_SAMPLE_TIMEOUT_SECONDS):
                return parse_blockstats(await session.execute("query-blockstats"))
        except (TimeoutError, NubesError) as error:
            log.debug("metrics: no block counters of %s: %s", vm_id, error)
            return []
