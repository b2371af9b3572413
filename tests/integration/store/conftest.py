"""Fixtures for the store conformance suite: every test runs against SQLite and a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nubes.store import Store
from nubes.store.etcd import EtcdStore
from nubes.store.sqlite import SqliteStore
from tests.support.etcd import EtcdServer, running_etcd
from tests.support.store_checks import StoreFactory


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture(params=["sqlite", "etcd"])
async def open_client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens clients of one store; every client is closed after the test."""
    clients: list[Store] = []
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")

        async def open_one() -> Store:
            clients.append(await EtcdStore.connect([server.endpoint], timeout=10))
            return clients[-1]
    else:
        path = tmp_path / "nubes.db"

        async def open_one() -> Store:
            clients.append(await SqliteStore.open(path, timeout=10))
            return clients[-1]

    yield open_one
    for client in clients:
        await client.close()


@pytest.fixture
async def store(open_client: StoreFactory) -> Store:
    return await open_client()
