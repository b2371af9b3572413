from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from nubes import __version__
from nubes.cli.main import app

runner = CliRunner()


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"nubes {__version__}"


def test_help_describes_nubes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "IaaS cloud" in result.output


def test_the_installed_console_script_runs() -> None:
    nubes = Path(sys.executable).parent / "nubes"
    script = subprocess.run(
        [str(nubes), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert script.returncode == 0
    assert __version__ in script.stdout
