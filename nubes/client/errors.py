"""What the SDK raises: the API's own errors (with its stable code), and the client's.

Every class is a NubesError, so the CLI prints them like any other user error.
"""

from __future__ import annotations

from typing import Any

from nubes.errors import NubesError

# Statuses that mean "the request itself is wrong": the CLI exits 2 for them, as for bad flags.
INPUT_STATUSES = frozenset({400, 413, 422})


class ApiError(NubesError):
    """The API answered with an error body `{"code", "message", "hint"?}`.

    `code` is the API's stable code (`not_found`, `quota_exceeded`, ...), `status` the
    HTTP status; `exit_code` is 2 for malformed input and 1 otherwise.
    """

    def __init__(self, status: int, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        # The class-level code/http_status/exit_code of NubesError are per class; an
        # ApiError carries the server's, so they are set on the instance.
        setattr(self, "code", code)  # noqa: B010
        setattr(self, "http_status", status)  # noqa: B010
        setattr(self, "exit_code", 2 if status in INPUT_STATUSES else 1)  # noqa: B010

    @classmethod
    def from_response(cls, status: int, body: Any, reason: str) -> ApiError:
        """The error an API response describes, even one whose body is not the usual JSON."""
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            hint = body.get("hint")
            return cls(
                status,
                body["code"],
                str(body.get("message") or reason),
                hint=hint if isinstance(hint, str) else None,
            )
        return cls(
            status,
            "http_error",
            f"the API answered {status} {reason} without an error body",
            hint="check that the URL points at a nubes API (`nubes login --url ...`)",
        )


class ApiUnreachable(NubesError):
    """Nothing answers at the API's URL (refused, unresolvable, timed out)."""

    code = "api_unreachable"

    def __init__(self, url: str, why: str) -> None:
        super().__init__(
            f"the nubes API at {url} is not answering ({why})",
            hint="start it with `nubes up`, or point at the right one with --url or NUBES_URL",
        )
        self.url = url


class NotLoggedIn(NubesError):
    """The client has no token for a call that needs one."""

    code = "not_logged_in"

    def __init__(self, url: str) -> None:
        super().__init__(
            f"no token for the nubes API at {url}",
            hint="log in with `nubes login`, or set NUBES_TOKEN",
        )


class WaitTimeout(NubesError):
    """A resource did not reach the state waited for in time."""

    code = "wait_timeout"


class ResourceFailed(NubesError):
    """A resource went to `error` while the client waited for another state."""

    code = "resource_failed"
