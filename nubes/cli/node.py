"""`nubes node`, `nubes api`, `nubes up` and `nubes down`: running the daemons of a node.

`up` starts `nubes node` in the background (its own session, a pidfile and a log under
the state directory), waits for the API, then makes the default cloud (`nubes.cli.up`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from nubes.cli.background import (
    DEFAULT_EXTERNAL_BRIDGE,
    DEFAULT_EXTERNAL_CIDR,
    PHYSICAL_NETWORK,
    NodeFiles,
    NodeSettings,
    claim_pidfile,
    release_pidfile,
    running_node_pid,
    stop_node,
)
from nubes.cli.output import OutputFormat, OutputOption, print_json
from nubes.config import Accel, NubesConfig, load_config
from nubes.errors import ConfigError, NubesError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

LogLevelOption = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
PortOption = Annotated[
    int | None,
    typer.Option(
        "--port", min=0, max=65535, help="The API's port (default: the api.port setting, 8686)."
    ),
]
AccelOption = Annotated[
    Accel | None,
    typer.Option("--accel", help="How VMs run: kvm, tcg, or auto (KVM when it works)."),
]


def node(
    log_level: LogLevelOption = "info",
    port: PortOption = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="The API's address (default: the api.listen setting)."),
    ] = None,
    accel: AccelOption = None,
    external_bridge: Annotated[
        list[str] | None,
        typer.Option(
            "--external-bridge",
            metavar="PHYSNET=BRIDGE",
            help="Map an external network's physical_network to a host bridge (repeatable; "
            "added to the agent.external_bridges setting).",
        ),
    ] = None,
    pidfile: Annotated[
        Path | None, typer.Option("--pidfile", help="Write this process's pid here.")
    ] = None,
) -> None:
    """Run the API, the scheduler and this host's agent in one process until SIGTERM."""
    _logging(log_level)
    bridges = dict(_mapping(item) for item in external_bridge or [])
    config = _with_overrides(
        load_config(), port=port, listen=listen, accel=accel, external_bridges=bridges
    )
    if pidfile is not None:
        claim_pidfile(pidfile)
    try:
        _run(config, {"api", "scheduler", "agent"})
    finally:
        if pidfile is not None:
            release_pidfile(pidfile)


def api(
    log_level: LogLevelOption = "info",
    port: PortOption = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="The address to bind (default: the api.listen setting)."),
    ] = None,
) -> None:
    """Run only the HTTP API until SIGTERM (the scheduler and agents run elsewhere)."""
    _logging(log_level)
    _run(_with_overrides(load_config(), port=port, listen=listen), {"api"})


def scheduler(log_level: LogLevelOption = "info") -> None:
    """Run only the scheduler until SIGTERM ([scheduler] settings); several may run at once."""
    _logging(log_level)
    _run(load_config(), {"scheduler"})


def agent(log_level: LogLevelOption = "info") -> None:
    """Run this host's agent until SIGTERM or Ctrl-C; VMs keep running when it stops."""
    _logging(log_level)
    _run(load_config(), {"agent"})


def up(
    accel: AccelOption = None,
    port: PortOption = None,
    external_bridge: Annotated[
        str | None,
        typer.Option(
            "--external-bridge",
            help=f"The host bridge floating IPs live on (default: {DEFAULT_EXTERNAL_BRIDGE}).",
        ),
    ] = None,
    external_cidr: Annotated[
        str | None,
        typer.Option(
            "--external-cidr",
            help="The external network (inside 198.18.0.0/15, host-only); the host's bridge "
            f"takes its first address (default: {DEFAULT_EXTERNAL_CIDR}).",
        ),
    ] = None,
    first_vm: Annotated[
        bool,
        typer.Option(
            "--first-vm",
            help="Also boot VM `first` (tiny image, floating IP, your ~/.ssh key, SSH and "
            "ping allowed) and wait until you can SSH into it.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for the node to answer.")
    ] = 120.0,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Start the all-in-one node in the background and make the default cloud (again: harmless)."""
    from nubes.cli.up import bring_up  # the bootstrap's imports are not needed by other verbs

    config = load_config()
    summary = bring_up(
        config,
        NodeSettings.choose(
            NodeFiles(config.state_dir),
            config,
            accel=accel,
            port=port,
            external_bridge=external_bridge,
            external_cidr=external_cidr,
        ),
        timeout=timeout,
        first_vm=first_vm,
        say=(lambda line: typer.echo(line, err=True)) if output is OutputFormat.TEXT else None,
    )
    if output is OutputFormat.JSON:
        print_json(summary.to_json())
    else:
        typer.echo(summary.text())


def down(
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for the node to stop.")
    ] = 60.0,
) -> None:
    """Stop the node `nubes up` started; data and running VMs stay (the next `up` adopts them)."""
    files = NodeFiles(load_config().state_dir)
    pid = running_node_pid(files)
    if pid is None:
        typer.echo("no node is running here (nothing to stop)")
        return
    stop_node(files, pid, timeout=timeout)
    typer.echo(f"node stopped (pid {pid}); VMs keep running, data stays in {files.state_dir}")


def _run(config: NubesConfig, components: set[str]) -> None:
    # The daemons (FastAPI, the agent) load here, not at import: every other verb stays quick.
    from nubes.node import Component, run_node

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_node(config, stop, components={Component(name) for name in components})

    asyncio.run(main())


def _logging(log_level: str) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _mapping(item: str) -> tuple[str, str]:
    physical, separator, bridge = item.partition("=")
    if not separator or not physical or not bridge:
        raise typer.BadParameter(
            f"{item!r} is not PHYSNET=BRIDGE (e.g. {PHYSICAL_NETWORK}={DEFAULT_EXTERNAL_BRIDGE})",
            param_hint="--external-bridge",
        )
    return physical, bridge


def _with_overrides(
    config: NubesConfig,
    *,
    port: int | None = None,
    listen: str | None = None,
    accel: Accel | None = None,
    external_bridges: dict[str, str] | None = None,
) -> NubesConfig:
    """`config` with the command line's settings on top, validated like the file's.

    Raises:
        ConfigError: an override is invalid (the message names it).
    """
    document = config.model_dump()
    if port is not None:
        document["api"]["port"] = port
    if listen is not None:
        document["api"]["listen"] = listen
    if accel is not None:
        document["agent"]["accel"] = accel
    if external_bridges:
        document["agent"]["external_bridges"] = {
            **document["agent"]["external_bridges"],
            **external_bridges,
        }
    try:
        return NubesConfig.model_validate(document)
    except ValueError as error:
        raise ConfigError(
            f"invalid command line setting: {error}", hint="see --help for the options"
        ) from None


def _module_main() -> None:
    """`python -m nubes.cli.node ...`: the node as `nubes up` starts it."""
    try:
        typer.run(node)
    except NubesError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    _module_main()
