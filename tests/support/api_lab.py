"""An API on a real SQLite store in a temp dir, with clients for an admin and members.

The app runs in-process behind httpx's ASGI transport: real FastAPI, real store,
real auth; no socket. Use `ApiLab.open(tmp_path)` as an async context manager.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nubes.api.app import create_app
from nubes.api.auth import mint_token
from nubes.api.bootstrap import DEFAULT_PROJECT, ensure_flavors, ensure_project, ensure_user
from nubes.api.context import ApiContext
from nubes.config import NubesConfig
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.image import ImageFile, ImageFormat, ImageRecord
from nubes.model.project import Role
from nubes.store.keys import Kind, name_key, resource_key
from nubes.store.sqlite import SqliteStore

ADMIN = "admin"


@dataclass
class ApiLab:
    store: SqliteStore
    ctx: ApiContext
    base_url: str = "http://nubes.test"
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @classmethod
    @asynccontextmanager
    async def open(cls, directory: Path, **ctx_options: Any) -> AsyncIterator[ApiLab]:
        config = NubesConfig(state_dir=directory)
        store = await SqliteStore.open(directory / "nubes.db")
        ctx = ApiContext(store=store, config=config, image_dir=directory / "images", **ctx_options)
        lab = cls(store=store, ctx=ctx)
        try:
            await ensure_project(store, DEFAULT_PROJECT)
            await ensure_flavors(store)
            await ensure_user(
                store, ADMIN, "admin-password", role=Role.ADMIN, projects=[DEFAULT_PROJECT]
            )
            yield lab
        finally:
            for client in lab.clients:
                await client.aclose()
            await store.close()

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        """A client of the in-process app, sending `token` when given."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self.ctx)),
            base_url=self.base_url,
            headers=headers,
        )
        self.clients.append(client)
        return client

    async def admin(self, project: str = DEFAULT_PROJECT) -> httpx.AsyncClient:
        token, _ = await mint_token(self.store, ADMIN, project)
        return self.client(token)

    async def member(self, project: str, user: str | None = None) -> httpx.AsyncClient:
        """A client for a new member of `project` (made if missing)."""
        await ensure_project(self.store, project)
        name = user or f"user-{secrets.token_hex(3)}"
        await ensure_user(
            self.store, name, secrets.token_hex(8), role=Role.MEMBER, projects=[project]
        )
        token, _ = await mint_token(self.store, name, project)
        return self.client(token)


async def add_image(lab: ApiLab, project: str, name: str = "tiny") -> str:
    """An image record (no file) in `project`, as an upload would leave it; its id."""
    image_id = new_id(IdKind.IMAGE)
    record = ImageRecord(
        id=image_id,
        project=project,
        name=name,
        format=ImageFormat.QCOW2,
        virtual_size=1 << 20,
        disk=ImageFile(name="disk", size=1 << 20, sha256="0" * 64),
        source="test",
        created_at=now(),
    )
    await lab.store.put(resource_key(Kind.IMAGE, image_id), record.to_json())
    await lab.store.put(name_key(Kind.IMAGE, project, name), image_id)
    return image_id
