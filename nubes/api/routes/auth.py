"""Who is calling: log in for a bearer token, manage one's tokens and TOTP, and users.

Login never says whether a user name exists; members see only themselves among
users; only admins make, change and delete users.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import ConfigDict, Field

from nubes.api.auth import (
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_TTL,
    TotpInvalid,
    TotpRejected,
    TotpRequired,
    WrongPassword,
    check_password,
    hash_password,
    is_expired,
    login_project,
    mint_token,
    new_totp_secret,
    read_tokens,
    read_user_record,
    revoke_tokens,
    totp_matches,
    totp_uri,
)
from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Records
from nubes.errors import Conflict, InvalidInput, NotFound, Unauthorized
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.project import Role, TokenRecord, UserRecord
from nubes.store.base import Compare, Delete, KeyValue, Store
from nubes.store.keys import Kind, resource_key

router = APIRouter(tags=["auth"])

MAX_TTL_HOURS = int(MAX_TOKEN_TTL / timedelta(hours=1))
DEFAULT_TTL_HOURS = int(DEFAULT_TOKEN_TTL / timedelta(hours=1))
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_TOKEN_ID = re.compile(r"^[a-z0-9]{16}$")
_TOTP_CODE = r"^[0-9]{6}$"

Password = Annotated[str, Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]
ProjectName = Annotated[str, Field(pattern=NAME_PATTERN)]
TotpCode = Annotated[str, Field(pattern=_TOTP_CODE, description="6 digits")]
TtlHours = Annotated[int, Field(ge=1, le=MAX_TTL_HOURS, description="hours the token lives")]


# -- models --------------------------------------------------------------------


class LoginRequest(Model):
    user: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD)
    project: ProjectName | None = Field(
        default=None, description="default: the user's first project"
    )
    totp: TotpCode | None = None
    ttl_hours: TtlHours = DEFAULT_TTL_HOURS


class LoginResult(Model):
    token: str = Field(description="send as `Authorization: Bearer <token>`; shown only once")
    token_id: str
    expires_at: datetime
    user: str
    role: Role
    project: str


class TokenView(Model):
    """A token without its secret (only its hash is kept)."""

    id: str
    user: str
    project: str
    description: str
    expires_at: datetime
    created_at: datetime
    current: bool = Field(description="the token this request was made with")


class TokenPage(Model):
    items: list[TokenView]
    next: str | None = None


class TokenCreate(Model):
    description: str = Field(default="", max_length=256)
    ttl_hours: TtlHours = DEFAULT_TTL_HOURS


class NewToken(TokenView):
    token: str = Field(description="send as `Authorization: Bearer <token>`; shown only once")


class WhoAmI(Model):
    user: str
    role: Role
    project: str
    token_id: str
    expires_at: datetime


class TotpSetup(Model):
    secret: str = Field(description="base32; enter it in an authenticator app")
    uri: str = Field(description="otpauth:// URI, for a QR code")


class TotpConfirm(Model):
    code: TotpCode


class UserCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    password: Password
    role: Role = Role.MEMBER
    projects: list[ProjectName] = Field(default_factory=list, max_length=256)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "example-user", "password": "example-password", "projects": ["default"]},
                {
                    "name": "example-user-2",
                    "password": "example-password",
                    "role": "member",
                    "projects": ["default", "example-project"],
                },
            ]
        }
    )


class UserUpdate(Model):
    password: Password | None = None
    role: Role | None = None
    projects: list[ProjectName] | None = Field(default=None, max_length=256)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"projects": ["default", "example-project"]},
                {"password": "another-password"},
            ]
        }
    )


class PasswordChange(Model):
    old_password: str | None = Field(
        default=None, max_length=MAX_PASSWORD, description="needed to change one's own"
    )
    new_password: Password


class UserView(Model):
    """A user without its secrets."""

    name: str
    role: Role
    projects: list[str]
    totp: bool = Field(description="whether login needs a TOTP code")
    created_at: datetime


class UserPage(Model):
    items: list[UserView]
    next: str | None = None


# -- login and tokens ------------------------------------------------------------


@router.post("/auth/login", status_code=201)
async def login(body: LoginRequest, ctx: ContextDep) -> LoginResult:
    """Trade a user name and password (and TOTP code) for a bearer token."""
    found = await read_user_record(ctx.store, body.user)
    user = found[1] if found else None
    if not await asyncio.to_thread(check_password, user, body.password) or user is None:
        # One message for an unknown name and a wrong password: names stay private.
        raise Unauthorized(
            "wrong user name or password",
            hint="check both and try again; an admin can set a new password",
        )
    if user.totp_secret is not None:
        if body.totp is None:
            raise TotpRequired(
                f"user {user.name} has two-factor login on: send the current TOTP code too",
                hint="add `totp` with the 6-digit code from your authenticator app",
            )
        if not totp_matches(user.totp_secret, body.totp):
            raise TotpInvalid(
                "the TOTP code is not the current one",
                hint="send the code your authenticator shows now (check the clock if it keeps"
                " failing); an admin can turn TOTP off for you",
            )
    project = await login_project(ctx.store, user, body.project)
    token, record = await mint_token(
        ctx.store, user.name, project, ttl=timedelta(hours=body.ttl_hours), description="login"
    )
    return LoginResult(
        token=token,
        token_id=record.id,
        expires_at=record.expires_at,
        user=user.name,
        role=user.role,
        project=project,
    )


@router.get("/auth/whoami")
async def whoami(ctx: ContextDep, caller: CallerDep) -> WhoAmI:
    """Who the token in use belongs to, its project and when it expires."""
    token = await _read_token(ctx.store, caller.token_id)
    if token is None:
        raise Unauthorized("the token was revoked meanwhile", hint="log in again")
    return WhoAmI(
        user=caller.user,
        role=caller.role,
        project=caller.project,
        token_id=caller.token_id,
        expires_at=token.expires_at,
    )


@router.get("/auth/tokens")
async def list_tokens(
    ctx: ContextDep,
    caller: CallerDep,
    user: Annotated[str | None, Query(max_length=128, description="admins: whose")] = None,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
) -> TokenPage:
    """The caller's live tokens (admins may name another user), by id."""
    owner = user or caller.user
    if owner != caller.user:
        caller.require_admin("list another user's tokens")
    items, following = await Records(ctx.store).page(
        Kind.TOKEN,
        TokenRecord,
        None,
        limit=limit,
        cursor=cursor,
        keep=lambda token: token.user == owner and not is_expired(token),
    )
    return TokenPage(items=[_token_view(token, caller) for token, _ in items], next=following)


@router.post("/auth/tokens", status_code=201)
async def create_token(body: TokenCreate, ctx: ContextDep, caller: CallerDep) -> NewToken:
    """Mint another token for the caller in its project (for scripts)."""
    token, record = await mint_token(
        ctx.store,
        caller.user,
        caller.project,
        ttl=timedelta(hours=body.ttl_hours),
        description=body.description,
    )
    return NewToken(token=token, **_token_view(record, caller).model_dump())


@router.delete("/auth/tokens/{token_id}", status_code=204)
async def revoke_token(token_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Revoke one of the caller's tokens (admins: anyone's); it stops working at once."""
    kv = (
        await ctx.store.get(resource_key(Kind.TOKEN, token_id))
        if _TOKEN_ID.match(token_id)
        else None
    )
    token = TokenRecord.from_json(kv.value) if kv else None
    if kv is None or token is None or (token.user != caller.user and not caller.is_admin):
        raise NotFound(f"no token {token_id!r} of yours", hint="list yours with `nubes token list`")
    await ctx.store.txn([Compare.unchanged(kv)], [Delete(kv.key)])
    return Response(status_code=204)


@router.delete("/auth/token", status_code=204)
async def logout(ctx: ContextDep, caller: CallerDep) -> Response:
    """Revoke the token this request was made with (log out)."""
    await ctx.store.delete(resource_key(Kind.TOKEN, caller.token_id))
    return Response(status_code=204)


# -- TOTP ------------------------------------------------------------------------------


@router.post("/auth/totp", status_code=201)
async def enable_totp(ctx: ContextDep, caller: CallerDep) -> TotpSetup:
    """Start turning two-factor login on: a new secret, active once confirmed with a code."""
    secret = new_totp_secret()

    async def change(user: UserRecord) -> tuple[UserRecord, None]:
        if user.totp_secret is not None:
            raise Conflict(
                f"two-factor login is already on for {user.name}",
                hint="turn it off first (DELETE /v1/auth/totp with a current code)",
            )
        return user.model_copy(update={"totp_pending": secret}), None

    await Records(ctx.store).mutate(Kind.USER, UserRecord, caller, caller.user, change)
    return TotpSetup(secret=secret, uri=totp_uri(caller.user, secret))


@router.post("/auth/totp/confirm")
async def confirm_totp(body: TotpConfirm, ctx: ContextDep, caller: CallerDep) -> UserView:
    """Turn two-factor login on with a code the new secret gives."""

    async def change(user: UserRecord) -> tuple[UserRecord, None]:
        if user.totp_pending is None:
            raise Conflict(
                "there is no TOTP secret waiting for confirmation",
                hint="start with POST /v1/auth/totp",
            )
        if not totp_matches(user.totp_pending, body.code):
            raise TotpRejected(
                "the code does not match the new TOTP secret",
                hint="enter the secret in your authenticator app and send the code it shows now",
            )
        return user.model_copy(
            update={"totp_secret": user.totp_pending, "totp_pending": None}
        ), None

    user, _ = await Records(ctx.store).mutate(Kind.USER, UserRecord, caller, caller.user, change)
    return user_view(user)


@router.delete("/auth/totp")
async def disable_totp(body: TotpConfirm, ctx: ContextDep, caller: CallerDep) -> UserView:
    """Turn two-factor login off, proven with a current code."""

    async def change(user: UserRecord) -> tuple[UserRecord, None]:
        if user.totp_secret is None:
            raise Conflict(f"two-factor login is not on for {user.name}", hint="nothing to do")
        if not totp_matches(user.totp_secret, body.code):
            raise TotpRejected(
                "the TOTP code is not the current one",
                hint="send the code your authenticator shows now; an admin can reset TOTP",
            )
        return user.model_copy(update={"totp_secret": None, "totp_pending": None}), None

    user, _ = await Records(ctx.store).mutate(Kind.USER, UserRecord, caller, caller.user, change)
    return user_view(user)


# -- users ---------------------------------------------------------------------------


@router.post("/users", status_code=201, tags=["users"])
async def create_user(body: UserCreate, ctx: ContextDep, caller: CallerDep) -> UserView:
    """Make a user (admin)."""
    caller.require_admin("make users")
    projects = await _existing_projects(ctx.store, body.projects)
    record = UserRecord(
        name=body.name,
        role=body.role,
        projects=projects,
        password_hash=await asyncio.to_thread(hash_password, body.password),
        created_at=now(),
    )
    await Records(ctx.store).create(caller, Kind.USER, body.name, record)
    return user_view(record)


@router.get("/users", tags=["users"])
async def list_users(
    ctx: ContextDep,
    caller: CallerDep,
    project: Annotated[str | None, Query(max_length=128, description="members of")] = None,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
) -> UserPage:
    """The users, by name (admin)."""
    caller.require_admin("list users")
    items, following = await Records(ctx.store).page(
        Kind.USER,
        UserRecord,
        caller,
        limit=limit,
        cursor=cursor,
        keep=lambda user: project is None or project in user.projects,
    )
    return UserPage(items=[user_view(user) for user, _ in items], next=following)


@router.get("/users/{name}", tags=["users"])
async def get_user(name: str, ctx: ContextDep, caller: CallerDep) -> UserView:
    """One user (members: only themselves)."""
    _, user = await _visible_user(ctx.store, caller, name)
    return user_view(user)


@router.patch("/users/{name}", tags=["users"])
async def update_user(name: str, body: UserUpdate, ctx: ContextDep, caller: CallerDep) -> UserView:
    """Change a user's password, role or projects (admin)."""
    caller.require_admin("change users")
    if name == caller.user and body.role is not None and body.role is not Role.ADMIN:
        raise Conflict(
            "an admin may not take its own admin role away",
            hint="another admin must do it, so the cloud keeps one",
        )
    await _visible_user(ctx.store, caller, name)
    update: dict[str, object] = {}
    if body.password is not None:
        update["password_hash"] = await asyncio.to_thread(hash_password, body.password)
    if body.role is not None:
        update["role"] = body.role
    if body.projects is not None:
        update["projects"] = await _existing_projects(ctx.store, body.projects)

    async def change(user: UserRecord) -> tuple[UserRecord, None]:
        return user.model_copy(update=update), None

    user, _ = await Records(ctx.store).mutate(Kind.USER, UserRecord, caller, name, change)
    return user_view(user)


@router.delete("/users/{name}", status_code=204, tags=["users"])
async def delete_user(name: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a user (admin); its tokens stop working at once."""
    caller.require_admin("delete users")
    if name == caller.user:
        raise Conflict("an admin may not delete itself", hint="another admin must do it")
    kv, _ = await _visible_user(ctx.store, caller, name)
    if await Records(ctx.store).remove(caller, kv, with_status=False) is None:
        raise Conflict(f"user {name} changed while it was being deleted", hint="try again")
    await revoke_tokens(ctx.store, await read_tokens(ctx.store, user=name))
    return Response(status_code=204)


@router.post("/users/{name}/password", status_code=204, tags=["users"])
async def change_password(
    name: str, body: PasswordChange, ctx: ContextDep, caller: CallerDep
) -> Response:
    """Change one's own password with the old one (admins: anyone's, without it)."""
    _, user = await _visible_user(ctx.store, caller, name)
    if name == caller.user or not caller.is_admin:
        old = body.old_password or ""
        if not await asyncio.to_thread(check_password, user, old):
            raise WrongPassword(
                "the old password is wrong", hint="send your current password as old_password"
            )
    password_hash = await asyncio.to_thread(hash_password, body.new_password)

    async def change(record: UserRecord) -> tuple[UserRecord, None]:
        return record.model_copy(update={"password_hash": password_hash}), None

    await Records(ctx.store).mutate(Kind.USER, UserRecord, caller, name, change)
    return Response(status_code=204)


@router.delete("/users/{name}/totp", tags=["users"])
async def reset_totp(name: str, ctx: ContextDep, caller: CallerDep) -> UserView:
    """Turn a user's two-factor login off (admin), e.g. after a lost phone."""
    caller.require_admin("reset another user's TOTP")
    await _visible_user(ctx.store, caller, name)

    async def change(user: UserRecord) -> tuple[UserRecord, None]:
        return user.model_copy(update={"totp_secret": None, "totp_pending": None}), None

    user, _ = await Records(ctx.store).mutate(Kind.USER, UserRecord, caller, name, change)
    return user_view(user)


# -- helpers -------------------------------------------------------------------------


def user_view(user: UserRecord) -> UserView:
    return UserView(
        name=user.name,
        role=user.role,
        projects=list(user.projects),
        totp=user.totp_secret is not None,
        created_at=user.created_at,
    )


async def _visible_user(store: Store, caller: Caller, name: str) -> tuple[KeyValue, UserRecord]:
    """Raises NotFound unless the user exists and the caller is an admin or that user."""
    found = await read_user_record(store, name) if caller.is_admin or name == caller.user else None
    if found is None:
        raise NotFound(f"no user {name!r}", hint="check the name (admins: `nubes user list`)")
    return found


async def _read_token(store: Store, token_id: str) -> TokenRecord | None:
    kv = await store.get(resource_key(Kind.TOKEN, token_id))
    return None if kv is None else TokenRecord.from_json(kv.value)


def _token_view(token: TokenRecord, caller: Caller) -> TokenView:
    return TokenView(
        id=token.id,
        user=token.user,
        project=token.project,
        description=token.description,
        expires_at=token.expires_at,
        created_at=token.created_at,
        current=token.id == caller.token_id,
    )


async def _existing_projects(store: Store, names: list[str]) -> list[str]:
    """`names` without repeats, in order.

    Raises:
        InvalidInput: one of them is not a project.
    """
    unique = list(dict.fromkeys(names))
    for name in unique:
        if await store.get(resource_key(Kind.PROJECT, name)) is None:
            raise InvalidInput(
                f"there is no project {name!r}",
                hint="make it first (`nubes project create`) or leave it out",
            )
    return unique
