"""The saved login: where the CLI finds the API and its token.

`--url`/NUBES_URL and NUBES_TOKEN come first, then the session file
`${XDG_CONFIG_HOME:-~/.config}/nubes/session.json` (mode 0600), then the default URL.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from nubes.client.http import normalize_url
from nubes.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8686"
URL_VARIABLE = "NUBES_URL"
TOKEN_VARIABLE = "NUBES_TOKEN"  # noqa: S105 - the name of a variable, not a secret


@dataclass(frozen=True)
class Session:
    """Who the CLI talks to and as whom. `token` is None before a login."""

    url: str
    token: str | None = None
    user: str | None = None
    project: str | None = None
    expires_at: str | None = None


def session_path(environ: Mapping[str, str] | None = None) -> Path:
    """`${XDG_CONFIG_HOME:-~/.config}/nubes/session.json`."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nubes" / "session.json"


def load_session(environ: Mapping[str, str] | None = None) -> Session | None:
    """The saved session, or None when there is none.

    Raises:
        ConfigError: the file exists but is unreadable or not a session.
    """
    path = session_path(environ)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"the session file {path} cannot be read: {error}",
            hint="log in again with `nubes login` (or remove the file)",
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("url"), str):
        raise ConfigError(
            f"the session file {path} is not a nubes session",
            hint="log in again with `nubes login` (or remove the file)",
        )
    fields = {name: document.get(name) for name in ("token", "user", "project", "expires_at")}
    return Session(
        url=document["url"], **{k: v if isinstance(v, str) else None for k, v in fields.items()}
    )


def save_session(
    url: str,
    token: str,
    user: str | None,
    project: str | None,
    expires_at: str | None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Writes the session file (directory 0700, file 0600, replaced atomically); returns its path.

    Raises:
        ConfigError: the file cannot be written.
    """
    path = session_path(environ)
    session = Session(normalize_url(url), token, user, project, expires_at)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp makes the file 0600 before a byte of the token is in it.
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".session-")
        try:
            with os.fdopen(descriptor, "w") as file:
                json.dump(asdict(session), file, indent=2)
                file.write("\n")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise ConfigError(
            f"cannot write the session file {path}: {error.strerror}",
            hint="check that XDG_CONFIG_HOME (or ~/.config) is writable",
        ) from None
    return path


def forget_session(environ: Mapping[str, str] | None = None) -> bool:
    """Removes the session file; True when there was one."""
    path = session_path(environ)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def resolve_session(url: str | None = None, environ: Mapping[str, str] | None = None) -> Session:
    """The API and token to use: `url` or NUBES_URL, NUBES_TOKEN, else the saved session.

    The saved token is only used for the URL it was issued by.

    Raises:
        ConfigError: the session file is unreadable.
    """
    environ = os.environ if environ is None else environ
    chosen = url or environ.get(URL_VARIABLE) or None
    saved = load_session(environ)
    token = environ.get(TOKEN_VARIABLE) or None
    if chosen is None:
        chosen = saved.url if saved else DEFAULT_URL
    chosen = normalize_url(chosen)
    if saved is not None and normalize_url(saved.url) == chosen:
        return Session(chosen, token or saved.token, saved.user, saved.project, saved.expires_at)
    return Session(chosen, token)
