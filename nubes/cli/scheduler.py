"""`nubes scheduler`: the long-running scheduler, binding new VMs to hosts and cleaning up
after deleted ones; several may run at once on one store."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import typer

from nubes.config import load_config
from nubes.store import open_store

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def scheduler(
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run the scheduler until SIGTERM or Ctrl-C ([scheduler] settings in the config)."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    asyncio.run(_run())


async def _run() -> None:
    from nubes.scheduler.daemon import run_scheduler

    config = load_config()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    store = await open_store(config)
    try:
        await run_scheduler(store, config.scheduler, stopping)
    finally:
        await store.close()
