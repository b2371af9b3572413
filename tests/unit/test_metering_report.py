"""The usage report's arithmetic: intervals clipped to the period, open intervals counted
up to now, VM-minutes per flavor, volume GiB-hours, floating-IP hours; and the dates a
user may write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nubes.metering.interval import MeteredFlavor, MeteredKind, UsageInterval
from nubes.metering.report import (
    InvalidPeriod,
    check_period,
    month_start,
    parse_moment,
    summarize,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SMALL = MeteredFlavor(name="small", vcpus=1, memory_mb=1024)
BIG = MeteredFlavor(name="big", vcpus=4, memory_mb=8192)


def vm(resource: str, flavor: MeteredFlavor, start: float, end: float | None) -> UsageInterval:
    """A VM interval from `start` to `end` minutes after T0 (None: still open)."""
    return UsageInterval(
        project="p",
        resource=resource,
        kind=MeteredKind.VM,
        opening=f"{int(start):016d}",
        flavor=flavor,
        started_at=T0 + timedelta(minutes=start),
        ended_at=None if end is None else T0 + timedelta(minutes=end),
    )


def held(
    kind: MeteredKind, start_h: float, end_h: float | None, size: int | None = None
) -> UsageInterval:
    return UsageInterval(
        project="p",
        resource="vol-aaaaaaaaaa" if kind is MeteredKind.VOLUME else "fip-aaaaaaaaaa",
        kind=kind,
        opening=f"{int(start_h):016d}",
        size_gb=size,
        started_at=T0 + timedelta(hours=start_h),
        ended_at=None if end_h is None else T0 + timedelta(hours=end_h),
    )


def test_vm_minutes_are_clipped_to_the_period_and_added_up_per_flavor() -> None:
    intervals = [
        vm("i-aaaaaaaaaa", SMALL, -30, 30),  # half before the period
        vm("i-aaaaaaaaaa", SMALL, 60, 90),
        vm("i-bbbbbbbbbb", BIG, 100, 200),  # half after it
        vm("i-cccccccccc", BIG, 300, 400),  # all after it
    ]
    report = summarize("p", intervals, T0, T0 + timedelta(minutes=150), T0 + timedelta(days=1))
    assert report.vms.minutes == 30 + 30 + 50
    by_flavor = {f.flavor: f.minutes for f in report.vms.flavors}
    assert by_flavor == {"small": 60, "big": 50}
    assert report.vms.vcpu_minutes == 60 * 1 + 50 * 4
    assert report.vms.memory_gib_minutes == 60 * 1 + 50 * 8
    lines = {line.resource: line for line in report.resources}
    assert set(lines) == {"i-aaaaaaaaaa", "i-bbbbbbbbbb"}
    assert lines["i-aaaaaaaaaa"].quantity == 60
    assert lines["i-aaaaaaaaaa"].seconds == 3600
    assert not lines["i-bbbbbbbbbb"].running


def test_an_open_interval_counts_up_to_now_when_now_is_before_the_end() -> None:
    now = T0 + timedelta(minutes=45)
    report = summarize("p", [vm("i-aaaaaaaaaa", SMALL, 15, None)], T0, T0 + timedelta(days=30), now)
    assert report.vms.minutes == 30
    assert report.resources[0].running


def test_an_open_interval_counts_up_to_the_end_of_a_past_period() -> None:
    now = T0 + timedelta(days=3)
    report = summarize("p", [vm("i-aaaaaaaaaa", SMALL, 15, None)], T0, T0 + timedelta(hours=1), now)
    assert report.vms.minutes == 45


def test_volume_gib_hours_follow_each_size_and_floating_ips_count_hours() -> None:
    intervals = [
        held(MeteredKind.VOLUME, 0, 2, size=10),  # resized after two hours
        held(MeteredKind.VOLUME, 2, None, size=20),
        held(MeteredKind.FLOATING_IP, 1, 4),
    ]
    report = summarize("p", intervals, T0, T0 + timedelta(hours=5), T0 + timedelta(hours=3))
    assert report.volumes.gib_hours == 10 * 2 + 20 * 1
    assert report.floating_ips.hours == 3  # closed: its end, not now, bounds it
    volume_lines = [line for line in report.resources if line.kind is MeteredKind.VOLUME]
    assert [(line.size_gb, line.quantity) for line in volume_lines] == [(10, 20), (20, 20)]


def test_nothing_in_the_period_gives_zeros_and_no_lines() -> None:
    report = summarize("p", [vm("i-aaaaaaaaaa", SMALL, -90, -30)], T0, T0 + timedelta(hours=1), T0)
    assert report.vms.minutes == 0
    assert report.resources == []


def test_dates_times_and_now_are_read_as_utc() -> None:
    now = datetime(2026, 11, 21, 10, 30, tzinfo=UTC)
    assert parse_moment("2026-11-01", now, "from") == T0
    assert parse_moment("2026-11-01T08:00:00Z", now, "from") == T0 + timedelta(hours=8)
    assert parse_moment("2026-11-01T08:00:00", now, "from") == T0 + timedelta(hours=8)
    assert parse_moment("2026-11-01T09:00:00+01:00", now, "from") == T0 + timedelta(hours=8)
    assert parse_moment("now", now, "to") == now
    assert month_start(now) == T0


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "", "1700000000"])
def test_a_moment_that_is_not_a_date_is_refused_with_a_hint(text: str) -> None:
    with pytest.raises(InvalidPeriod) as caught:
        parse_moment(text, T0, "from")
    assert caught.value.hint
    assert "2026-11-01" in caught.value.hint
    assert caught.value.http_status == 422


def test_a_period_must_start_before_it_ends() -> None:
    check_period(T0, T0 + timedelta(seconds=1))
    with pytest.raises(InvalidPeriod):
        check_period(T0, T0)
