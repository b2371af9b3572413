"""Schemathesis hooks for the API run (loaded through SCHEMATHESIS_HOOKS): a narrower
`ensure_resource_availability` that tells the created resource apart from a reference.

The built-in check flags any 404 that follows a create when the path came from the
create's response. The API also answers 404 when a *body* field names something missing
(a rule's `remote_group`, a revert's `snapshot`), which is right and not this bug. The
API's 404 message quotes what it did not find, so only a 404 quoting one of the linked
path parameters (the resource just created) is a failure.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.openapi.checks import EnsureResourceAvailability
from schemathesis.specs.openapi.checks import ensure_resource_availability


@schemathesis.check
def created_resource_available(ctx: Any, response: Any, case: Any) -> bool | None:
    """A resource a create just answered with is found by the operations linked to it."""
    try:
        return ensure_resource_availability(ctx, response, case)
    except EnsureResourceAvailability:
        linked = [str(value) for value in (case.path_parameters or {}).values() if value]
        try:
            message: str | None = str(response.json().get("message", ""))
        except (ValueError, AttributeError):
            message = None  # not the API's error body: keep the built-in verdict
        if message is None or any(f"'{v}'" in message or f'"{v}"' in message for v in linked):
            raise
        return None
