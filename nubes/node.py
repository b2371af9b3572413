"""The nubes daemons in one process on one store: API, scheduler and host agent, or a part.

`nubes node` runs all three (the all-in-one node `nubes up` starts); `nubes api`,
`nubes scheduler` and `nubes agent` run one each, as separate processes on one store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from enum import StrEnum

from nubes.api.context import ApiContext
from nubes.api.server import serve_api
from nubes.config import NubesConfig
from nubes.errors import NubesError
from nubes.store import open_store
from nubes.store.base import Store

log = logging.getLogger(__name__)


class Component(StrEnum):
    API = "api"
    SCHEDULER = "scheduler"
    AGENT = "agent"


ALL_COMPONENTS = frozenset(Component)


class ComponentFailed(NubesError):
    """A daemon of the node ended on its own; the node stops so a supervisor restarts it."""

    code = "component_failed"


async def run_node(
    config: NubesConfig,
    stop: asyncio.Event,
    *,
    components: Iterable[Component] = ALL_COMPONENTS,
    started: asyncio.Event | None = None,
) -> None:
    """Runs `components` on the configured store until `stop` is set.

    The API starts first (so `/v1/health` answers while the agent adopts its VMs),
    then the scheduler, then the agent; they stop in the reverse order, and the agent
    leaves its VMs running for the next start to adopt. `started` is set once every
    component is up.

    Raises:
        StoreUnavailable: the store cannot be opened.
        ListenFailed: the API cannot bind its address.
        ConfigError: the API's TLS files are invalid.
        ComponentFailed: a component ended while the node was running.
    """
    wanted = frozenset(components)
    store = await open_store(config)
    try:
        await _run_on(store, config, stop, wanted, started)
    finally:
        await store.close()


async def _run_on(
    store: Store,
    config: NubesConfig,
    stop: asyncio.Event,
    wanted: frozenset[Component],
    started: asyncio.Event | None,
) -> None:
    running: dict[Component, asyncio.Task[None]] = {}
    inner_stop = asyncio.Event()  # set once `stop` is, or when a component fails
    agent = None
    try:
        if Component.API in wanted:
            api_started = asyncio.Event()
            context = ApiContext(
                store=store,
                config=config,
                image_dir=config.image_dir,
                import_allow=tuple(config.api.import_allow),
            )
            running[Component.API] = _task(
                serve_api(
                    context,
                    listen=config.api.listen,
                    port=config.api.port,
                    tls_cert=config.api.tls_cert,
                    tls_key=config.api.tls_key,
                    stop=inner_stop,
                    started=api_started,
                ),
                "api",
            )
            await _first_of(api_started, running[Component.API])
        if Component.SCHEDULER in wanted:
            from nubes.scheduler.daemon import run_scheduler

            running[Component.SCHEDULER] = _task(
                run_scheduler(
                    store,
                    config.scheduler,
                    inner_stop,
                    events=config.events,
                    metering=config.metering,
                ),
                "scheduler",
            )
        if Component.AGENT in wanted:
            from nubes.agent.agent import Agent  # heavy imports only where the agent runs

            agent = Agent(config, store)
            await agent.start()
        log.info("node up: %s", ", ".join(sorted(c.value for c in wanted)))
        if started is not None:
            started.set()
        failed = await _until_stopped_or_failed(stop, running)
        if failed is not None:
            raise ComponentFailed(
                f"the {failed.value} stopped unexpectedly; the node is shutting down",
                hint="see the log above for the reason; a supervisor (systemd) restarts the node",
            )
    finally:
        inner_stop.set()
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.stop()
        await _finish(running)


def _task(coroutine: Awaitable[None], name: str) -> asyncio.Task[None]:
    task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
    task.set_name(f"nubes-{name}")
    return task


async def _first_of(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Returns once `event` is set; raises what `task` raised if it ends first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not event.is_set():
        task.result()  # re-raises its error (ListenFailed, ConfigError)
        raise ComponentFailed(f"the {task.get_name()} ended before it started")


async def _until_stopped_or_failed(
    stop: asyncio.Event, running: dict[Component, asyncio.Task[None]]
) -> Component | None:
    """None once `stop` is set; else the first component whose task ended (logged)."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {stopping, *running.values()}, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopping.cancel()
    for component, task in running.items():
        if task in done:
            error = task.exception() if not task.cancelled() else None
            if error is not None:
                log.error("the %s failed: %s", component.value, error, exc_info=error)
            return component
    return None


async def _finish(running: dict[Component, asyncio.Task[None]]) -> None:
    """Lets the API and scheduler end on `inner_stop`; cancels what does not in time."""
    for component, task in running.items():
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except TimeoutError:
            log.warning("the %s did not stop in 10 s; cancelling it", component.value)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except (asyncio.CancelledError, Exception):  # noqa: S110 - reported where it failed
            pass
