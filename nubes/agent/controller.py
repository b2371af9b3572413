"""What every controller shares: kicks that coalesce into passes, timers, and a run loop
that retries a failed pass with a growing delay instead of dying."""

from __future__ import annotations

import abc
import asyncio
import logging
import time

from nubes.agent.context import AgentContext
from nubes.agent.status import StatusWriter
from nubes.store.keys import Kind, resource_key, status_key

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 30.0
# The `controller` label of nubes_reconcile_seconds for each kind of record.
_METRIC_LABELS = {Kind.VM: "vm", Kind.VOLUME: "volume", Kind.NETWORK: "vpc"}


class Controller(abc.ABC):
    """Owns one record on this host; `reconcile` is one idempotent pass over it."""

    def __init__(self, context: AgentContext, kind: Kind, name: str) -> None:
        self.ctx = context
        self.name = name
        self.key = resource_key(kind, name)
        self.metric_label = _METRIC_LABELS.get(kind, kind.value)
        self.status_writer = StatusWriter(context.store, status_key(kind, name))
        self.finished = False
        self._wake = asyncio.Event()
        self._resync = False
        self._passing = False
        self._timer: asyncio.TimerHandle | None = None

    def kick(self, *, resync: bool = False) -> None:
        """Asks for a pass soon; many kicks before it runs make one pass. `resync` also
        retries what failed before with the same spec."""
        self._resync = self._resync or resync
        self._wake.set()

    def kick_later(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self.kick)

    def busy(self) -> bool:
        """Whether a pass is running or asked for."""
        return self._passing or self._wake.is_set()

    async def run(self) -> None:
        """Passes until the record is gone from this host; a failed pass retries later."""
        failures = 0
        try:
            while not self.finished:
                await self._wake.wait()
                self._wake.clear()
                resync, self._resync = self._resync, False
                self._passing = True
                started = time.perf_counter()
                try:
                    await self.reconcile(resync=resync)
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("reconciling %s failed (attempt %d)", self.name, failures)
                    self.kick_later(min(MAX_RETRY_DELAY_SECONDS, 0.5 * 2**failures))
                finally:
                    self._passing = False
                elapsed = time.perf_counter() - started  # not reached when cancelled
                self.ctx.reconcile_metrics.observe(self.metric_label, elapsed, failed=failures > 0)
        finally:
            if self._timer is not None:
                self._timer.cancel()

    @abc.abstractmethod
    async def reconcile(self, *, resync: bool = False) -> None:
        """One pass: read the spec, look at reality, make the smallest change, say so."""
