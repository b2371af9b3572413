"""The one door nubes runs host tools through: argv in, stdout out, a clear error on failure.

Never a shell: arguments are passed as a list, so no input is ever parsed by one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from nubes.errors import CommandFailed, ToolMissing

_STDERR_TAIL = 2000
# mkfs.ext4, nft, dnsmasq and friends live in /usr/sbin, which a normal user's PATH lacks.
_SYSTEM_DIRECTORIES = "/usr/sbin:/sbin"


def find_tool(name: str) -> str:
    """The path of a host tool, looking in the system directories too.

    Raises:
        ToolMissing: it is not installed.
    """
    search = f"{os.environ.get('PATH', os.defpath)}:{_SYSTEM_DIRECTORIES}"
    found = shutil.which(name, path=search)
    if found is None:
        raise ToolMissing(name)
    return found


def run_tool(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> str:
    """Runs a tool to completion and returns its stdout as text.

    Raises:
        ToolMissing: the tool is not installed.
        CommandFailed: it exited non-zero (the error carries the end of its stderr).
    """
    try:
        completed = subprocess.run(
            [find_tool(argv[0]), *argv[1:]],
            cwd=cwd,
            env=None if env is None else dict(env),
            input=stdin,
            capture_output=True,
            check=False,
        )
    except FileNotFoundError as error:
        raise ToolMissing(argv[0]) from error
    return _output(argv, completed.returncode, completed.stdout, completed.stderr)


async def run_tool_async(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> str:
    """`run_tool` for the event loop: the agent runs many tools at once and must not block.

    Raises:
        ToolMissing: the tool is not installed.
        CommandFailed: it exited non-zero (the error carries the end of its stderr).
    """
    try:
        process = await asyncio.create_subprocess_exec(
            find_tool(argv[0]),
            *argv[1:],
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as error:
        raise ToolMissing(argv[0]) from error
    try:
        stdout, stderr = await process.communicate(stdin)
    except BaseException:
        # Cancelled: do not leave the tool running behind our back.
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return _output(argv, process.returncode or 0, stdout, stderr)


def _output(argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> str:
    """A finished tool's stdout as text, or CommandFailed with the end of its stderr."""
    if returncode != 0:
        text = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise CommandFailed(argv, returncode, text)
    return stdout.decode("utf-8", "replace")
