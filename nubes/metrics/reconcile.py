"""How long an agent's reconcile passes take and how many fail, by controller."""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.registry import CollectorRegistry

# A pass that changes nothing takes milliseconds; one that boots a QEMU, seconds.
RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ReconcileMetrics:
    """One per agent, shared by its controllers through the AgentContext."""

    def __init__(self) -> None:
        self.duration = Histogram(
            "nubes_reconcile_seconds",
            "Time one reconcile pass took, by controller (vm, volume, vpc)",
            ["controller"],
            registry=None,
            buckets=RECONCILE_BUCKETS,
        )
        self.errors = Counter(
            "nubes_reconcile_errors",
            "Reconcile passes that raised (retried later), by controller",
            ["controller"],
            registry=None,
        )

    def observe(self, controller: str, seconds: float, *, failed: bool) -> None:
        self.duration.labels(controller).observe(seconds)
        if failed:
            self.errors.labels(controller).inc()

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.duration)
        registry.register(self.errors)
