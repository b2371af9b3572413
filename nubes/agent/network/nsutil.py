"""Doing things inside a named network namespace from the agent's own process.

A network namespace is a per-thread property (setns(2)), so each call here runs on a
fresh thread that enters the namespace, does its work and ends: the event loop and the
thread pool never change namespace. What a socket is bound to stays in the namespace it
was made in, which is how one metadata server listens inside every VPC.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from nubes.errors import NubesError

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(NubesError):
    """A network namespace is missing or could not be entered."""

    code = "netns_error"


def netns_path(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"{name!r} is not a network namespace name")
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def _enter(name: str) -> None:
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise NetnsError(f"cannot enter network namespace {name}: {os.strerror(error)}")
    finally:
        os.close(fd)


def call_in_netns(name: str, function: Callable[[], _T]) -> _T:
    """Runs `function` on a new thread inside namespace `name` and returns its result.

    Raises:
        NetnsError: the namespace does not exist or cannot be entered.
        Whatever `function` raises.
    """
    result: list[_T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            _enter(name)
            result.append(function())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    if not netns_exists(name):
        raise NetnsError(f"network namespace {name} does not exist")
    thread = threading.Thread(target=work, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def call_in_netns_async(name: str, function: Callable[[], _T]) -> _T:
    """`call_in_netns` without blocking the event loop."""
    return await asyncio.to_thread(call_in_netns, name, function)


def write_sysctl(name: str, settings: dict[str, str]) -> None:
    """Sets per-namespace sysctls, e.g. {"net/ipv4/ip_forward": "1"}, inside `name`."""

    def write() -> None:
        for key, value in settings.items():
            Path("/proc/sys", key).write_text(value)

    call_in_netns(name, write)


def socket_in_netns(
    name: str, family: socket.AddressFamily, kind: socket.SocketKind = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket that lives in namespace `name` (bind it and listen as usual)."""
    return call_in_netns(name, lambda: socket.socket(family, kind))
