"""GET /v1/usage: a project's usage over a period from the meter's intervals; members
read only their own projects, admins any; bad dates and empty periods are a 422."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nubes.metering.interval import MeteredFlavor, MeteredKind, UsageInterval
from nubes.store.base import Put
from tests.support.api_lab import ApiLab

T0 = datetime(2026, 10, 1, tzinfo=UTC)


async def add_intervals(lab: ApiLab, project: str) -> None:
    vm = UsageInterval(
        project=project,
        resource="i-aaaaaaaaaa",
        kind=MeteredKind.VM,
        opening="0000000000000010",
        flavor=MeteredFlavor(name="small", vcpus=1, memory_mb=1024),
        started_at=T0,
        ended_at=T0 + timedelta(minutes=90),
    )
    volume = UsageInterval(
        project=project,
        resource="vol-aaaaaaaaaa",
        kind=MeteredKind.VOLUME,
        opening="0000000000000011",
        size_gb=10,
        started_at=T0 + timedelta(hours=1),
    )
    await lab.store.txn([], [Put(vm.key, vm.to_json()), Put(volume.key, volume.to_json())])


async def test_a_member_reads_its_project_s_usage_over_a_period(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_intervals(lab, "team")
        member = await lab.member("team")
        answer = await member.get(
            "/v1/usage", params={"from": "2026-10-01", "to": "2026-10-01T03:00:00Z"}
        )
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["project"] == "team"
        assert report["vms"]["minutes"] == 90
        assert report["vms"]["flavors"] == [
            {"flavor": "small", "vcpus": 1, "memory_mb": 1024, "minutes": 90}
        ]
        assert report["volumes"]["gib_hours"] == 20  # open: 10 GiB from 01:00 to 03:00
        assert {line["resource"]: line["running"] for line in report["resources"]} == {
            "i-aaaaaaaaaa": False,
            "vol-aaaaaaaaaa": True,
        }


async def test_the_default_period_is_this_month_until_now(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        report = (await (await lab.admin()).get("/v1/usage")).json()
        start = datetime.fromisoformat(report["start"])
        end = datetime.fromisoformat(report["end"])
        assert (start.day, start.hour, start.minute) == (1, 0, 0)
        assert abs((end - datetime.now(UTC)).total_seconds()) < 60
        assert report["project"] == "default"


async def test_another_project_s_usage_is_not_found_for_a_member_but_not_for_an_admin(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_intervals(lab, "theirs")
        await lab.member("theirs")
        member = await lab.member("mine")
        refused = await member.get("/v1/usage", params={"project": "theirs"})
        assert refused.status_code == 404
        assert refused.json()["code"] == "not_found"
        admin = await lab.admin()
        seen = await admin.get("/v1/usage", params={"project": "theirs", "from": "2026-10-01"})
        assert seen.status_code == 200
        assert seen.json()["vms"]["minutes"] == 90


@pytest.mark.parametrize(
    "params",
    [
        {"from": "last tuesday"},
        {"to": "2026-02-30"},
        {"from": "2026-10-02", "to": "2026-10-01"},
        {"from": "now", "to": "now"},
    ],
)
async def test_a_bad_date_or_an_empty_period_is_an_invalid_input_with_a_hint(
    tmp_path: Path, params: dict[str, str]
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        answer = await (await lab.admin()).get("/v1/usage", params=params)
        assert answer.status_code == 422, answer.text
        body = answer.json()
        assert body["code"] == "invalid_input"
        assert body["hint"]


async def test_usage_needs_a_token(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        assert (await lab.client().get("/v1/usage")).status_code == 401
