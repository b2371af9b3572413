"""What every record shares: strict pydantic models that round-trip through the store as JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from nubes.errors import InvalidInput
from nubes.store.base import JsonValue

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Model(BaseModel):
    """A strict record: unknown fields are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> JsonValue:
        """The record as the JSON document the store keeps."""
        document: JsonValue = self.model_dump(mode="json")
        return document

    @classmethod
    def from_json(cls, document: Any) -> Self:
        """Reads a record from the store.

        Raises:
            InvalidInput: the document does not describe a valid record; the
                message lists each field that is wrong.
        """
        try:
            return cls.model_validate(document)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or '(record)'}: {problem['msg']}"
                for problem in error.errors()
            )
            raise InvalidInput(f"invalid {cls.__name__} record: {problems}") from None


def now() -> datetime:
    """The current time, in UTC, as records store it."""
    return datetime.now(UTC)
