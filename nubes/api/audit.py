"""Request events: every change an authenticated caller asks the API for goes to the event
log, with who asked, what, on which resource, and how it ended.

An ASGI middleware around the app: the caller is known once the route's CallerDep ran
(it is left in the request's state), the resource from the route's path parameters or the
created record's `id` in the answer. Request bodies are never read (passwords), tokens
never written, and unauthenticated requests (a 401, a failed login) leave no trace, so
guessing passwords cannot flood the log. Writing the event never fails the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nubes.api.context import CALLER_STATE, ApiContext, Caller
from nubes.model.event import EventRecord, EventType
from nubes.store.keys import event_key

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API_PATH = "/v1/"
ANSWER_LIMIT = 64 * 1024  # bytes of an answer kept to find the created record's id
WRITE_TIMEOUT = 2.0  # the event is not worth holding the answer longer
NO_RESOURCE = "-"  # a request that named no resource and made none (a refused create)


def request_event(
    caller: Caller,
    *,
    method: str,
    route: str,
    path_params: Mapping[str, Any],
    status: int,
    answer: bytes,
    started: datetime,
) -> EventRecord:
    """The event of one finished request (pure: the unit tests call it)."""
    parts = [part for part in route.removeprefix(API_PATH).split("/") if part]
    kind = parts[0] if parts else "api"
    document = _json(answer)
    resource = _resource(path_params, document)
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
        project=caller.project,
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not scope["path"].startswith(API_PATH)
        ):
            await self.app(scope, receive, send)
            return
        started = datetime.now(UTC)
        status = 500
        answer = bytearray()
        recorded = False

        async def send_and_keep(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                room = ANSWER_LIMIT - len(answer)
                if room > 0:
                    answer.extend(message.get("body", b"")[:room])
                if not message.get("more_body", False) and not recorded:
                    # Before the last byte goes: whoever got the answer finds the event.
                    recorded = True
                    await self._record(scope, started, status, bytes(answer))
            await send(message)

        try:
            await self.app(scope, receive, send_and_keep)
        except Exception:
            if not recorded:
                await self._record(scope, started, 500, b'{"code": "internal"}')
            raise

    async def _record(self, scope: Scope, started: datetime, status: int, answer: bytes) -> None:
        caller = scope.get("state", {}).get(CALLER_STATE)
        route = scope.get("route")
        if not isinstance(caller, Caller) or route is None:
            return  # not authenticated, or no route matched: nothing to record
        try:
            ctx: ApiContext = scope["app"].state.nubes
            event = request_event(
                caller,
                method=scope["method"],
                route=_template(str(getattr(route, "path", scope["path"]))),
                path_params=scope.get("path_params", {}),
                status=status,
                answer=answer,
                started=started,
            )
            suffix = event.id[len(event.resource) + 1 :]
            async with asyncio.timeout(WRITE_TIMEOUT):
                await ctx.store.put(event_key(event.resource, suffix), event.to_json())
        except Exception:  # the request is done; its event is not worth failing it
            log.warning(
                "cannot record the request event of %s %s",
                scope["method"],
                scope["path"],
                exc_info=True,
            )
