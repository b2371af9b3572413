"""Key pairs: OpenSSH public keys a project's VMs are given by name.

A key pair's record lives at `/nubes/keypairs/<project>:<name>` (the metadata service
reads it there), so the key itself makes names unique within a project.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from fastapi import APIRouter, Response
from pydantic import ConfigDict, Field, ValidationError

from nubes.api.context import CallerDep, ContextDep
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Records, not_found
from nubes.errors import Conflict, InvalidInput
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.network import KeypairRecord, keypair_key_name
from nubes.store.base import KeyValue, Store
from nubes.store.keys import Kind, resource_key

router = APIRouter(tags=["keypairs"])


class KeypairCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    public_key: str = Field(max_length=16 * 1024, description="one line: 'ssh-ed25519 AAAA... c'")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "example-key",
                    "public_key": "ssh-ed25519 "
                    "AAAAC3NzaC1lZDI1NTE5AAAAIIgpGeYuIr2fW93W31giAbiI9G+VH5GMyDKUm289Spcy"
                    " example-1",
                },
                {
                    "name": "example-key-2",
                    "public_key": "ssh-ed25519 "
                    "AAAAC3NzaC1lZDI1NTE5AAAAIDZXFpvvpuRAcwLhQRwyL0b8uO+QAwIGC88BpsZlydoy"
                    " example-2",
                },
            ]
        }
    )


class KeypairView(KeypairRecord):
    fingerprint: str = Field(description="SHA256:<base64>, as `ssh-keygen -l` prints it")


class KeypairPage(Model):
    items: list[KeypairView]
    next: str | None = None


def fingerprint(public_key: str) -> str:
    """The OpenSSH SHA256 fingerprint of a public key line.

    Raises:
        InvalidInput: the key's data is not base64 or does not say the key's type.
    """
    kind, data = public_key.split()[:2]
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            "the public key's data is not base64",
            hint="paste the whole line of the .pub file, e.g. ~/.ssh/id_ed25519.pub",
        ) from None
    length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + length].decode("ascii", "replace") != kind:
        raise InvalidInput(
            f"the public key's data is not a {kind} key",
            hint="paste the whole line of the .pub file, e.g. ~/.ssh/id_ed25519.pub",
        )
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def _view(record: KeypairRecord) -> KeypairView:
    try:
        shown = fingerprint(record.public_key)
    except InvalidInput:
        shown = "unknown"  # a record written before the API checked key data
    return KeypairView(**record.model_dump(), fingerprint=shown)


async def _get(store: Store, project: str, name: str) -> tuple[KeyValue, KeypairRecord]:
    if not name or "/" in name or not name.isascii() or not name.isprintable():
        raise not_found(Kind.KEYPAIR, name)
    kv = await store.get(resource_key(Kind.KEYPAIR, keypair_key_name(project, name)))
    if kv is None:
        raise not_found(Kind.KEYPAIR, name)
    return kv, KeypairRecord.from_json(kv.value)


@router.post("/keypairs", status_code=201)
async def create_keypair(body: KeypairCreate, ctx: ContextDep, caller: CallerDep) -> KeypairView:
    """Add an OpenSSH public key under a name unique in the project."""
    try:
        record = KeypairRecord(
            name=body.name, project=caller.project, public_key=body.public_key, created_at=now()
        )
    except ValidationError as error:
        raise InvalidInput(
            "; ".join(str(problem["msg"]) for problem in error.errors()),
            hint="paste the whole line of the .pub file, e.g. ~/.ssh/id_ed25519.pub",
        ) from None
    fingerprint(record.public_key)  # refuses key data that is not a key of its type
    ident = keypair_key_name(caller.project, body.name)
    if await ctx.store.get(resource_key(Kind.KEYPAIR, ident)) is not None:
        raise Conflict(
            f"the project already has a key pair named {body.name!r}",
            hint="choose another name, or delete that key pair first",
        )
    await Records(ctx.store).create(caller, Kind.KEYPAIR, ident, record)
    return _view(record)


@router.get("/keypairs")
async def list_keypairs(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
) -> KeypairPage:
    """The project's key pairs, by name."""
    prefix = resource_key(Kind.KEYPAIR, keypair_key_name(caller.project, ""))
    if cursor is not None and ("/" in cursor or not cursor.isascii() or not cursor.isprintable()):
        raise InvalidInput(f"cursor {cursor!r} is not one a listing returned")
    start = None if cursor is None else f"{prefix}{cursor}\x00"
    result = await ctx.store.range(prefix, limit=limit + 1, start=start)
    records = [KeypairRecord.from_json(kv.value) for kv in result.kvs]
    following = records[limit - 1].name if len(records) > limit else None
    return KeypairPage(items=[_view(record) for record in records[:limit]], next=following)


@router.get("/keypairs/{name}")
async def get_keypair(name: str, ctx: ContextDep, caller: CallerDep) -> KeypairView:
    """One key pair."""
    _, record = await _get(ctx.store, caller.project, name)
    return _view(record)


@router.delete("/keypairs/{name}", status_code=204)
async def delete_keypair(name: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a key pair. VMs made with it keep the key."""
    kv, _ = await _get(ctx.store, caller.project, name)
    if await Records(ctx.store).remove(caller, kv) is None:
        raise Conflict(f"key pair {name} changed while it was being deleted", hint="try again")
    return Response(status_code=204)
