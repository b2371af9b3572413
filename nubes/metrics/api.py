"""The API's /metrics: requests by route template, VMs by state, hosts by liveness, each
host's capacity and what the scheduler allocated on it, and the store's latency.

The cluster part is read from the store at most once per CLUSTER_VIEW_SECONDS, so a storm
of scrapes does not range every VM record each time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from starlette.routing import BaseRoute, Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nubes.api.context import ApiContext
from nubes.errors import InvalidInput, StoreError
from nubes.metrics.samples import HOST_CAPACITY_HELP, MIB
from nubes.metrics.store import store_metrics_of
from nubes.model.host import HostLiveness, HostRecord
from nubes.model.vm import VmRecord, VmState, VmStatus
from nubes.store.base import KeyValue, Store
from nubes.store.keys import Kind, kind_prefix
from nubes.store.listing import LIST_PAGE, range_all

log = logging.getLogger(__name__)

CLUSTER_VIEW_SECONDS = 5.0
UNMATCHED_ROUTE = "unmatched"  # unknown paths share one label: a fuzzer makes no new series
# h11 accepts any token as a method and requests are counted before authentication, so
# any other method shares one label: a client cannot grow the registry without bound.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
GIB = 1024 * MIB


# -- requests -------------------------------------------------------------------------------


class RequestMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "nubes_api_requests",
            "API requests answered, by method, route template and status code",
            ["method", "route", "code"],
            registry=None,
        )
        self.latency = Histogram(
            "nubes_api_request_seconds",
            "Time until the API started its answer, by method and route template",
            ["method", "route"],
            registry=None,
        )

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.requests)
        registry.register(self.latency)


class RouteTemplates:
    """Finds the route template of a request path ("/v1/vms/{vm}"), so that each route is
    one series whatever ids its paths carry.

    Read from the OpenAPI paths and the app's own top-level routes, once, at the first
    request (the routers are all included by then): FastAPI's scope["route"] of an
    included router lacks the router's prefix.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._static: dict[str, str] | None = None
        self._patterns: list[tuple[re.Pattern[str], str]] = []

    def template_of(self, path: str) -> str:
        if self._static is None:
            self._load()
        assert self._static is not None
        found = self._static.get(path)
        if found is not None:
            return found
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return UNMATCHED_ROUTE

    def _load(self) -> None:
        templates = list(self.app.openapi().get("paths", {}))
        for route in self.app.routes:
            if isinstance(route, Mount):
                templates.append(route.path.rstrip("/") + "/{path:path}")
            elif isinstance(route, BaseRoute) and isinstance(getattr(route, "path", None), str):
                templates.append(route.path)  # type: ignore[attr-defined]
        static = {t: t for t in templates if "{" not in t}
        # The fewest parameters first: /v1/vms/{vm}/console before /v1/vms/{vm}/{rest:path}.
        dynamic = sorted((t for t in templates if "{" in t), key=lambda t: t.count("{"))
        self._patterns = [(compile_path(t)[0], _plain(t)) for t in dynamic]
        self._static = static


def _plain(template: str) -> str:
    """A template without Starlette's converters: /ui/{path:path} -> /ui/{path}."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", template)


class RequestMetricsMiddleware:
    """Counts each HTTP request once its answer starts (streams count when they open)."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics, templates: RouteTemplates) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered = False

        async def counting_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._record(scope, started, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if not answered:  # the outermost error handler answers 500 after we return
                self._record(scope, started, 500)
            raise

    def _record(self, scope: Scope, started: float, code: int) -> None:
        template = self.templates.template_of(str(scope.get("path", "")))
        method = method_label(str(scope.get("method", "")))
        self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
        self.metrics.requests.labels(method, template, str(code)).inc()


def method_label(method: str) -> str:
    """The `method` label of a request: its method when it is a known one, else "other"."""
    return method if method in KNOWN_METHODS else OTHER_METHOD


# -- the cluster, from the store ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostView:
    name: str
    up: bool
    capacity_vcpus: int = 0
    capacity_memory_bytes: int = 0
    capacity_disk_bytes: int = 0
    allocated_vms: int = 0
    allocated_vcpus: int = 0
    allocated_memory_bytes: int = 0
    allocated_disk_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ClusterView:
    vms_by_state: dict[str, int] = field(default_factory=dict)
    hosts: list[HostView] = field(default_factory=list)


async def read_cluster(store: Store, *, page_size: int = LIST_PAGE) -> ClusterView:
    """VMs by state and every host's liveness, capacity and allocations, read now, in
    pages of `page_size` keys (one read of every VM passes etcd's 4 MiB message limit at
    a thousand or two).

    Raises:
        StoreError: the store cannot be read.
    """
    from nubes.api.vmops import effective_state  # the state clients see, by one rule

    vm_prefix = kind_prefix(Kind.VM)
    records: dict[str, VmRecord] = {}
    statuses: dict[str, VmStatus] = {}
    for kv in (await range_all(store, vm_prefix, page_size)).kvs:
        name, _, rest = kv.key[len(vm_prefix) :].partition("/")
        try:
            if not rest:
                records[name] = VmRecord.from_json(kv.value)
            elif rest == "status":
                statuses[name] = VmStatus.from_json(kv.value)
        except InvalidInput:
            continue  # counted by what can be read; the API reports bad records elsewhere
    counts = {state.value: 0 for state in VmState}
    for vm_id, record in records.items():
        counts[effective_state(record, statuses.get(vm_id)).value] += 1
    hosts = _host_views((await range_all(store, kind_prefix(Kind.HOST), page_size)).kvs)
    return ClusterView(vms_by_state=counts, hosts=hosts)


def _host_views(kvs: Iterable[KeyValue]) -> list[HostView]:
    prefix = kind_prefix(Kind.HOST)
    parts: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        name, _, rest = kv.key[len(prefix) :].partition("/")
        parts.setdefault(name, {})[rest or "record"] = kv.value
    views = []
    for name, found in sorted(parts.items()):
        if "record" not in found:
            continue
        try:
            record = HostRecord.from_json(found["record"])
        except InvalidInput:
            continue
        allocations = found.get("allocations")
        vms = allocations.get("vms", {}) if isinstance(allocations, dict) else {}
        sizes = [v for v in vms.values() if isinstance(v, dict)] if isinstance(vms, dict) else []
        views.append(
            HostView(
                name=name,
                up="alive" in found,
                capacity_vcpus=record.capacity.vcpus,
                capacity_memory_bytes=record.capacity.memory_mb * MIB,
                capacity_disk_bytes=record.capacity.disk_gb * GIB,
                allocated_vms=len(sizes),
                allocated_vcpus=sum(int(s.get("vcpus", 0)) for s in sizes),
                allocated_memory_bytes=sum(int(s.get("memory_mb", 0)) for s in sizes) * MIB,
                allocated_disk_bytes=sum(int(s.get("disk_gb", 0)) for s in sizes) * GIB,
            )
        )
    return views


def render_cluster(view: ClusterView) -> Iterator[Metric]:
    vms = GaugeMetricFamily("nubes_vms", "VMs by the state clients see", labels=["state"])
    for state, count in sorted(view.vms_by_state.items()):
        vms.add_metric([state], count)
    yield vms
    liveness = GaugeMetricFamily("nubes_hosts", "Hosts by liveness", labels=["liveness"])
    for state in HostLiveness:
        wanted = state is HostLiveness.UP
        liveness.add_metric([state.value], sum(1 for h in view.hosts if h.up == wanted))
    yield liveness
    per_host = {
        "up": ("nubes_host_up", "1 while the host's heartbeat is in the store"),
        # The agent serves these three too: one HELP text each, from samples.py.
        "capacity_vcpus": (
            "nubes_host_capacity_vcpus",
            HOST_CAPACITY_HELP["nubes_host_capacity_vcpus"],
        ),
        "capacity_memory_bytes": (
            "nubes_host_capacity_memory_bytes",
            HOST_CAPACITY_HELP["nubes_host_capacity_memory_bytes"],
        ),
        "capacity_disk_bytes": (
            "nubes_host_capacity_disk_bytes",
            HOST_CAPACITY_HELP["nubes_host_capacity_disk_bytes"],
        ),
        "allocated_vms": ("nubes_host_allocated_vms", "VMs the scheduler bound to the host"),
        "allocated_vcpus": ("nubes_host_allocated_vcpus", "vCPUs bound to the host"),
        "allocated_memory_bytes": (
            "nubes_host_allocated_memory_bytes",
            "Guest memory bound to the host",
        ),
        "allocated_disk_bytes": ("nubes_host_allocated_disk_bytes", "Disk bound to the host"),
    }
    for attribute, (name, documentation) in per_host.items():
        family = GaugeMetricFamily(name, documentation, labels=["host"])
        for host in view.hosts:
            family.add_metric([host.name], float(getattr(host, attribute)))
        yield family


class _ClusterCollector:
    def __init__(self) -> None:
        self.view: ClusterView | None = None

    def collect(self) -> Iterable[Metric]:
        return [] if self.view is None else list(render_cluster(self.view))


class ApiMetrics:
    """The API's registry; `scrape()` refreshes the cluster view when it is stale."""

    def __init__(self, store: Store, *, cluster_view_seconds: float = CLUSTER_VIEW_SECONDS) -> None:
        self.store = store
        self.cluster_view_seconds = cluster_view_seconds
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics()
        self.requests.register(self.registry)
        self._cluster = _ClusterCollector()
        self.registry.register(self._cluster)
        store_metrics = store_metrics_of(store)
        if store_metrics is not None:
            store_metrics.register(self.registry)
        self._read_at = float("-inf")
        self._refreshing = asyncio.Lock()

    async def scrape(self) -> bytes:
        await self._refresh()
        return generate_latest(self.registry)

    async def _refresh(self) -> None:
        async with self._refreshing:  # scrapes that come together share one read
            if time.monotonic() - self._read_at < self.cluster_view_seconds:
                return
            try:
                self._cluster.view = await read_cluster(self.store)
            except StoreError as error:
                log.warning("metrics: cannot read the cluster (%s); serving the last view", error)
                return
            self._read_at = time.monotonic()


def install_api_metrics(app: FastAPI, ctx: ApiContext) -> None:
    """Counts requests and serves GET /metrics, unless `[api] metrics = false`."""
    if not ctx.config.api.metrics:
        return
    metrics = ApiMetrics(ctx.store)
    app.state.metrics = metrics
    app.add_middleware(
        RequestMetricsMiddleware, metrics=metrics.requests, templates=RouteTemplates(app)
    )

    # No token: Prometheus scrapes without one. The API listens on 127.0.0.1 by default;
    # operators who expose it set [api] metrics = false or filter /metrics in front.
    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> Response:
        return Response(await metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
