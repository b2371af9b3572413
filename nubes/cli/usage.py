"""`nubes usage`: what a project used over a period, for billing (VM-minutes by flavor,
volume GiB-hours, floating-IP hours, and a line per resource)."""

from __future__ import annotations

from typing import Annotated

import typer

from nubes.cli.common import OUTPUT, Json, api
from nubes.cli.output import OutputFormat, print_json, print_table


def usage(
    project: Annotated[
        str | None, typer.Option("--project", "-p", help="The project (default: your token's).")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Start, included: 2026-11-01 (midnight UTC), an ISO 8601 time or `now` "
            "(default: the first of this month).",
        ),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option("--to", help="End, excluded: a date, an ISO 8601 time or `now` (default)."),
    ] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Show a project's usage over a period (what still runs counts up to now)."""
    with api(output) as client:
        report = client.usage(project, start, end)
    if output is OutputFormat.JSON:
        print_json(report)
        return
    _print_report(report)


def _print_report(report: Json) -> None:
    vms, volumes, fips = report["vms"], report["volumes"], report["floating_ips"]
    title = f"usage of {report['project']} from {report['start']} to {report['end']}"
    print_table(
        title,
        ["what", "amount", "unit"],
        [
            ["VMs", _number(vms["minutes"]), "VM-minutes"],
            ["VM vCPUs", _number(vms["vcpu_minutes"]), "vCPU-minutes"],
            ["VM memory", _number(vms["memory_gib_minutes"]), "GiB-minutes"],
            ["volumes", _number(volumes["gib_hours"]), "GiB-hours"],
            ["floating IPs", _number(fips["hours"]), "hours"],
        ],
    )
    if vms["flavors"]:
        print_table(
            "VM-minutes by flavor",
            ["flavor", "vcpus", "memory_mb", "minutes"],
            [
                [f["flavor"], f["vcpus"], f["memory_mb"], _number(f["minutes"])]
                for f in vms["flavors"]
            ],
        )
    if report["resources"]:
        print_table(
            "by resource",
            ["resource", "kind", "terms", "amount", "unit", "running"],
            [
                [
                    line["resource"],
                    line["kind"],
                    line["flavor"] or (f"{line['size_gb']} GiB" if line["size_gb"] else ""),
                    _number(line["quantity"]),
                    line["unit"],
                    "yes" if line["running"] else "",
                ]
                for line in report["resources"]
            ],
        )


def _number(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"
