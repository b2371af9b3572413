"""The first records of a cloud: the default project, the admin user, the flavors.

Each step is idempotent (it leaves what exists alone), so `nubes up` may run it
every time and tests use it to start from a known state.
"""

from __future__ import annotations

from nubes.api.auth import hash_password
from nubes.model.common import now
from nubes.model.project import FlavorRecord, ProjectRecord, Quota, Role, UserRecord
from nubes.store.base import Compare, JsonValue, Put, Store
from nubes.store.keys import Kind, resource_key

DEFAULT_PROJECT = "default"
DEFAULT_FLAVORS = {
    # name: (vcpus, memory_mb, disk_gb)
    "tiny": (1, 96, 0),
    "small": (1, 512, 10),
    "medium": (2, 2048, 20),
    "large": (4, 8192, 40),
}


async def ensure_project(store: Store, name: str, *, quota: Quota | None = None) -> bool:
    """Makes project `name` unless it exists; True when it was made."""
    record = ProjectRecord(name=name, quota=quota or Quota(), created_at=now())
    return await _put_absent(store, resource_key(Kind.PROJECT, name), record.to_json())


async def ensure_user(
    store: Store, name: str, password: str, *, role: Role, projects: list[str]
) -> bool:
    """Makes user `name` unless it exists (an existing user keeps its password)."""
    record = UserRecord(
        name=name,
        role=role,
        projects=projects,
        password_hash=hash_password(password),
        created_at=now(),
    )
    return await _put_absent(store, resource_key(Kind.USER, name), record.to_json())


async def ensure_flavors(store: Store) -> list[str]:
    """Makes the default flavors that do not exist; returns the names made."""
    made = []
    for name, (vcpus, memory_mb, disk_gb) in DEFAULT_FLAVORS.items():
        record = FlavorRecord(
            name=name, vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb, created_at=now()
        )
        if await _put_absent(store, resource_key(Kind.FLAVOR, name), record.to_json()):
            made.append(name)
    return made


async def _put_absent(store: Store, key: str, value: JsonValue) -> bool:
    result = await store.txn([Compare.absent(key)], [Put(key, value)])
    return result.succeeded
