"""The nubes exception family: one root, `NubesError`, and the errors users can cause.

Every error carries a stable machine-readable `code` (API error bodies and
`-o json` output use it), an HTTP status for the API, and a message that says
what was wrong and what to do. Bugs are not NubesErrors: they raise as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class NubesError(Exception):
    """Root of every error nubes reports to a user.

    `message` says what went wrong; `hint` says what to do about it.
    """

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    def to_dict(self) -> dict[str, str]:
        """The error as the JSON body the API and `-o json` return."""
        body = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return body


class ConfigError(NubesError):
    """The configuration file or an environment override is invalid."""

    code = "config_invalid"
    exit_code = 2


class InvalidInput(NubesError):
    """A request or argument is malformed."""

    code = "invalid_input"
    http_status = 400
    exit_code = 2


class InvalidId(InvalidInput):
    """A resource id does not have the form `<prefix>-` + 10 lowercase alphanumerics."""

    code = "invalid_id"


class NotFound(NubesError):
    """The resource does not exist (or belongs to another project)."""

    code = "not_found"
    http_status = 404


class Conflict(NubesError):
    """The request conflicts with the current state of a resource."""

    code = "conflict"
    http_status = 409


class Unauthorized(NubesError):
    """No credentials, or a token that is unknown, expired or revoked."""

    code = "unauthorized"
    http_status = 401


class Forbidden(NubesError):
    """The caller is known but its role may not do this (never used to hide a resource)."""

    code = "forbidden"
    http_status = 403


class QuotaExceeded(Conflict):
    """The request would take the project past its quota."""

    code = "quota_exceeded"


class CommandFailed(NubesError):
    """A host tool nubes ran exited with an error."""

    code = "command_failed"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        shown = " ".join(argv[:3]) + (" ..." if len(argv) > 3 else "")
        super().__init__(f"{shown} exited {returncode}: {stderr or '(no error output)'}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class ToolMissing(NubesError):
    """A host tool nubes needs is not installed."""

    code = "tool_missing"

    def __init__(self, tool: str) -> None:
        super().__init__(
            f"{tool} is not installed",
            hint="run scripts/setup, which installs everything nubes needs",
        )
        self.tool = tool


class StoreError(NubesError):
    """Root of the errors raised by the store."""

    code = "store_error"
    http_status = 503


class StoreUnavailable(StoreError):
    """The store cannot be reached or did not answer in time."""

    code = "store_unavailable"


class CompactedError(StoreError):
    """A watch asked for a revision the store has already compacted away.

    The watcher must list the current state again and watch from there.
    """

    code = "store_compacted"
    http_status = 410

    def __init__(self, requested_revision: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested_revision} has been compacted "
            f"(the oldest revision kept is {compact_revision})",
            hint="list the current state again and watch from its revision",
        )
        self.requested_revision = requested_revision
        self.compact_revision = compact_revision


class LeaseNotFound(StoreError):
    """A lease id is unknown: never granted, revoked, or expired."""

    code = "lease_not_found"
    http_status = 404

    def __init__(self, lease_id: int) -> None:
        super().__init__(
            f"lease {lease_id} does not exist or has expired",
            hint="grant a new lease and attach the keys to it again",
        )
        self.lease_id = lease_id


class ImageInvalid(InvalidInput):
    """An image file is not one nubes will run: wrong format, a backing file, bad size."""

    code = "image_invalid"
    http_status = 422


class QemuError(NubesError):
    """QEMU refused to start, or answered a QMP command with an error.

    The message carries QEMU's own words, so the user sees the real reason.
    """

    code = "qemu_error"
