"""The HTTP API: one FastAPI app under /v1, JSON errors with stable codes, OpenAPI.

Every error a client can get has the body `{"code", "message", "hint"?}` (ErrorBody),
including malformed requests and unknown routes; the OpenAPI document says so.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from nubes import __version__
from nubes.api.audit import AuditMiddleware
from nubes.api.context import ApiContext
from nubes.errors import NubesError

log = logging.getLogger(__name__)

API_PREFIX = "/v1"


class ErrorBody(BaseModel):
    code: str
    message: str
    hint: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "the request is malformed"),
        (401, "no valid token"),
        (403, "the caller's role may not do this"),
        (404, "no such resource in the caller's project"),
        (409, "conflicts with the current state, or over quota"),
        (422, "a field is invalid"),
        (503, "the store is unavailable"),
    ]
}


class Health(BaseModel):
    status: str
    version: str


def create_app(ctx: ApiContext) -> FastAPI:
    """The API app serving `ctx`'s store."""
    from nubes.api.routes import ROUTERS
    from nubes.api.web import mount_dashboard
    from nubes.metrics.api import install_api_metrics

    app = FastAPI(
        title="nubes",
        version=__version__,
        description="A small, complete IaaS cloud. Authenticate with `Authorization: Bearer`.",
        responses=ERROR_RESPONSES,
    )
    app.state.nubes = ctx
    app.add_exception_handler(NubesError, _nubes_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(AuditMiddleware)
    health = APIRouter()

    @health.get(f"{API_PREFIX}/health", tags=["health"])
    async def get_health() -> Health:
        """Whether the API answers (no token needed)."""
        return Health(status="ok", version=__version__)

    app.include_router(health)
    install_api_metrics(app, ctx)
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    mount_dashboard(app)
    return app


def error_response(error: NubesError) -> JSONResponse:
    return JSONResponse(status_code=error.http_status, content=error.to_dict())


async def _nubes_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, NubesError)
    if error.http_status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, error)
    return error_response(error)


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        problems.append(f"{where or 'body'}: {problem.get('msg', 'invalid')}")
    body = ErrorBody(
        code="invalid_input",
        message="; ".join(problems) or "the request is invalid",
        hint="fix the fields named and send it again; /openapi.json describes every field",
    )
    return JSONResponse(status_code=422, content=body.model_dump(exclude_none=True))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    code = codes.get(error.status_code, "http_error")
    message = str(error.detail)
    if error.status_code == 404:
        message = f"there is no {request.url.path} in this API"
    headers = dict(getattr(error, "headers", None) or {})
    if error.status_code == 405:
        # Starlette names only the first route that matched the path; list them all.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    body = ErrorBody(code=code, message=message, hint="see /openapi.json for the routes")
    return JSONResponse(
        status_code=error.status_code,
        content=body.model_dump(exclude_none=True),
        headers=headers,
    )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the documented path that names `request`'s path most exactly
    (/v1/images/import is its own path, not the image called "import")."""
    path = request.url.path
    best: tuple[int, dict[str, Any]] | None = None
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path) and (best is None or template.count("{") < best[0]):
            best = (template.count("{"), operations)
    if best is not None:
        return sorted(method.upper() for method in best[1] if method.upper() in _METHODS)
    # Undocumented routes (/metrics, /ui): ask each route whether another method fits.
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.routes):
            allowed.append(method)
    return allowed


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=error)
    body = ErrorBody(
        code="internal",
        message="the API failed on this request (a bug); the API's log has the details",
        hint="report it with the time of the request",
    )
    return JSONResponse(status_code=500, content=body.model_dump(exclude_none=True))
