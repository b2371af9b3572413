"""What /proc says about a QEMU process: CPU time, resident memory, and the counters of
the network interfaces of the namespace it runs in. Parsing is pure; readers are thin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class InterfaceCounters:
    """One line of /proc/net/dev, as the host side of the interface counts it."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


def parse_cpu_seconds(stat: str, ticks_per_second: int = CLOCK_TICKS_PER_SECOND) -> float:
    """User plus system CPU seconds of every thread of a process, from /proc/<pid>/stat.

    Raises:
        ValueError: the text is not a stat line.
    """
    # "pid (comm) S ppid ...": comm may hold spaces and ")"; fields follow the last ")".
    _, separator, rest = stat.rpartition(")")
    fields = rest.split()
    if not separator or len(fields) < 13:
        raise ValueError("not a /proc/<pid>/stat line")
    # After comm: state(3) ... utime(14) stime(15), counted from 1 over the whole line.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / ticks_per_second


def parse_resident_bytes(status: str) -> int:
    """VmRSS of /proc/<pid>/status in bytes (0 for a process without memory, a zombie).

    Raises:
        ValueError: VmRSS is there but not a number of kB.
    """
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    return 0


def parse_net_dev(text: str) -> dict[str, InterfaceCounters]:
    """Interface name -> counters, from /proc/net/dev (two header lines, then one a line)."""
    interfaces = {}
    for line in text.splitlines()[2:]:
        name, separator, numbers = line.partition(":")
        fields = numbers.split()
        if not separator or len(fields) < 16:
            continue
        # Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        interfaces[name.strip()] = InterfaceCounters(
            rx_bytes=int(fields[0]),
            rx_packets=int(fields[1]),
            tx_bytes=int(fields[8]),
            tx_packets=int(fields[9]),
        )
    return interfaces


@dataclass(frozen=True, slots=True)
class ProcessSample:
    cpu_seconds: float
    resident_bytes: int
    interfaces: dict[str, InterfaceCounters]


def sample_process(pid: int) -> ProcessSample | None:
    """CPU, memory and the network counters of `pid`'s namespace; None once it is gone.

    /proc/<pid>/net shows the namespace the process runs in, so a QEMU launched in a VPC
    namespace shows that namespace's interfaces, its taps among them.

    Raises:
        OSError: a file of /proc/<pid> cannot be read (other than by the process ending).
        ValueError: a file of /proc/<pid> does not read as the kernel writes it.
    """
    directory = _PROC / str(pid)
    try:
        stat = (directory / "stat").read_text()
        status = (directory / "status").read_text()
        net_dev = (directory / "net" / "dev").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return ProcessSample(
        cpu_seconds=parse_cpu_seconds(stat),
        resident_bytes=parse_resident_bytes(status),
        interfaces=parse_net_dev(net_dev),
    )
