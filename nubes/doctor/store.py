"""The store check: the configured SQLite file or every etcd endpoint opens within a few
seconds and answers a read (this host's record); etcd also tells its version.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import grpc
from aetcd import rpc

from nubes.config import NubesConfig, StoreEngine
from nubes.doctor.report import Check, fail, ok, warn
from nubes.errors import NubesError
from nubes.store.keys import Kind, resource_key

# Short: a doctor answers quickly, and a store that needs longer is itself a problem.
STORE_CHECK_TIMEOUT = 3.0
ETCD_MINIMUM = (3, 4)


async def check_store(config: NubesConfig, timeout: float = STORE_CHECK_TIMEOUT) -> list[Check]:
    key = resource_key(Kind.HOST, config.agent.host)
    if config.store.engine is StoreEngine.ETCD:
        return list(
            await asyncio.gather(
                *(_check_etcd(endpoint, key, timeout) for endpoint in config.store.endpoints)
            )
        )
    return [await _check_sqlite(config, key, timeout)]


async def _check_sqlite(config: NubesConfig, key: str, timeout: float) -> Check:
    path = config.sqlite_path
    name = "store"
    if not path.exists():
        # Opening would create it: the doctor only checks that it can be.
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if os.access(parent, os.W_OK | os.X_OK):
            return ok(name, f"SQLite at {path}: not created yet; the first nubes start makes it")
        return fail(
            name,
            f"SQLite at {path} does not exist and {parent} is not writable",
            "run as root, or set [store] path / state_dir to a writable place",
        )
    try:
        revision, known_host = await asyncio.wait_for(
            asyncio.to_thread(_read_sqlite, path, key, timeout), timeout + 1
        )
    except TimeoutError:
        return fail(name, f"SQLite at {path} did not answer within {timeout:g} s", _SQLITE_FIX)
    except sqlite3.Error as error:
        return fail(name, f"SQLite at {path}: {error}", _SQLITE_FIX)
    if revision is None:
        return fail(
            name,
            f"SQLite at {path} is a database without the nubes tables",
            "point [store] path (or state_dir) at the nubes store, or move this file away",
        )
    known = "knows this host" if known_host else "does not know this host yet"
    return ok(name, f"SQLite at {path}: revision {revision}, {known}")


def _read_sqlite(path: Path, key: str, timeout: float) -> tuple[int | None, bool]:
    """The store's revision and whether it has `key`, read without writing anything: the
    file is opened read-only (no WAL switch, no table made, no housekeeping)."""
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=timeout)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "kv"} <= tables:
            return None, False
        row = connection.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        found = connection.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone()
        return (int(row[0]) if row else 0), found is not None
    finally:
        connection.close()


_SQLITE_FIX = "check that no process holds a lock on it for long (nubes down), and the file's mode"


async def _check_etcd(endpoint: str, key: str, timeout: float) -> Check:
    from nubes.store.etcd import EtcdStore

    name = f"store {endpoint}"
    try:
        async with asyncio.timeout(timeout + 1):
            store = await EtcdStore.connect([endpoint], timeout=timeout)
            try:
                record = await store.get(key)
            finally:
                await store.close()
            version = await _etcd_version(endpoint, timeout)
    except TimeoutError:
        return fail(name, f"etcd at {endpoint} did not answer within {timeout:g} s", _ETCD_FIX)
    except NubesError as error:
        shown = (
            error.message if endpoint in error.message else f"etcd at {endpoint}: {error.message}"
        )
        return fail(name, shown, _ETCD_FIX)
    known = "knows this host" if record is not None else "does not know this host yet"
    if version is not None and version < ETCD_MINIMUM:
        shown = ".".join(str(part) for part in version)
        return warn(
            name,
            f"etcd {shown} at {endpoint} answers; nubes is tested on 3.4 and later",
            "upgrade etcd (Debian 12: apt-get install etcd-server)",
        )
    shown = "?" if version is None else ".".join(str(part) for part in version)
    return ok(name, f"etcd {shown} at {endpoint}: answers, {known}")


_ETCD_FIX = (
    "start etcd there (systemctl start etcd), or fix [store] endpoints in nubes.toml; "
    "check that a firewall lets this host reach the port"
)


async def _etcd_version(endpoint: str, timeout: float) -> tuple[int, ...] | None:
    """The server version etcd's Maintenance.Status reports; None if it does not say."""
    from nubes.store.etcd import grpc_target

    async with grpc.aio.insecure_channel(grpc_target([endpoint])) as channel:
        try:
            status = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
    parts = str(status.version).split(".")
    try:
        return tuple(int(part) for part in parts[:3])
    except ValueError:
        return None
