"""Who is calling: passwords (argon2id), bearer tokens kept as hashes, optional TOTP.

A token reads `nbt_<id>.<secret>`: the id finds the record, the secret (256 bits)
is checked against its SHA-256. Deleting the record revokes the token at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
import time
from datetime import datetime, timedelta
from urllib.parse import quote

import argon2

from nubes.api.context import ApiContext, Caller
from nubes.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from nubes.model.common import NAME_PATTERN, now
from nubes.model.project import Role, TokenRecord, UserRecord
from nubes.store.base import MAX_TXN_OPERATIONS, Compare, Delete, KeyValue, Store
from nubes.store.keys import Kind, kind_prefix, resource_key

TOKEN_PREFIX = "nbt_"  # noqa: S105 - the visible prefix of every token, not a secret
DEFAULT_TOKEN_TTL = timedelta(hours=12)
MAX_TOKEN_TTL = timedelta(days=365)
TOTP_STEP = 30
TOTP_DIGITS = 6

TOTP_ISSUER = "nubes"

_hasher = argon2.PasswordHasher()  # argon2id with the library's memory-hard defaults
_NAME = re.compile(NAME_PATTERN)
_MISSING_HINT = "log in with `nubes login` and send the token as `Authorization: Bearer <token>`"


class TotpRequired(Unauthorized):
    """The password was right but the user has TOTP on and sent no code."""

    code = "totp_required"


class TotpInvalid(Unauthorized):
    """The password was right but the TOTP code was not the current one."""

    code = "totp_invalid"


class TotpRejected(Forbidden):
    """A TOTP code given to confirm or turn off TOTP was not the current one."""

    code = "totp_rejected"


class WrongPassword(Forbidden):
    """The old password given to change a password was not the user's."""

    code = "wrong_password"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


# One hash to check when the user does not exist, so a wrong name takes as long as
# a wrong password and login timing does not reveal which names exist.
_DUMMY_HASH = hash_password(secrets.token_hex(16))


def check_password(user: UserRecord | None, password: str) -> bool:
    if user is None:
        password_matches(_DUMMY_HASH, password)
        return False
    return password_matches(user.password_hash, password)


def new_totp_secret() -> str:
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii")


def totp_code(secret: str, at: float | None = None) -> str:
    """The RFC 6238 code (HMAC-SHA1, 30 s steps, 6 digits) of `secret` at time `at`."""
    key = base64.b32decode(secret, casefold=True)
    counter = int((time.time() if at is None else at) // TOTP_STEP)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    (number,) = struct.unpack(">I", digest[offset : offset + 4])
    return f"{(number & 0x7FFFFFFF) % 10**TOTP_DIGITS:0{TOTP_DIGITS}d}"


def totp_uri(user: str, secret: str) -> str:
    """The otpauth:// URI authenticator apps read (from a QR code or pasted)."""
    return (
        f"otpauth://totp/{TOTP_ISSUER}:{quote(user, safe='')}?secret={secret}&issuer={TOTP_ISSUER}"
    )


def totp_matches(secret: str, code: str, at: float | None = None) -> bool:
    """True when `code` is the code of this step or of the one before or after (clock drift)."""
    moment = time.time() if at is None else at
    return any(
        hmac.compare_digest(totp_code(secret, moment + drift * TOTP_STEP), code)
        for drift in (-1, 0, 1)
    )


async def mint_token(
    store: Store,
    user: str,
    project: str,
    *,
    ttl: timedelta = DEFAULT_TOKEN_TTL,
    description: str = "",
) -> tuple[str, TokenRecord]:
    """Stores a new token for `user` in `project`; returns the bearer string (shown once)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    created = now()
    record = TokenRecord(
        id=token_id,
        user=user,
        project=project,
        secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
        description=description,
        expires_at=created + min(ttl, MAX_TOKEN_TTL),
        created_at=created,
    )
    await store.put(resource_key(Kind.TOKEN, token_id), record.to_json())
    return f"{TOKEN_PREFIX}{token_id}.{secret}", record


async def authenticate(ctx: ApiContext, authorization: str | None) -> Caller:
    """The caller an `Authorization: Bearer` header names.

    Raises:
        Unauthorized: no header, a malformed token, or one unknown, expired or revoked,
            or whose user is gone or no longer in the token's project.
    """
    if not authorization:
        raise Unauthorized("this request needs a token", hint=_MISSING_HINT)
    scheme, _, bearer = authorization.partition(" ")
    if scheme.lower() != "bearer" or not bearer.startswith(TOKEN_PREFIX):
        raise Unauthorized(
            "the Authorization header is not a nubes bearer token", hint=_MISSING_HINT
        )
    token_id, _, secret = bearer.removeprefix(TOKEN_PREFIX).partition(".")
    refused = Unauthorized("the token is unknown, expired or revoked", hint=_MISSING_HINT)
    if len(token_id) != 16 or not token_id.isalnum() or not token_id.isascii() or not secret:
        raise refused
    kv = await ctx.store.get(resource_key(Kind.TOKEN, token_id))
    if kv is None:
        raise refused
    token = TokenRecord.from_json(kv.value)
    offered = hashlib.sha256(secret.encode()).hexdigest()
    if not hmac.compare_digest(offered, token.secret_sha256):
        raise refused
    if _expired(token.expires_at):
        # The holder proved it has the secret; drop the dead record it points at.
        await ctx.store.txn([Compare.unchanged(kv)], [Delete(kv.key)])
        raise refused
    user_kv = await ctx.store.get(resource_key(Kind.USER, token.user))
    if user_kv is None:
        raise refused
    user = UserRecord.from_json(user_kv.value)
    if user.role is not Role.ADMIN and token.project not in user.projects:
        raise refused
    return Caller(user=user.name, role=user.role, project=token.project, token_id=token.id)


async def read_user_record(store: Store, name: str) -> tuple[KeyValue, UserRecord] | None:
    """The user `name` and its key-value, or None (also for a name no user can have)."""
    if not _NAME.match(name):
        return None
    kv = await store.get(resource_key(Kind.USER, name))
    return None if kv is None else (kv, UserRecord.from_json(kv.value))


async def login_project(store: Store, user: UserRecord, wanted: str | None) -> str:
    """The project a login of `user` works in: `wanted`, or else the user's first.

    A member is told the same whether the project it named exists or not.

    Raises:
        Unauthorized: a member named a project it is not in, or is in none.
        NotFound: an admin named a project that does not exist.
        InvalidInput: an admin in no project named none.
    """
    admin = user.role is Role.ADMIN
    if wanted is None:
        if not user.projects:
            if admin:
                raise InvalidInput(
                    f"admin {user.name} belongs to no project, so the login must name one",
                    hint="add `project` (`nubes project list` shows them)",
                )
            raise Unauthorized(
                f"user {user.name} belongs to no project", hint="ask an admin to add you to one"
            )
        wanted = user.projects[0]
    refused = Unauthorized(
        f"user {user.name} may not log into project {wanted!r}",
        hint="name one of your projects (`nubes project list`), or ask an admin to add you",
    )
    if not admin and wanted not in user.projects:
        raise refused
    exists = _NAME.match(wanted) and await store.get(resource_key(Kind.PROJECT, wanted))
    if not exists:
        if not admin:
            raise refused
        raise NotFound(f"no project {wanted!r}", hint="list them with `nubes project list`")
    return wanted


async def read_tokens(
    store: Store, *, user: str | None = None, project: str | None = None
) -> list[TokenRecord]:
    """Every token record of `user` and/or `project` (all of them when both are None).

    Tokens are few per user, so a scan of the token prefix is cheap enough for the
    rare calls that need it (listing, revoking a user's or a project's tokens).
    """
    result = await store.range(kind_prefix(Kind.TOKEN))
    tokens = [TokenRecord.from_json(kv.value) for kv in result.kvs]
    return [
        token
        for token in tokens
        if (user is None or token.user == user) and (project is None or token.project == project)
    ]


async def revoke_tokens(store: Store, tokens: list[TokenRecord]) -> int:
    """Deletes these token records (the tokens stop working at once); returns how many."""
    removed = 0
    for start in range(0, len(tokens), MAX_TXN_OPERATIONS):
        batch = tokens[start : start + MAX_TXN_OPERATIONS]
        result = await store.txn(
            [], [Delete(resource_key(Kind.TOKEN, token.id)) for token in batch]
        )
        removed += sum(count for count in result.responses if isinstance(count, int))
    return removed


def is_expired(token: TokenRecord) -> bool:
    return _expired(token.expires_at)


def _expired(expires_at: datetime) -> bool:
    return expires_at <= now()
