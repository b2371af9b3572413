"""`nubes login|logout|whoami`, and the `project`, `user`, `token` and `totp` groups."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from nubes.cli.common import (
    OUTPUT,
    STATE,
    Ref,
    add_read_verbs,
    api,
    columns,
    reporting,
    say,
    show_many,
    show_one,
)
from nubes.cli.output import OutputFormat
from nubes.client import ApiError, Client
from nubes.client.base import PROJECT, USER
from nubes.client.session import forget_session, resolve_session, save_session
from nubes.errors import InvalidInput

project_app = typer.Typer(name="project", help="Projects and their quotas.", no_args_is_help=True)
user_app = typer.Typer(name="user", help="Users (admin).", no_args_is_help=True)
token_app = typer.Typer(name="token", help="Your bearer tokens.", no_args_is_help=True)
totp_app = typer.Typer(name="totp", help="Two-factor login (TOTP).", no_args_is_help=True)

PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from stdin (one line); no prompt."),
]


def read_password(from_stdin: bool, prompt: str = "password") -> str:
    """The password from stdin's first line, or typed at a prompt without echo.

    Raises:
        InvalidInput: stdin is empty.
    """
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise InvalidInput(
                "--password-stdin read no password", hint="pipe it in: `echo ... | nubes ...`"
            )
        return password
    return str(typer.prompt(prompt, hide_input=True))


def login(
    url: Annotated[
        str | None, typer.Option("--url", help="The API [default: saved or local].")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Your user name.")] = None,
    project: Annotated[
        str | None, typer.Option("--project", "-p", help="The project to work in.")
    ] = None,
    totp: Annotated[str | None, typer.Option("--totp", help="The current TOTP code.")] = None,
    password_stdin: PasswordStdin = False,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Log in and save the token for the next commands (file readable by you only)."""
    with reporting(output):
        session = resolve_session(url or STATE.url)
        name = user or session.user or typer.prompt("user")
        password = read_password(password_stdin)
        with Client(session.url) as client:
            client.login(name, password, project=project, totp=totp)
            answer = dict(client.last_login or {})
        path = save_session(
            session.url,
            str(answer.pop("token")),
            str(answer.get("user", name)),
            answer.get("project"),
            answer.get("expires_at"),
        )
        answer["url"] = session.url
        say(
            output,
            answer,
            f"logged in to {session.url} as {answer.get('user')} in project "
            f"{answer.get('project')} (until {answer.get('expires_at')}; saved in {path})",
        )


def logout(output: OUTPUT = OutputFormat.TEXT) -> None:
    """Revoke the saved token and forget it."""
    with api(output) as client:
        if client.token:
            try:
                client.logout()
            except ApiError as error:
                if error.status != 401:  # an expired or revoked token is logged out already
                    raise
        forgot = forget_session()
        say(output, {"logged_out": True}, "logged out" if forgot else "no saved session")


def whoami(output: OUTPUT = OutputFormat.TEXT) -> None:
    """Who the token in use belongs to, its project and when it expires."""
    with api(output) as client:
        me = client.whoami()
        me["url"] = client.url
        say(
            output,
            me,
            f"{me['user']} ({me['role']}) in project {me['project']} at {client.url}, "
            f"token {me['token_id']} until {me['expires_at']}",
        )


# -- projects ---------------------------------------------------------------------------

PROJECT_COLUMNS = columns("name", "description", ("vms", lambda r: r["quota"]["vms"]))
add_read_verbs(project_app, PROJECT, PROJECT_COLUMNS)
QUOTA_FIELDS = ("vms", "vcpus", "memory_mb", "volumes", "volume_gb", "floating_ips")


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(help="The project's name.")],
    description: Annotated[str, typer.Option("--description")] = "",
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a project (admin); quotas start at the defaults (`project set-quota` changes them)."""
    with api(output) as client:
        made = client.create(PROJECT, {"name": name, "description": description})
        say(output, made, f"made project {made['name']}")


@project_app.command("set-quota")
def project_set_quota(
    name: Ref,
    vms: Annotated[int | None, typer.Option("--vms")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb")] = None,
    volumes: Annotated[int | None, typer.Option("--volumes")] = None,
    volume_gb: Annotated[int | None, typer.Option("--volume-gb")] = None,
    floating_ips: Annotated[int | None, typer.Option("--floating-ips")] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Change a project's quota (admin); -1 means no limit, an absent option keeps the value."""
    quota = {
        "vms": vms,
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "volumes": volumes,
        "volume_gb": volume_gb,
        "floating_ips": floating_ips,
    }
    with api(output) as client:
        body = {"quota": {k: v for k, v in quota.items() if v is not None}}
        show_one("project", client.update(PROJECT, name, body), output)


@project_app.command("usage")
def project_usage(name: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
    """What a project holds against its quota."""
    with api(output) as client:
        answer = client.action(PROJECT, name, "usage", method="GET")
        if output is OutputFormat.JSON:
            show_one("usage", answer, output)
            return
        rows = [
            {"what": key, "used": answer["usage"][key], "quota": answer["quota"][key]}
            for key in QUOTA_FIELDS
        ]
        show_many(f"usage of {name}", rows, output, columns("what", "used", "quota"))


# -- users ------------------------------------------------------------------------------

add_read_verbs(user_app, USER, columns("name", "role", "projects", "totp"))


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    role: Annotated[str, typer.Option("--role", help="member or admin.")] = "member",
    projects: Annotated[
        list[str] | None, typer.Option("--project", "-p", help="A project (repeatable).")
    ] = None,
    password_stdin: PasswordStdin = False,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a user (admin) with a password read from stdin or typed without echo."""
    with api(output) as client:
        password = read_password(password_stdin, prompt=f"password for {name}")
        body = {"name": name, "password": password, "role": role, "projects": projects or []}
        made = client.create(USER, body)
        say(output, made, f"made user {made['name']} ({made['role']})")


@user_app.command("update")
def user_update(
    name: Ref,
    role: Annotated[str | None, typer.Option("--role", help="member or admin.")] = None,
    projects: Annotated[
        list[str] | None,
        typer.Option("--project", "-p", help="The projects (repeatable; replaces the list)."),
    ] = None,
    password: Annotated[
        bool, typer.Option("--password", help="Set a new password (prompted, or stdin).")
    ] = False,
    password_stdin: PasswordStdin = False,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Change a user's role, projects or password (admin)."""
    with api(output) as client:
        new_password = read_password(password_stdin) if password or password_stdin else None
        body = {"role": role, "projects": projects, "password": new_password}
        show_one("user", client.update(USER, name, body), output)


# -- tokens -----------------------------------------------------------------------------

TOKEN_COLUMNS = columns("id", "description", "expires_at", "current")


@token_app.command("list")
def token_list(output: OUTPUT = OutputFormat.TEXT) -> None:
    """Your live tokens."""
    with api(output) as client:
        show_many("tokens", client.list_tokens(), output, TOKEN_COLUMNS)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Revoke one of your tokens; it stops working at once."""
    with api(output) as client:
        client.revoke_token(token_id)
        say(output, {"id": token_id, "revoked": True}, f"revoked token {token_id}")


@token_app.command("create")
def token_create(
    description: Annotated[str, typer.Option("--description", help="What it is for.")] = "",
    ttl_hours: Annotated[
        float | None, typer.Option("--ttl-hours", help="Lifetime in hours.")
    ] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Mint another token for scripts (printed once: keep it)."""
    with api(output) as client:
        made = client.create_token(description, ttl_hours)
        say(output, made, str(made["token"]))


# -- TOTP -------------------------------------------------------------------------------


@totp_app.command("enable")
def totp_enable(output: OUTPUT = OutputFormat.TEXT) -> None:
    """Start two-factor login: prints a secret for your authenticator; confirm with a code."""
    with api(output) as client:
        setup = client.enable_totp()
        say(
            output,
            setup,
            f"secret: {setup['secret']}\nuri: {setup['uri']}\n"
            "then run `nubes totp confirm CODE` with the code your authenticator shows",
        )


@totp_app.command("confirm")
def totp_confirm(
    code: Annotated[str, typer.Argument(help="The 6-digit code.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Turn two-factor login on with a code from the new secret."""
    with api(output) as client:
        say(output, client.confirm_totp(code), "two-factor login is on")


@totp_app.command("disable")
def totp_disable(
    code: Annotated[str, typer.Argument(help="The current 6-digit code.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Turn two-factor login off, proven with a current code."""
    with api(output) as client:
        say(output, client.disable_totp(code), "two-factor login is off")
