"""What every request handler is given: the store, the settings, and who is calling.

Handlers declare `ctx: ContextDep` and `caller: CallerDep`; the app puts one
ApiContext in `app.state` when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from nubes.config import NubesConfig
from nubes.errors import Forbidden
from nubes.model.project import Role
from nubes.store.base import Store


@dataclass
class ApiContext:
    store: Store
    config: NubesConfig
    image_dir: Path
    # Hosts image imports may fetch from ("*" for any); empty: URL import is refused.
    import_allow: tuple[str, ...] = ()
    extras: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Caller:
    """The authenticated user and the project its token works in."""

    user: str
    role: Role
    project: str
    token_id: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def require_admin(self, what: str) -> None:
        """Raises Forbidden unless the caller is an admin."""
        if not self.is_admin:
            raise Forbidden(f"only an admin may {what}", hint="ask an admin of this cloud to do it")


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.nubes
    return ctx


CALLER_STATE = "nubes_caller"  # where the caller is left for the request's event (audit.py)


async def get_caller(request: Request) -> Caller:
    from nubes.api.auth import authenticate  # auth imports this module

    caller = await authenticate(get_context(request), request.headers.get("authorization"))
    setattr(request.state, CALLER_STATE, caller)
    return caller


ContextDep = Annotated[ApiContext, Depends(get_context)]
CallerDep = Annotated[Caller, Depends(get_caller)]
