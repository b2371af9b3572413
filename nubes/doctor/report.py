"""The result of one doctor check, and the summary line of a whole run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # nubes works, but not as well as it could (slow, or a fallback)
    FAIL = "fail"  # something nubes needs is missing or broken


@dataclass(frozen=True)
class Check:
    """What one check found on this host and, unless it is ok, how to fix it."""

    name: str
    status: Status
    found: str
    fix: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "status": self.status.value,
            "found": self.found,
            "fix": self.fix,
        }


def ok(name: str, found: str) -> Check:
    return Check(name, Status.OK, found)


def warn(name: str, found: str, fix: str) -> Check:
    return Check(name, Status.WARN, found, fix)


def fail(name: str, found: str, fix: str) -> Check:
    return Check(name, Status.FAIL, found, fix)


def passed(checks: Sequence[Check]) -> bool:
    """A run passes when nothing failed; warnings do not stop nubes from working."""
    return all(check.status is not Status.FAIL for check in checks)


def summary(checks: Sequence[Check]) -> str:
    """One line: the problems and warnings by name, or that everything passed."""
    failed = [check.name for check in checks if check.status is Status.FAIL]
    warned = [check.name for check in checks if check.status is Status.WARN]
    parts = []
    if failed:
        parts.append(f"{_count(len(failed), 'problem')}: {', '.join(failed)}")
    if warned:
        parts.append(f"{_count(len(warned), 'warning')}: {', '.join(warned)}")
    if not parts:
        return f"all {len(checks)} checks passed"
    return "; ".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
