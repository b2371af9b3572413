"""Resource ids in the seed format: a kind prefix, a dash, 10 lowercase alphanumerics.

`i-3k9x0q2mzp` is a VM, `vpc-...` a network, `subnet-...`, `port-...`, `vol-...`,
`img-...`, `sg-...`, `fip-...` likewise. Validation accepts nothing else.
"""

from __future__ import annotations

import re
import secrets
import string
from enum import StrEnum

from nubes.errors import InvalidId

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_SUFFIX_LENGTH = 10


class IdKind(StrEnum):
    """Kinds of resource that carry a generated id; the value is the id prefix."""

    VM = "i"
    NETWORK = "vpc"
    SUBNET = "subnet"
    PORT = "port"
    VOLUME = "vol"
    IMAGE = "img"
    SECURITY_GROUP = "sg"
    FLOATING_IP = "fip"


_ID_PATTERN = re.compile(
    r"(?P<prefix>{prefixes})-[a-z0-9]{{{length}}}".format(
        prefixes="|".join(re.escape(kind.value) for kind in IdKind),
        length=ID_SUFFIX_LENGTH,
    ),
    re.ASCII,
)


def new_id(kind: IdKind) -> str:
    """A fresh random id of `kind` (about 52 bits of randomness)."""
    suffix = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_SUFFIX_LENGTH))
    return f"{kind.value}-{suffix}"


def kind_of(value: str) -> IdKind:
    """The kind of a valid id.

    Raises:
        InvalidId: `value` is not an id of any kind.
    """
    match = _ID_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidId(
            f"{_shown(value)} is not a nubes id",
            hint=f"ids look like 'i-{'a' * ID_SUFFIX_LENGTH}': a prefix "
            f"({', '.join(kind.value for kind in IdKind)}), a dash and "
            f"{ID_SUFFIX_LENGTH} lowercase letters or digits",
        )
    return IdKind(match.group("prefix"))


def is_id(value: str, kind: IdKind) -> bool:
    """Whether `value` is a valid id of `kind` (for names found on disk or in keys)."""
    match = _ID_PATTERN.fullmatch(value) if isinstance(value, str) else None
    return match is not None and match.group("prefix") == kind.value


def validate_id(value: str, kind: IdKind) -> str:
    """Return `value` when it is a valid id of `kind`.

    Raises:
        InvalidId: `value` is malformed or is the id of another kind.
    """
    actual = kind_of(value)
    if actual is not kind:
        raise InvalidId(
            f"{_shown(value)} is a {actual.name.lower().replace('_', ' ')} id, "
            f"not a {kind.name.lower().replace('_', ' ')} id",
            hint=f"{kind.name.lower().replace('_', ' ')} ids start with '{kind.value}-'",
        )
    return value


def _shown(value: object) -> str:
    """`value` quoted for an error message, cut short so that no input floods a log."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
