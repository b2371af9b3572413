"""`nubes usage` against the real API over HTTP: the report as tables for people, the
API's answer with `-o json`, and a date it cannot read as exit 2 with the error on stderr."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from nubes.api.bootstrap import DEFAULT_PROJECT
from nubes.cli.main import app
from tests.support.api_server import ApiServer, serve_api
from tests.unit.test_api_usage import add_intervals

PERIOD = ("--from", "2026-10-01", "--to", "2026-10-01T03:00:00Z")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with serve_api(tmp_path_factory.mktemp("api")) as server:
        server.run(add_intervals(server.lab, DEFAULT_PROJECT))
        yield server


def nubes(api: ApiServer, home: Path, *args: str) -> Result:
    env = {"XDG_CONFIG_HOME": str(home), "NUBES_URL": api.url, "NUBES_TOKEN": api.token()}
    return CliRunner().invoke(app, ["usage", *args], env=env)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row printed (the boxes drawn around them left out)."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.strip().startswith("│")
    ]


def test_usage_prints_totals_flavors_and_resources_as_tables(
    api: ApiServer, tmp_path: Path
) -> None:
    result = nubes(api, tmp_path, *PERIOD)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    rows = table_rows(result.stdout)
    assert ["VMs", "90.00", "VM-minutes"] in rows
    assert ["volumes", "20.00", "GiB-hours"] in rows
    assert ["small", "1", "1024", "90.00"] in rows
    assert ["i-aaaaaaaaaa", "vm", "small", "90.00", "vm-minutes", ""] in rows
    assert ["vol-aaaaaaaaaa", "volume", "10 GiB", "20.00", "gib-hours", "yes"] in rows


def test_usage_with_json_output_prints_the_api_s_report(api: ApiServer, tmp_path: Path) -> None:
    result = nubes(api, tmp_path, *PERIOD, "-o", "json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["project"] == DEFAULT_PROJECT
    assert report["vms"]["minutes"] == 90
    assert report["volumes"]["gib_hours"] == 20
    assert [line["resource"] for line in report["resources"]] == ["i-aaaaaaaaaa", "vol-aaaaaaaaaa"]


def test_a_date_usage_cannot_read_exits_2_with_a_json_error_on_stderr(
    api: ApiServer, tmp_path: Path
) -> None:
    result = nubes(api, tmp_path, "--from", "last tuesday", "-o", "json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert error["code"] == "invalid_input"
    assert "'last tuesday'" in error["message"]
    assert "2026-11-01" in error["hint"]


def test_a_date_usage_cannot_read_is_a_line_on_stderr_for_people(
    api: ApiServer, tmp_path: Path
) -> None:
    result = nubes(api, tmp_path, "--to", "soon")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: to 'soon' is not a date or time")
