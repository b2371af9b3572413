"""Query parameters every listing shares, declared once so the OpenAPI schema is exact."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from nubes.api.records import DEFAULT_PAGE, MAX_PAGE

CURSOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="items per page")]
CursorQuery = Annotated[
    str | None,
    Query(pattern=CURSOR_PATTERN, description="the `next` of the previous page"),
]
__all__ = ["DEFAULT_PAGE", "CursorQuery", "LimitQuery"]
