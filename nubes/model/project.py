"""Tenancy records: projects with their quotas and usage, users, bearer tokens, flavors.

A project's name is its id (`default` is made by `nubes up`); every other record
carries the project it belongs to, and the API never shows it to another project.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import NAME_PATTERN, Model
from nubes.model.vm import MAX_MEMORY_MB, MAX_VCPUS


class Role(StrEnum):
    ADMIN = "admin"  # every project, users, flavors, hosts, external networks
    MEMBER = "member"  # the resources of the projects it belongs to


# Larger numbers do not fit the store's JSON encoder (64 bits) and mean nothing here.
MAX_QUOTA = 2**53 - 1


class Quota(Model):
    """The most a project may hold at once; -1 means no limit."""

    vms: int = Field(default=20, ge=-1, le=MAX_QUOTA)
    vcpus: int = Field(default=40, ge=-1, le=MAX_QUOTA)
    memory_mb: int = Field(default=80 * 1024, ge=-1, le=MAX_QUOTA)
    volumes: int = Field(default=40, ge=-1, le=MAX_QUOTA)
    volume_gb: int = Field(default=1000, ge=-1, le=MAX_QUOTA)
    floating_ips: int = Field(default=10, ge=-1, le=MAX_QUOTA)


class Usage(Model):
    """What a project holds now, kept next to the project and changed in the same
    transaction as the records it counts, so two creates cannot both take the last slot."""

    vms: int = 0
    vcpus: int = 0
    memory_mb: int = 0
    volumes: int = 0
    volume_gb: int = 0
    floating_ips: int = 0

    def plus(self, other: Usage) -> Usage:
        return Usage(
            **{name: getattr(self, name) + getattr(other, name) for name in Usage.model_fields}
        )

    def minus(self, other: Usage) -> Usage:
        return Usage(
            **{
                name: max(0, getattr(self, name) - getattr(other, name))
                for name in Usage.model_fields
            }
        )

    def is_zero(self) -> bool:
        return all(getattr(self, name) == 0 for name in Usage.model_fields)

    def over(self, quota: Quota) -> list[str]:
        """The counts that exceed `quota`, as `name used/limit` strings."""
        return [
            f"{name} {getattr(self, name)}/{getattr(quota, name)}"
            for name in Usage.model_fields
            if getattr(quota, name) >= 0 and getattr(self, name) > getattr(quota, name)
        ]


class ProjectRecord(Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=1024)
    quota: Quota = Field(default_factory=Quota)
    created_at: datetime


class UserRecord(Model):
    name: str = Field(pattern=NAME_PATTERN)
    role: Role = Role.MEMBER
    projects: list[str] = Field(default_factory=list, max_length=256)
    password_hash: str = Field(description="argon2id")
    totp_secret: str | None = Field(default=None, description="base32; set when TOTP is on")
    totp_pending: str | None = Field(
        default=None, description="base32; enabled but not yet confirmed with a code"
    )
    created_at: datetime


class TokenRecord(Model):
    """A bearer token; only the SHA-256 of its secret is kept (the secret has 256 bits)."""

    id: str = Field(pattern=r"^[a-z0-9]{16}$")
    user: str
    project: str
    secret_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    description: str = Field(default="", max_length=256)
    expires_at: datetime
    created_at: datetime


class FlavorRecord(Model):
    """A named size VMs are made with; copied into the VM's spec (later edits do not move VMs)."""

    name: str = Field(pattern=NAME_PATTERN)
    vcpus: int = Field(ge=1, le=MAX_VCPUS)
    memory_mb: int = Field(ge=32, le=MAX_MEMORY_MB)
    disk_gb: int = Field(ge=0, le=16 * 1024)
    created_at: datetime
