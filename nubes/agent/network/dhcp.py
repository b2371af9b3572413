"""DHCP for a VPC: one dnsmasq per VPC namespace, static leases only, plus IPv6 RA.

The configuration and hosts file are rendered from a `VpcPlan` by pure functions; the
`Dnsmasq` class keeps one process in step with them (start, SIGHUP, restart, adopt).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from nubes.agent.network.plan import SubnetPlan, VpcPlan
from nubes.errors import CommandFailed, NubesError, ToolMissing
from nubes.process import run_tool_async

_log = logging.getLogger(__name__)

METADATA_ADDRESS = ipaddress.IPv4Address("169.254.169.254")
RA_INTERVAL_SECONDS = 60
_STOP_TIMEOUT = 5.0
_PIDFILE_TIMEOUT = 2.0
# What may appear in a config or hosts line unquoted: never a comma, newline or space.
_SAFE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z", re.ASCII)
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z", re.ASCII)
_MAX_LABEL = 63


class DhcpError(NubesError):
    """dnsmasq could not be started, reloaded or stopped."""

    code = "dhcp_error"


@dataclass(frozen=True)
class DnsmasqFiles:
    """Where one VPC's dnsmasq keeps its files: all in `directory`, a run dir per VPC."""

    directory: Path
    config: Path
    hosts: Path
    pidfile: Path
    log: Path
    leases: Path

    @classmethod
    def in_directory(cls, directory: Path, marker: str) -> DnsmasqFiles:
        """The files of a dnsmasq in `directory`; its config's name carries `marker`, which
        so appears in its command line.

        Raises:
            ValueError: `marker` holds something other than letters, digits and ._:-, or
                `directory` a line break.
        """
        _require_safe(marker, "marker")
        if any(character in str(directory) for character in "\n\r\0"):
            raise ValueError(f"directory {str(directory)!r} cannot go into a configuration")
        return cls(
            directory=directory,
            config=directory / f"{marker}.conf",
            hosts=directory / "hosts",
            pidfile=directory / "dnsmasq.pid",
            log=directory / "dnsmasq.log",
            leases=directory / "leases",
        )


def _require_safe(value: str, what: str) -> str:
    """`value` itself, when it cannot start a new option or line in a dnsmasq file."""
    if not _SAFE_WORD.match(value):
        raise ValueError(f"{what} {value!r} cannot go into a dnsmasq configuration")
    return value


def _served(plan: VpcPlan) -> list[SubnetPlan]:
    """The subnets dnsmasq answers on: DHCP on and a gateway address on the bridge, which
    is how dnsmasq picks the range of a request."""
    return [subnet for subnet in plan.subnets if subnet.dhcp and subnet.gateway is not None]


def _tag(subnet: SubnetPlan) -> str:
    return _require_safe(subnet.bridge, "bridge name")


def _nameservers(
    subnet: SubnetPlan,
) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]]:
    """The subnet's DNS servers as addresses; anything else from the store is dropped."""
    v4: list[ipaddress.IPv4Address] = []
    v6: list[ipaddress.IPv6Address] = []
    for text in subnet.dns_nameservers:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            _log.warning("subnet %s: ignoring DNS server %r", subnet.subnet_id, text)
            continue
        if isinstance(address, ipaddress.IPv4Address):
            v4.append(address)
        else:
            v6.append(address)
    return v4, v6


def render_config(plan: VpcPlan, files: DnsmasqFiles) -> str:
    """The dnsmasq configuration of a VPC: static DHCPv4 leases and RA on served subnets.

    Raises:
        ValueError: a bridge name could break the file (a bug: names come from names.py).
    """
    lines = [
        "# nubes: dnsmasq of one VPC namespace, generated; edits are overwritten",
        "port=0",  # no DNS: nothing listens on 53, and option 6 is only sent when asked
        "no-resolv",
        "no-hosts",
        "bind-dynamic",
        "user=root",
        "group=root",
        f"pid-file={files.pidfile}",
        f"log-facility={files.log}",
        "log-dhcp",
        "dhcp-authoritative",
        f"dhcp-leasefile={files.leases}",
        f"dhcp-hostsfile={files.hosts}",
    ]
    served = _served(plan)
    if any(subnet.ipv6_cidr is not None for subnet in served):
        lines.append("enable-ra")
    for subnet in served:
        tag = _tag(subnet)
        gateway = subnet.gateway
        lines += [
            "",
            f"# subnet {_require_safe(subnet.subnet_id, 'subnet id')}",
            f"interface={tag}",
            f"dhcp-range=set:{tag},{subnet.cidr.network_address},static,"
            f"{subnet.cidr.netmask},infinite",
            f"dhcp-option=tag:{tag},option:router,{gateway}",
            f"dhcp-option=tag:{tag},option:mtu,{subnet.mtu}",
            # RFC 3442: a client given option 121 ignores option 3, so the default route
            # goes in too.
            f"dhcp-option=tag:{tag},option:classless-static-route,"
            f"{METADATA_ADDRESS}/32,{gateway},0.0.0.0/0,{gateway}",
        ]
        dns_v4, dns_v6 = _nameservers(subnet)
        if dns_v4:
            lines.append(f"dhcp-option=tag:{tag},option:dns-server,{','.join(map(str, dns_v4))}")
        if subnet.ipv6_cidr is not None:
            prefix = subnet.ipv6_cidr
            lines += [
                f"dhcp-range=set:{tag},{prefix.network_address},ra-only,{prefix.prefixlen}",
                f"ra-param={tag},mtu:{subnet.mtu},{RA_INTERVAL_SECONDS}",
            ]
            if dns_v6:
                servers = ",".join(f"[{address}]" for address in dns_v6)
                lines.append(f"dhcp-option=tag:{tag},option6:dns-server,{servers}")
    return "\n".join(lines) + "\n"


def sanitise_hostname(name: str | None) -> str | None:
    """A name a DHCP client accepts (one RFC 1123 label), or None when nothing is left."""
    if not name:
        return None
    label = name.strip().lower().split(".", 1)[0]
    label = re.sub(r"[^a-z0-9-]+", "-", label, flags=re.ASCII)
    label = label[:_MAX_LABEL].strip("-")
    return label or None


def render_hosts(plan: VpcPlan) -> str:
    """The dhcp-hostsfile: "<mac>,<ipv4>[,<hostname>],infinite" per port of a served subnet.

    A port whose MAC is malformed is left out (and logged): it must not break the others.
    """
    served = {subnet.subnet_id: subnet for subnet in _served(plan)}
    lines = []
    for port in plan.ports:
        subnet = served.get(port.subnet_id)
        if subnet is None:
            continue
        address = next((ip for ip in port.ipv4 if ip in subnet.cidr), None)
        if address is None:
            continue
        mac = port.mac.strip().lower()
        if not _MAC.match(mac):
            _log.warning("port %s: ignoring malformed MAC %r", port.port_id, port.mac)
            continue
        hostname = sanitise_hostname(port.hostname)
        fields = [mac, str(address), *([hostname] if hostname else []), "infinite"]
        lines.append(",".join(fields))
    return "".join(f"{line}\n" for line in sorted(lines))


def _write_if_changed(path: Path, text: str) -> bool:
    """Writes `text` to `path` atomically unless it is there already; True if it wrote."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return True


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class Dnsmasq:
    """The dnsmasq of one VPC namespace, recognised by its config path in its command line."""

    def __init__(self, netns: str, directory: Path, *, marker: str) -> None:
        """The dnsmasq of namespace `netns`, with its files in `directory`.

        Raises:
            ValueError: `marker` holds something other than letters, digits and ._:-
        """
        self.netns = netns
        self.files = DnsmasqFiles.in_directory(directory, marker)
        self._lock = asyncio.Lock()

    def _argv(self) -> list[str]:
        return ["dnsmasq", f"--conf-file={self.files.config}"]

    def pid(self) -> int | None:
        """The pid of this VPC's running dnsmasq (from its pidfile, checked against
        /proc/<pid>/cmdline), or None."""
        try:
            pid = int(self.files.pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return None
        if Path(argv[0]).name != "dnsmasq" or self._argv()[1] not in argv:
            return None
        return None if _process_gone(pid) else pid

    async def ensure(self, plan: VpcPlan) -> None:
        """dnsmasq serves `plan`: started if not running, restarted if its configuration
        changed, reloaded (SIGHUP) if only its hosts changed, left alone otherwise. With no
        subnet to serve, it is stopped.

        Raises:
            DhcpError: dnsmasq refused to start, or could not be signalled.
        """
        async with self._lock:
            if not _served(plan):
                await self._stop_and_clean()
                return
            try:
                self.files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                config_changed = _write_if_changed(
                    self.files.config, render_config(plan, self.files)
                )
                hosts_changed = _write_if_changed(self.files.hosts, render_hosts(plan))
            except OSError as error:
                raise DhcpError(
                    f"cannot write the dnsmasq files of {self.netns}: {error}"
                ) from error
            pid = self.pid()
            if pid is not None and config_changed:
                await self._terminate(pid)
                pid = None
            if pid is None:
                await self._start()
            elif hosts_changed:
                try:
                    os.kill(pid, signal.SIGHUP)  # re-reads dhcp-hostsfile, keeps leases
                except ProcessLookupError:
                    await self._start()

    async def stop(self) -> None:
        """No dnsmasq runs for this VPC and its files are gone.

        Raises:
            DhcpError: it did not end after SIGTERM and SIGKILL.
        """
        async with self._lock:
            await self._stop_and_clean()

    async def _stop_and_clean(self) -> None:
        pid = self.pid()
        if pid is not None:
            await self._terminate(pid)
        files = self.files
        for path in (files.config, files.hosts, files.pidfile, files.log, files.leases):
            path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            files.directory.rmdir()  # only if nothing else of anyone's is in it

    async def _start(self) -> None:
        self.files.pidfile.unlink(missing_ok=True)
        try:
            # dnsmasq daemonizes; its parent exits once the daemon is up, or with the error.
            await run_tool_async(["ip", "netns", "exec", self.netns, *self._argv()])
        except (CommandFailed, ToolMissing) as error:
            raise DhcpError(
                f"dnsmasq did not start in namespace {self.netns}: {error}",
                hint=f"its log is {self.files.log}",
            ) from error
        deadline = time.monotonic() + _PIDFILE_TIMEOUT
        while self.pid() is None:
            if time.monotonic() > deadline:
                raise DhcpError(
                    f"dnsmasq in namespace {self.netns} wrote no pidfile",
                    hint=f"its log is {self.files.log}",
                )
            await asyncio.sleep(0.01)

    async def _terminate(self, pid: int) -> None:
        for sig, wait in ((signal.SIGTERM, _STOP_TIMEOUT), (signal.SIGKILL, _STOP_TIMEOUT)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if _process_gone(pid):
                    return
                await asyncio.sleep(0.01)
        raise DhcpError(f"dnsmasq {pid} of namespace {self.netns} does not end")
