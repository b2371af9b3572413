"""Usage accounting: what a project used over a period (VM-minutes by flavor, volume
GiB-hours, floating-IP hours), from the intervals the meter keeps.

Members read their own projects' usage (another project is a 404, as everywhere);
admins read any project's, a deleted one's too, since its history outlives it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.errors import NotFound
from nubes.metering.interval import read_intervals
from nubes.metering.report import (
    UsageReport,
    check_period,
    month_start,
    parse_moment,
    summarize,
)
from nubes.model.common import NAME_PATTERN, now
from nubes.model.project import UserRecord
from nubes.store.base import Store
from nubes.store.keys import Kind, resource_key

router = APIRouter(tags=["usage"])


@router.get("/usage")
async def get_usage(
    ctx: ContextDep,
    caller: CallerDep,
    project: Annotated[
        str | None,
        Query(pattern=NAME_PATTERN, description="default: the token's project"),
    ] = None,
    start: Annotated[
        str | None,
        Query(
            alias="from",
            max_length=64,
            description="start, included: a date (2026-11-01, midnight UTC), an ISO 8601 "
            "time or `now`; default: the first of this month, UTC",
        ),
    ] = None,
    end: Annotated[
        str | None,
        Query(
            alias="to",
            max_length=64,
            description="end, excluded: a date, an ISO 8601 time or `now` (the default)",
        ),
    ] = None,
) -> UsageReport:
    """What a project used over a period: VM-minutes per flavor, volume GiB-hours,
    floating-IP hours, and a line per resource. What still runs counts up to now."""
    moment = now()
    period_start = month_start(moment) if start is None else parse_moment(start, moment, "from")
    period_end = moment if end is None else parse_moment(end, moment, "to")
    check_period(period_start, period_end)
    name = project or caller.project
    await _check_visible(ctx.store, caller, name)
    intervals = await read_intervals(ctx.store, name)
    return summarize(name, intervals, period_start, period_end, moment)


async def _check_visible(store: Store, caller: Caller, project: str) -> None:
    """Raises NotFound unless the caller is an admin or a member of `project`."""
    if caller.is_admin:
        return
    kv = await store.get(resource_key(Kind.USER, caller.user))
    projects = [] if kv is None else UserRecord.from_json(kv.value).projects
    if project not in projects:
        raise NotFound(f"no project {project!r}", hint="list yours with `nubes project list`")
