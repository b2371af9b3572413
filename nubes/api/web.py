"""Serves the web dashboard at /ui/: the static front end in nubes/web/static/, under a
strict Content-Security-Policy. The pages call the JSON API under /v1 like any client.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from nubes.web import STATIC_DIR

DASHBOARD_PATH = "/ui"

# Only our own files run and load; API data never becomes markup, and this policy is
# the second line of defence should a bug let some through.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # No build step means no content hashes in file names: a browser must ask again each
    # time (a cheap 304 by ETag), or an upgrade would mix old scripts with new pages.
    "Cache-Control": "no-cache",
}


class _DashboardFiles(StaticFiles):
    """Static files with the dashboard's security and cache headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serves the dashboard at /ui/ on `app`; `/` and `/ui` lead there. None of it is
    part of the OpenAPI document: it is not JSON."""

    @app.get("/", include_in_schema=False)
    @app.get(DASHBOARD_PATH, include_in_schema=False)
    async def to_dashboard() -> RedirectResponse:
        return RedirectResponse(f"{DASHBOARD_PATH}/", status_code=307)

    app.mount(DASHBOARD_PATH, _DashboardFiles(directory=STATIC_DIR, html=True), name="dashboard")
