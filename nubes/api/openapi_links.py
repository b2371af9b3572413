"""OpenAPI links for route decorators: what a response feeds into next (a new network's id
into a subnet create), so clients and generated tests can follow create-read-change-delete.
"""

from __future__ import annotations

from typing import Any

from nubes.api.app import API_PREFIX


def link(
    operation: str,
    description: str,
    *,
    parameters: dict[str, str] | None = None,
    body: dict[str, Any] | list[Any] | None = None,
) -> dict[str, Any]:
    """An OpenAPI Link object to `operation` ("METHOD /path" without the API prefix), with
    runtime expressions for its path parameters and request body fields."""
    method, path = operation.split(" ", 1)
    pointer = f"{API_PREFIX}{path}".replace("~", "~0").replace("/", "~1")
    found: dict[str, Any] = {
        "operationRef": f"#/paths/{pointer}/{method.lower()}",
        "description": description,
    }
    if parameters:
        found["parameters"] = parameters
    if body is not None:
        found["requestBody"] = body
    return found


def links(status: int, **named: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """A route decorator's `responses` entry giving the `status` response these links."""
    return {status: {"links": named}}
