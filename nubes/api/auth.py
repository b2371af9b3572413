"""Who is calling: passwords (argon2id), bearer tokens kept as hashes, optional TOTP.

A token reads `nbt_<id>.<secret>`: the id finds the record, the secret (256 bits)
is checked against its SHA-256. Deleting the record revokes the token at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
from datetime import datetime, timedelta

import argon2

from nubes.api.context import ApiContext, Caller
from nubes.errors import Unauthorized
from nubes.model.common import now
from nubes.model.project import Role, TokenRecord, UserRecord
from nubes.store.base import Store
from nubes.store.keys import Kind, resource_key

TOKEN_PREFIX = "nbt_"  # noqa: S105 - the visible prefix of every token, not a secret
DEFAULT_TOKEN_TTL = timedelta(hours=12)
MAX_TOKEN_TTL = timedelta(days=365)
TOTP_STEP = 30
TOTP_DIGITS = 6

_hasher = argon2.PasswordHasher()  # argon2id with the library's memory-hard defaults
_MISSING_HINT = "log in with `nubes login` and send the token as `Authorization: Bearer <token>`"


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
    if not hmac.compare_digest(offered, token.secret_sha256) or _expired(token.expires_at):
        raise refused
    user_kv = await ctx.store.get(resource_key(Kind.USER, token.user))
    if user_kv is None:
        raise refused
    user = UserRecord.from_json(user_kv.value)
    if user.role is not Role.ADMIN and token.project not in user.projects:
        raise refused
    return Caller(user=user.name, role=user.role, project=token.project, token_id=token.id)


def _expired(expires_at: datetime) -> bool:
    return expires_at <= now()
