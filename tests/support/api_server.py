"""The real API over real HTTP: uvicorn on 127.0.0.1 (a free port) in a thread, serving
an ApiLab's app on a SQLite store in a temp dir. For the SDK and CLI tests.

`run(coro)` runs a coroutine on the server's loop (the store belongs to it), so a
test can mint tokens or read the store while the server answers.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from nubes.api.app import create_app
from nubes.api.auth import mint_token
from nubes.api.bootstrap import DEFAULT_PROJECT, ensure_project, ensure_user
from nubes.model.project import Role
from tests.support.api_lab import ADMIN, ApiLab

T = TypeVar("T")
ADMIN_PASSWORD = "admin-password"  # noqa: S105 - the ApiLab's test admin
STARTUP_SECONDS = 20


@dataclass
class ApiServer:
    url: str
    lab: ApiLab
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs `coroutine` on the server's event loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def token(self, user: str = ADMIN, project: str = DEFAULT_PROJECT) -> str:
        token, _ = self.run(mint_token(self.lab.store, user, project))
        return token

    def member(self, project: str, user: str, password: str = "member-password") -> str:  # noqa: S107
        """A token of a new member `user` of `project` (both made when missing)."""

        async def make() -> str:
            await ensure_project(self.lab.store, project)
            await ensure_user(self.lab.store, user, password, role=Role.MEMBER, projects=[project])
            token, _ = await mint_token(self.lab.store, user, project)
            return token

        return self.run(make())


@contextmanager
def serve_api(directory: Path, **ctx_options: Any) -> Iterator[ApiServer]:
    """The API listening on 127.0.0.1; stopped and its store closed on exit."""
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say TCP, and
    # with Nagle on every keep-alive request waits 40 ms for a delayed ACK.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        async with ApiLab.open(directory, **ctx_options) as lab:
            config = uvicorn.Config(
                create_app(lab.ctx), log_level="warning", lifespan="off", access_log=False
            )
            server = uvicorn.Server(config)
            holder.update(lab=lab, server=server, loop=asyncio.get_running_loop())
            serving = asyncio.create_task(server.serve(sockets=[listener]))
            while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn offers no event
                await asyncio.sleep(0.01)
            ready.set()
            await serving

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as error:
            holder["error"] = error
        finally:
            ready.set()

    thread = threading.Thread(target=target, name="nubes-api-test", daemon=True)
    thread.start()
    try:
        if not ready.wait(STARTUP_SECONDS) or "server" not in holder:
            raise RuntimeError(f"the test API did not start: {holder.get('error')!r}")
        yield ApiServer(f"http://127.0.0.1:{port}", holder["lab"], holder["loop"])
    finally:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True
        thread.join(timeout=STARTUP_SECONDS)
        listener.close()
