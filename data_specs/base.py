"""Validation helpers shared by every schema: errors that name the field and the sample key."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Spec(BaseModel):
    """Base of every schema: unknown fields are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class SpecError(ValueError):
    """A record does not match its schema.

    Attributes:
        schema: name of the schema that rejected the record.
        key: the sample key the record belongs to, when known.
        url: the shard the record came from, when known.
        problems: one ``(field path, message)`` pair per problem found.
    """

    def __init__(self, schema: str, problems: list[tuple[str, str]], key: str | None = None,
                 url: str | None = None):
        self.schema, self.problems, self.key, self.url = schema, problems, key, url
        where = " ".join(p for p in (f"shard {url}" if url else "", f"key {key!r}" if key else "") if p)
        lines = "; ".join(f"field '{f}': {m}" for f, m in problems)
        super().__init__(f"{schema}{' (' + where + ')' if where else ''}: {lines}")


def validate(model: type[M], data: Any, *, key: str | None = None, url: str | None = None) -> M:
    """Validates ``data`` (a dict or a JSON string/bytes) against ``model``.

    Args:
        model: the schema class.
        data: a mapping, or JSON text.
        key: the sample key, quoted in the error.
        url: the shard URL, quoted in the error.

    Returns:
        The validated model instance.

    Raises:
        SpecError: naming every bad field (all problems collected, raised once).
    """
    try:
        if isinstance(data, (str, bytes, bytearray)):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "<root>", e["msg"]) for e in exc.errors()]
        raise SpecError(model.__name__, problems, key=key, url=url) from None
