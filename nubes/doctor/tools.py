"""Checks of the host tools the agent runs: QEMU and qemu-img, nft, dnsmasq and `ip`.

QEMU, dnsmasq and nft are started inside a VPC namespace through `ip netns exec`, which
finds them on PATH alone; `ip` and qemu-img are found as nubes.process.find_tool does
(PATH, then /usr/sbin and /sbin). The checks look them up the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from nubes.doctor.report import Check, Status, fail, ok

# `-action reboot=...,shutdown=...,panic=...` on every VM's command line came in QEMU 6.0;
# everything else nubes uses (-blockdev, pcie-root-port hotplug, internal snapshots over
# QMP, migration with events) is older. Debian 12 ships 7.2.
QEMU_MINIMUM = (6, 0)
SYSTEM_DIRECTORIES = ("/usr/sbin", "/sbin")
TOOL_TIMEOUT = 10.0
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Tool:
    """A host tool: what the agent calls it, the Debian package with it, how it is found."""

    name: str
    binary: str
    package: str
    # Started through `ip netns exec` (PATH only) rather than nubes.process.find_tool.
    path_only: bool
    version_marker: str  # the text right before the version in its --version output
    minimum: tuple[int, int] | None = None
    version_flag: str = "--version"


def qemu_tool(binary: str) -> Tool:
    return Tool("qemu", binary, "qemu-system-x86", True, "version", QEMU_MINIMUM)


QEMU_IMG = Tool("qemu-img", "qemu-img", "qemu-utils", False, "version", QEMU_MINIMUM)
DNSMASQ = Tool("dnsmasq", "dnsmasq", "dnsmasq-base", True, "version")
NFT = Tool("nft", "nft", "nftables", True, "nftables v")
IP = Tool("ip", "ip", "iproute2", False, "iproute2-", version_flag="-V")


def locate(binary: str, path_variable: str, *, path_only: bool) -> str | None:
    """Where the tool is found the way the agent finds it; None when it is not."""
    if "/" in binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    search = path_variable if path_only else ":".join([path_variable, *SYSTEM_DIRECTORIES])
    return shutil.which(binary, path=search)


def parse_version(text: str, marker: str) -> tuple[int, ...] | None:
    """The first dotted version after `marker` in a tool's --version output."""
    start = text.find(marker)
    if start < 0:
        return None
    found = _VERSION.match(text, start + len(marker)) or _VERSION.search(text, start)
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


def run_quietly(argv: Sequence[str]) -> tuple[int, str]:
    """Exit code and output (stdout, then stderr) of a short tool run; never raises for a
    tool that fails, hangs (killed after TOOL_TIMEOUT) or cannot start."""
    try:
        completed = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, f"{argv[0]} did not answer within {TOOL_TIMEOUT:g} s"
    except OSError as error:
        return -1, f"{argv[0]} cannot run: {error.strerror}"
    return completed.returncode, (completed.stdout + completed.stderr).strip()


def check_tool(tool: Tool, path_variable: str) -> Check:
    """Found as the agent finds it, answers --version, and is new enough."""
    path = locate(tool.binary, path_variable, path_only=tool.path_only)
    if path is None:
        return _missing(tool, path_variable)
    code, output = run_quietly([path, tool.version_flag])
    version = parse_version(output, tool.version_marker)
    if code != 0 or version is None:
        first_line = output.splitlines()[0] if output else f"exit status {code}"
        return fail(
            tool.name,
            f"{path} does not answer {tool.version_flag} as {tool.binary} does: {first_line}",
            f"reinstall it: apt-get install --reinstall {tool.package}",
        )
    shown = ".".join(str(part) for part in version)
    if tool.minimum is not None and version[:2] < tool.minimum:
        needed = ".".join(str(part) for part in tool.minimum)
        return fail(
            tool.name,
            f"{tool.binary} {shown} at {path}; nubes needs {needed} or later",
            f"install a newer {tool.package} (Debian 12 ships 7.2)",
        )
    return ok(tool.name, f"{tool.binary} {shown} at {path}")


def _missing(tool: Tool, path_variable: str) -> Check:
    elsewhere = None
    if tool.path_only and "/" not in tool.binary:
        elsewhere = shutil.which(tool.binary, path=":".join(SYSTEM_DIRECTORIES))
    if elsewhere is not None:
        directory = os.path.dirname(elsewhere)
        return fail(
            tool.name,
            f"{tool.binary} is at {elsewhere}, which is not on PATH "
            "(the agent starts it with `ip netns exec`, which searches PATH only)",
            f"put {directory} on PATH: export PATH=$PATH:{directory} "
            f"({tool.binary} comes from the Debian package {tool.package})",
        )
    if "/" in tool.binary:
        return fail(
            tool.name,
            f"{tool.binary} (set in [agent] qemu) is not an executable file",
            f"install it (apt-get install {tool.package}) or fix [agent] qemu in nubes.toml",
        )
    return fail(
        tool.name,
        f"{tool.binary} not found on PATH ({path_variable or 'empty'})",
        f"install it: apt-get install {tool.package}",
    )


def check_nft(path_variable: str) -> Check:
    """nft is there, and lists the tables in JSON as the agent's loads need (root only)."""
    found = check_tool(NFT, path_variable)
    if found.status is not Status.OK:
        return found
    path = locate(NFT.binary, path_variable, path_only=True)
    assert path is not None  # check_tool just found it
    code, output = run_quietly([path, "-j", "list", "tables"])
    if code == 0:
        return found
    if "ermission" in output or "not permitted" in output:
        return fail("nft", f"`nft list tables` is refused: {output}", "run as root")
    if "JSON" in output or "json" in output:
        return fail(
            "nft",
            f"nft has no JSON support: {output}",
            "install Debian's build: apt-get install nftables",
        )
    return fail(
        "nft",
        f"`nft -j list tables` failed: {output or f'exit status {code}'}",
        "check that the kernel has nf_tables (see the module checks) and run as root",
    )


def check_tools(qemu_binary: str, path_variable: str) -> list[Check]:
    return [
        check_tool(qemu_tool(qemu_binary), path_variable),
        check_tool(QEMU_IMG, path_variable),
        check_nft(path_variable),
        check_tool(DNSMASQ, path_variable),
        check_tool(IP, path_variable),
    ]
