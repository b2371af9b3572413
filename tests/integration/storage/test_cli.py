"""`nubes image register|register-tiny|list|delete`: in process, and once as the installed
command to see a refusal end as a message and an exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from nubes.cli.main import app
from nubes.errors import InvalidInput, NotFound
from tests.integration.storage.conftest import entries, make_qcow2, qemu_img

pytestmark = pytest.mark.integration

NUBES = str(Path(sys.executable).parent / "nubes")


@pytest.fixture
def environment(tmp_path: Path) -> dict[str, str]:
    """Settings that put the store and image store in tmp_path, and nothing else."""
    config = tmp_path / "nubes.toml"
    config.write_text("")
    (tmp_path / "state").mkdir()
    return {"NUBES_CONFIG": str(config), "NUBES_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
def nubes(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in list(os.environ):
        if name.startswith("NUBES_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def output_of(result: Result) -> Any:
    assert result.exit_code == 0, result.exception or result.stderr
    return json.loads(result.stdout)


def test_register_list_and_delete_an_image(nubes: CliRunner, tmp_path: Path) -> None:
    disk = make_qcow2(tmp_path / "disk.qcow2")
    registered = output_of(
        nubes.invoke(app, ["image", "register", str(disk), "--name", "disk-one", "-o", "json"])
    )
    assert registered["name"] == "disk-one"
    assert registered["format"] == "qcow2"
    assert entries(tmp_path / "state" / "images") == [registered["id"]]

    assert output_of(nubes.invoke(app, ["image", "list", "-o", "json"])) == [registered]
    table = nubes.invoke(app, ["image", "list"])
    assert table.exit_code == 0
    assert registered["id"] in table.stdout

    deleted = output_of(nubes.invoke(app, ["image", "delete", registered["id"], "-o", "json"]))
    assert deleted == {"id": registered["id"], "deleted": True}
    assert output_of(nubes.invoke(app, ["image", "list", "-o", "json"])) == []
    again = nubes.invoke(app, ["image", "delete", registered["id"]])
    assert isinstance(again.exception, NotFound)


def test_register_refuses_a_file_url(nubes: CliRunner) -> None:
    result = nubes.invoke(app, ["image", "register", "file:///etc/shadow", "--name", "shadow"])
    assert isinstance(result.exception, InvalidInput)
    assert "'file' is not supported" in str(result.exception)


def test_the_command_refuses_a_disk_backed_by_a_host_file_with_a_message_and_exit_2(
    environment: dict[str, str], tmp_path: Path
) -> None:
    attack = tmp_path / "attack.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(attack))
    others = {name: value for name, value in os.environ.items() if not name.startswith("NUBES_")}
    result = subprocess.run(
        [NUBES, "image", "register", str(attack), "--name", "attack", "-o", "json"],
        env=others | environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: the disk has a backing file ('/etc/passwd')")
    assert result.stdout == ""
    assert entries(tmp_path / "state" / "images") == []


def test_register_tiny_registers_the_tiny_image_once(nubes: CliRunner) -> None:
    first = output_of(nubes.invoke(app, ["image", "register-tiny", "-o", "json"]))
    assert first["name"] == "nubes-tiny"
    assert first["kernel"] is not None
    assert first["initrd"] is not None
    assert "console=ttyS0" in first["cmdline"]
    second = output_of(nubes.invoke(app, ["image", "register-tiny", "-o", "json"]))
    assert second == first
    assert len(output_of(nubes.invoke(app, ["image", "list", "-o", "json"]))) == 1
