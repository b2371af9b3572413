"""The etcd engine rides through an etcd restart: calls reconnect, watches resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nubes.errors import StoreUnavailable
from nubes.store import EventType
from nubes.store.etcd import EtcdStore
from tests.support.etcd import running_etcd

pytestmark = pytest.mark.integration


async def test_a_watch_resumes_after_a_restart_without_losing_or_repeating(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path) as server:
        async with await EtcdStore.connect([server.endpoint], timeout=20) as store:
            start = await store.current_revision()
            for index in range(100):
                await store.put(f"/r/{index:03d}", index)
            seen = []
            async with store.watch("/r/", from_revision=start + 1) as events:
                # Take half: the rest may sit in the stream's buffers when etcd goes down.
                while len(seen) < 50:
                    seen.append(await asyncio.wait_for(anext(events), 10))
                await asyncio.to_thread(server.restart)
                # The same client writes again once etcd is back.
                for index in range(100, 150):
                    await store.put(f"/r/{index:03d}", index)
                await store.delete("/r/000")
                while len(seen) < 151:
                    seen.append(await asyncio.wait_for(anext(events), 20))
    values = [event.value for event in seen if event.type is EventType.PUT]
    assert values == list(range(150))
    assert [event.revision for event in seen] == list(range(start + 1, start + 152))
    assert seen[-1].type is EventType.DELETE


async def test_connect_to_an_absent_etcd_fails_with_a_clear_error() -> None:
    with pytest.raises(StoreUnavailable) as raised:
        await EtcdStore.connect(["127.0.0.1:9"], timeout=1)
    assert "127.0.0.1:9" in str(raised.value)
    assert "did not answer" in str(raised.value)
