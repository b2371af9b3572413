"""The SDK's one door to the API: JSON requests with a bearer token, errors mapped to
ApiError, list pages followed through their `next` cursors, server-sent events parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from nubes.client.errors import ApiError, ApiUnreachable, NotLoggedIn

API_PREFIX = "/v1"
DEFAULT_TIMEOUT = 30.0
DEFAULT_PAGE_SIZE = 100
Params = Mapping[str, str | int | float | bool | None]


def normalize_url(url: str) -> str:
    """`http://host:8686`, `http://host:8686/` and `http://host:8686/v1` name the same API."""
    url = url.strip().rstrip("/")
    return url.removesuffix(API_PREFIX).rstrip("/")


def segment(value: str) -> str:
    """`value` as one path segment: a name or id can never add or climb a path level."""
    if not value or value in {".", ".."}:
        raise ApiError(400, "invalid_input", f"{value!r} names nothing", hint="give an id or name")
    return quote(value, safe="")


@dataclass(frozen=True)
class Event:
    """One server-sent event: its `event:` type, `id:` and `data:` (JSON when it parses)."""

    type: str
    id: str | None
    data: Any


class Http:
    """A connection to one API. Raises ApiError, ApiUnreachable or NotLoggedIn on every call."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        verify: bool | str = True,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.token = token
        self.page_size = DEFAULT_PAGE_SIZE  # items asked for per page when listing
        self._http = httpx.Client(
            base_url=self.url + API_PREFIX,
            verify=verify,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "nubes-client"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _headers(self, authenticated: bool, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if authenticated:
            if not self.token:
                raise NotLoggedIn(self.url)
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Params | None = None,
        content: Iterable[bytes] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        authenticated: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """The JSON the API answers (None for an empty answer such as 204).

        Raises:
            ApiError: the API answered 4xx or 5xx; carries its code, message and hint.
            ApiUnreachable: nothing answers at the URL.
            NotLoggedIn: the call needs a token and the client has none.
        """
        request = self._http.build_request(
            method,
            path,
            json=json_body,
            params=_clean(params),
            content=content,
            headers=self._headers(authenticated, headers),
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = self._http.send(request)
        except httpx.TransportError as error:
            raise _unreachable(self.url, error) from error
        return _result(response)

    def pages(self, path: str, params: Params | None = None) -> Iterator[Any]:
        """Every item of a listing, fetching the next page only when the last is used up.

        Raises:
            ApiError, ApiUnreachable, NotLoggedIn: as `call`.
        """
        query: dict[str, Any] = {**(params or {}), "limit": self.page_size}
        while True:
            page = self.call("GET", path, params=query)
            yield from page.get("items", [])
            following = page.get("next")
            if not following:
                return
            query["cursor"] = following

    def events(
        self, path: str, params: Params | None = None, *, read_timeout: float | None = None
    ) -> Iterator[Event]:
        """The server-sent events of a streaming GET, as they arrive (ends when the server does).

        Raises:
            ApiError, ApiUnreachable, NotLoggedIn: as `call`.
        """
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        headers = self._headers(True, {"Accept": "text/event-stream"})
        try:
            with self._http.stream(
                "GET", path, params=_clean(params), headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _result(response)
                yield from parse_events(response.iter_lines())
        except httpx.TransportError as error:
            raise _unreachable(self.url, error) from error


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events from the lines of a `text/event-stream` (the WHATWG rules)."""
    kind, event_id, data = "message", None, list[str]()
    for line in lines:
        if not line:
            if data:
                yield Event(kind, event_id, _json_or_text("\n".join(data)))
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: the server's keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    if data:
        yield Event(kind, event_id, _json_or_text("\n".join(data)))


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _clean(params: Params | None) -> dict[str, str | int | float] | None:
    if params is None:
        return None
    cleaned: dict[str, str | int | float] = {}
    for name, value in params.items():
        if value is None:
            continue
        cleaned[name] = ("true" if value else "false") if isinstance(value, bool) else value
    return cleaned


def _result(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        raise ApiError.from_response(response.status_code, body, response.reason_phrase)
    if response.status_code == 204 or not response.content:
        return None
    if "json" not in response.headers.get("content-type", ""):
        return response.text
    return response.json()


def _unreachable(url: str, error: httpx.TransportError) -> ApiUnreachable:
    if isinstance(error, httpx.ConnectError):
        why = "connection refused" if "refused" in str(error).lower() else str(error) or "no route"
    elif isinstance(error, httpx.TimeoutException):
        why = "it did not answer in time"
    else:
        why = str(error) or type(error).__name__
    return ApiUnreachable(url, why)
