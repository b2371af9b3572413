"""`nubes agent`: the long-running host agent of this machine."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import typer

from nubes.config import load_config
from nubes.store import open_store

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def agent(
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run this host's agent until SIGTERM or Ctrl-C; VMs keep running when it stops."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    asyncio.run(_run())


async def _run() -> None:
    from nubes.agent.agent import Agent  # the agent's imports are not needed by other verbs

    config = load_config()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    store = await open_store(config)
    try:
        node = Agent(config, store)
        await node.start()
        await stopping.wait()
        await node.stop()
    finally:
        await store.close()
