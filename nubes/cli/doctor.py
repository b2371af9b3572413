"""`nubes doctor`: checks this host for what nubes needs and says how to fix what is not
right. Exit status 0 when nothing failed (warnings allowed), 1 when a check failed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import typer

from nubes.cli.output import OutputFormat, OutputOption, print_json

if TYPE_CHECKING:
    from nubes.config import NubesConfig
    from nubes.doctor import Check

_MARKS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


def doctor(output: OutputOption = OutputFormat.TEXT) -> None:
    """Check this host: QEMU, KVM, nftables, dnsmasq, kernel modules, cgroups, disk,
    privileges and the store; say what to fix. Run it as root, where the agent runs."""
    from nubes.doctor import run_checks
    from nubes.doctor.report import passed

    config, config_check = _load_config()
    checks = [config_check, *run_checks(config)]
    if output is OutputFormat.JSON:
        print_json({"ok": passed(checks), "checks": [check.to_dict() for check in checks]})
    else:
        _print_checks(checks)
    raise typer.Exit(0 if passed(checks) else 1)


def _load_config() -> tuple[NubesConfig, Check]:
    """The settings the daemons would use; when they are invalid, a failed check and the
    built-in defaults, so the other checks still run."""
    from nubes.config import CONFIG_PATH_VARIABLE, DEFAULT_CONFIG_PATH, NubesConfig, load_config
    from nubes.doctor.report import fail, ok
    from nubes.errors import ConfigError

    try:
        config = load_config()
    except ConfigError as error:
        return NubesConfig(), fail(
            "config",
            f"{error.message}; the other checks use the built-in defaults",
            error.hint or "fix the setting it names",
        )
    named = os.environ.get(CONFIG_PATH_VARIABLE)
    if named is not None:
        source = f"settings from {named}"
    elif DEFAULT_CONFIG_PATH.exists():
        source = f"settings from {DEFAULT_CONFIG_PATH}"
    else:
        source = f"built-in defaults (no {DEFAULT_CONFIG_PATH})"
    return config, ok("config", f"{source}; host {config.agent.host}, state in {config.state_dir}")


def _print_checks(checks: Sequence[Check]) -> None:
    from nubes.doctor import summary

    width = max(len(check.name) for check in checks)
    for check in checks:
        typer.echo(f"{_MARKS[check.status.value]:<4}  {check.name:<{width}}  {check.found}")
        if check.fix:
            typer.echo(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    typer.echo(summary(checks))
