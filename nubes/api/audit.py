"""Request events: every change an authenticated caller asks the API for goes to the event
log, with who asked, what, on which resource, and how it ended.

An ASGI middleware around the app: the caller is known once the route's CallerDep ran
(it is left in the request's state), the resource from the route's path parameters (a
name resolved to its id before the handler runs, as a delete frees the name) or the
created record's `id` in the answer. Request bodies are never read (passwords), tokens
never written, and unauthenticated requests (a 401, a failed login) leave no trace, so
guessing passwords cannot flood the log. The event is written after the answer's last
byte went, and never fails the request. Refused requests (4xx) are recorded up to
REFUSED_PER_MINUTE per user a minute, so a script cannot flood the log through them.
Events about users, projects, flavors, hosts and logins (tokens, TOTP) belong to no
project: only admins read them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nubes.api.auth import TOKEN_PREFIX
from nubes.api.context import CALLER_STATE, ApiContext, Caller
from nubes.api.records import GLOBAL_KINDS
from nubes.events.storage import write_once
from nubes.ids import IdKind, is_id
from nubes.model.event import EventRecord, EventType
from nubes.store.base import Store
from nubes.store.keys import Kind, name_key, resource_key

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API_PATH = "/v1/"
ANSWER_LIMIT = 64 * 1024  # bytes of an answer kept to find the created record's id
WRITE_TIMEOUT = 2.0  # the event is not worth holding the request's task longer
NO_RESOURCE = "-"  # a request that named no resource and made none (a refused create)
# Kinds whose events only admins read: other users' accounts, logins, the cloud's make-up.
ADMIN_ONLY_KINDS = frozenset({kind.value for kind in GLOBAL_KINDS} | {"auth"})
REFUSED_PER_MINUTE = 30  # refused-request events recorded per user a minute
# Kinds whose path may hold a name for an id (in the caller's project).
NAMED_KINDS = {kind: IdKind[kind.name] for kind in Kind if kind.name in IdKind.__members__}


def request_event(
    caller: Caller,
    *,
    method: str,
    route: str,
    path_params: Mapping[str, Any],
    status: int,
    answer: bytes,
    started: datetime,
    resolved: str | None = None,
) -> EventRecord:
    """The event of one finished request (pure: the unit tests call it); `resolved` is
    the id the first path parameter named, when it was looked up."""
    parts = [part for part in route.removeprefix(API_PATH).split("/") if part]
    kind = parts[0] if parts else "api"
    document = _json(answer)
    resource = resolved or _resource(path_params, document)
    if resource is None:
        resource = caller.user if kind == "auth" else NO_RESOURCE
    action = f"{method} {route}"
    if status < 400:
        outcome = "ok"
        message = f"{caller.user} asked {action} ({resource}): done"
    else:
        code = document.get("code") if isinstance(document, dict) else None
        outcome = code if isinstance(code, str) else f"http_{status}"
        why = document.get("message") if isinstance(document, dict) else None
        message = f"{caller.user} asked {action}: refused ({outcome})"
        if isinstance(why, str):
            message += f": {why}"
    stamp = int(started.timestamp() * 1_000_000)
    return EventRecord(
        id=f"{resource}:q{stamp:016d}-{secrets.token_hex(4)}",
        at=started,
        project=None if kind in ADMIN_ONLY_KINDS else caller.project,
        kind=kind,
        resource=resource,
        type=EventType.REQUEST,
        actor=caller.user,
        action=action,
        outcome=outcome,
        message=message,
    )


def _template(path: str) -> str:
    # The matched route may be the router's own, without the prefix it was mounted at.
    return path if path.startswith(API_PATH) else API_PATH.rstrip("/") + path


def _json(answer: bytes) -> Any:
    try:
        return json.loads(answer) if answer else None
    except ValueError:
        return None


def _resource(path_params: Mapping[str, Any], document: Any) -> str | None:
    # The created or changed record's id when the answer has one: a path may hold a name.
    if isinstance(document, dict):
        ident = document.get("id")
        if isinstance(ident, str) and _usable(ident):
            return ident
    for value in path_params.values():  # the first parameter is the resource's
        if isinstance(value, str) and _usable(value):
            return value
    if isinstance(document, dict):
        name = document.get("name")
        if isinstance(name, str) and _usable(name):
            return name
    return None


def _usable(value: str) -> bool:
    return 0 < len(value) <= 128 and "/" not in value and value.isascii() and value.isprintable()


class AuditMiddleware:
    """Writes a request event after each mutating /v1 request of an authenticated caller."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._minute = 0
        self._refused: dict[str, int] = {}  # refused requests this minute, by user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not scope["path"].startswith(API_PATH)
        ):
            await self.app(scope, receive, send)
            return
        started = datetime.now(UTC)
        resolved = await _resolve_before(scope)
        status = 500
        answer = bytearray()

        async def send_and_keep(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                room = ANSWER_LIMIT - len(answer)
                if room > 0:
                    answer.extend(message.get("body", b"")[:room])
            await send(message)

        try:
            await self.app(scope, receive, send_and_keep)
        except Exception:
            await self._record(scope, started, 500, b'{"code": "internal"}', resolved)
            raise
        # The answer is out: the client does not wait for its event (it may poll for it).
        await self._record(scope, started, status, bytes(answer), resolved)

    async def _record(
        self,
        scope: Scope,
        started: datetime,
        status: int,
        answer: bytes,
        resolved: _Resolved | None,
    ) -> None:
        caller = scope.get("state", {}).get(CALLER_STATE)
        route = scope.get("route")
        if not isinstance(caller, Caller) or route is None:
            return  # not authenticated, or no route matched: nothing to record
        note = ""
        if status >= 400:
            refused = self._count_refused(caller.user)
            if refused > REFUSED_PER_MINUTE:
                return
            if refused == REFUSED_PER_MINUTE:
                note = f" (the last of {caller.user}'s refused requests recorded this minute)"
        try:
            ctx: ApiContext = scope["app"].state.nubes
            path_params = scope.get("path_params", {})
            event = request_event(
                caller,
                method=scope["method"],
                route=_template(str(getattr(route, "path", scope["path"]))),
                path_params=path_params,
                status=status,
                answer=answer,
                started=started,
                resolved=(
                    resolved.ident if resolved and resolved.holds_for(caller, path_params) else None
                ),
            )
            if note:
                event = event.model_copy(update={"message": event.message + note})
            async with asyncio.timeout(WRITE_TIMEOUT):
                await write_once(ctx.store, [event])
        except Exception:  # the request is done; its event is not worth failing it
            log.warning(
                "cannot record the request event of %s %s",
                scope["method"],
                scope["path"],
                exc_info=True,
            )

    def _count_refused(self, user: str) -> int:
        """How many refused requests of `user` this minute, this one included."""
        minute = int(time.monotonic() // 60)
        if minute != self._minute:
            self._minute, self._refused = minute, {}
        self._refused[user] = self._refused.get(user, 0) + 1
        return self._refused[user]


class _Resolved:
    """The id of the path's resource; for a name, found in the project of the token
    `token` (the request's caller must turn out to have used that token)."""

    def __init__(self, ref: str, ident: str, token: str | None = None) -> None:
        self.ref, self.ident, self.token = ref, ident, token

    def holds_for(self, caller: Caller, path_params: Mapping[str, Any]) -> bool:
        """Whether the route took the segment for its resource and `caller` used the token
        (`/v1/images/import` is no image called "import")."""
        first = next(iter(path_params.values()), None)
        return first == self.ref and (self.token is None or self.token == caller.token_id)


async def _resolve_before(scope: Scope) -> _Resolved | None:
    """The id the path's resource name stands for, read before the handler runs (a
    delete frees the name, and its 204 answer names nothing); the id itself for an id;
    None for a kind without names or a name not found. Never raises: the request goes on
    regardless."""
    parts = scope["path"].removeprefix(API_PATH).split("/")
    try:
        kind = Kind(parts[0])
    except ValueError:
        return None
    id_kind = NAMED_KINDS.get(kind)
    if id_kind is None or len(parts) < 2 or not _usable(parts[1]):
        return None
    if is_id(parts[1], id_kind):
        return _Resolved(parts[1], parts[1])
    token = _token_id(scope)
    if token is None:
        return None
    try:
        store: Store = scope["app"].state.nubes.store
        async with asyncio.timeout(WRITE_TIMEOUT):
            token_kv = await store.get(resource_key(Kind.TOKEN, token))
            project = token_kv.value.get("project") if token_kv is not None else None
            if not isinstance(project, str):
                return None
            guard = await store.get(name_key(kind, project, parts[1]))
    except Exception:
        log.debug("cannot resolve %s for its request event", scope["path"], exc_info=True)
        return None
    if guard is None or not isinstance(guard.value, str) or not _usable(guard.value):
        return None
    return _Resolved(parts[1], guard.value, token)


def _token_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, bearer = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not bearer.startswith(TOKEN_PREFIX):
                return None
            token = bearer.removeprefix(TOKEN_PREFIX).partition(".")[0]
            return token if len(token) == 16 and token.isascii() and token.isalnum() else None
    return None
