"""The Python SDK of the nubes API (httpx): `Client(url, token)` and the errors it raises.

The CLI and the end-to-end tests use it; every call returns the API's JSON as dicts.
"""

from __future__ import annotations

from nubes.client.base import Resource
from nubes.client.client import Client
from nubes.client.errors import (
    ApiError,
    ApiUnreachable,
    NotLoggedIn,
    ResourceFailed,
    WaitTimeout,
)
from nubes.client.http import Event
from nubes.client.session import Session, resolve_session, save_session

__all__ = [
    "ApiError",
    "ApiUnreachable",
    "Client",
    "Event",
    "NotLoggedIn",
    "Resource",
    "ResourceFailed",
    "Session",
    "WaitTimeout",
    "resolve_session",
    "save_session",
]
