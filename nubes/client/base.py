"""The generic verbs every resource shares (list, get, create, update, delete, act, wait)
and the table of where each kind lives in the API; `Client` names them per resource.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from nubes.client.errors import ApiError, ResourceFailed, WaitTimeout
from nubes.client.http import DEFAULT_TIMEOUT, Http, Params, segment
from nubes.ids import IdKind, is_id

Json = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API and how its refs are told apart from names."""

    noun: str
    path: str
    id_kind: IdKind | None = None  # None: the name is the id (projects, flavors, key pairs)
    # Whether every API path of the kind takes a name as well as an id; when not, the
    # client looks a name up first (one listing filtered by name).
    names_in_path: bool = False
    lookup: str = "name"  # the field (and list filter) a non-id ref is matched against

    @property
    def command(self) -> str:
        return self.noun.replace(" ", "-")


PROJECT = Resource("project", "/projects")
USER = Resource("user", "/users")
TOKEN = Resource("token", "/auth/tokens")
FLAVOR = Resource("flavor", "/flavors")
KEYPAIR = Resource("keypair", "/keypairs")
IMAGE = Resource("image", "/images")  # the API takes a name or an id
NETWORK = Resource("network", "/networks", IdKind.NETWORK)
SUBNET = Resource("subnet", "/subnets", IdKind.SUBNET)
PORT = Resource("port", "/ports", IdKind.PORT)
SECURITY_GROUP = Resource("security group", "/security-groups", IdKind.SECURITY_GROUP)
FLOATING_IP = Resource("floating ip", "/floating-ips", IdKind.FLOATING_IP, lookup="address")
VOLUME = Resource("volume", "/volumes", IdKind.VOLUME)
VM = Resource("vm", "/vms", IdKind.VM)
HOST = Resource("host", "/hosts")


def name_of(record: Json, field: str = "name") -> str | None:
    """A record's name (or other `field`), at the top (flavors, images) or in its spec."""
    name = record.get(field)
    if name is None and isinstance(record.get("spec"), dict):
        name = record["spec"].get(field)
    return name if isinstance(name, str) else None


def state_of(record: Json) -> str | None:
    """A record's state: the view's own `state`, else its status's."""
    if isinstance(record.get("state"), str):
        return str(record["state"])
    status = record.get("status")
    state = status.get("state") if isinstance(status, dict) else None
    return state if isinstance(state, str) else None


class BaseClient(Http):
    """The generic verbs. Every method raises ApiError (the API refused), ApiUnreachable
    (nothing answers) or NotLoggedIn (no token) unless it says otherwise."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        verify: bool | str = True,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, verify=verify, timeout=timeout, transport=transport)
        # The last login's answer: user, role, project, token_id, expires_at.
        self.last_login: Json | None = None

    # -- generic verbs: everything below is a thin name over these ----------------------

    def records(self, resource: Resource, **filters: Any) -> Iterator[Json]:
        """Every record of `resource` the caller may see, filtered as the API allows."""
        return self.pages(resource.path, filters)

    def resolve(self, resource: Resource, ref: str) -> str:
        """The id of the record `ref` names (an id, or a name in the caller's project).

        Raises:
            ApiError: `not_found` when nothing has that name, `ambiguous` when several do.
        """
        if resource.names_in_path or resource.id_kind is None or is_id(ref, resource.id_kind):
            return ref
        found = self.records(resource, **{resource.lookup: ref})
        matches = [r for r in found if name_of(r, resource.lookup) == ref]
        if not matches:
            raise ApiError(
                404,
                "not_found",
                f"no {resource.noun} with {resource.lookup} {ref!r} in this project",
                hint=f"list them with `nubes {resource.command} list`",
            )
        if len(matches) > 1:
            raise ApiError(
                409,
                "ambiguous",
                f"{len(matches)} {resource.noun}s have {resource.lookup} {ref!r}",
                hint=f"give the id instead; `nubes {resource.command} list` shows them",
            )
        return str(matches[0]["id"])

    def get(self, resource: Resource, ref: str) -> Json:
        result: Json = self.call("GET", self._item(resource, ref))
        return result

    def create(self, resource: Resource, body: Json) -> Json:
        result: Json = self.call("POST", resource.path, json_body=drop_none(body))
        return result

    def update(self, resource: Resource, ref: str, body: Json) -> Json:
        result: Json = self.call("PATCH", self._item(resource, ref), json_body=drop_none(body))
        return result

    def delete(self, resource: Resource, ref: str) -> Json | None:
        """Deletes a record: None when it is gone (204), its view when it is going (202)."""
        result: Json | None = self.call("DELETE", self._item(resource, ref))
        return result

    def action(
        self,
        resource: Resource,
        ref: str,
        verb: str,
        body: Json | None = None,
        method: str = "POST",
        params: Params | None = None,
    ) -> Any:
        """`method` on `<resource>/<ref>/<verb>` (verb is a path the caller made safe)."""
        path = f"{self._item(resource, ref)}/{verb}"
        json_body = None if body is None else drop_none(body)
        return self.call(method, path, json_body=json_body, params=params)

    def _item(self, resource: Resource, ref: str) -> str:
        return f"{resource.path}/{segment(self.resolve(resource, ref))}"

    def wait_for(self, resource: Resource, ref: str, state: str, timeout: float) -> Json:
        """Polls a record until its state is `state`.

        Raises:
            ResourceFailed: it went to `error`. WaitTimeout: `timeout` passed first.
        """
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(resource, ref)
            current = state_of(record)
            if current == state:
                return record
            if current == "error":
                reason = (record.get("status") or {}).get("reason") or "no reason given"
                raise ResourceFailed(
                    f"{resource.noun} {ref} went to error: {reason}",
                    hint=f"see `nubes {resource.command} show {ref}`",
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"{resource.noun} {ref} is still {current} after {timeout:g} s",
                    hint="wait longer with --timeout",
                )
            time.sleep(0.2)


def drop_none(body: Json) -> Json:
    return {name: value for name, value in body.items() if value is not None}
