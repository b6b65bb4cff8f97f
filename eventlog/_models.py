"""The stored event, and an event waiting to be published."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ._encoding import validate_topics, validate_type

ModelT = TypeVar("ModelT", bound=BaseModel)


class Event(BaseModel):
    """One immutable row of the log.

    `data` holds the decoded JSON value; `data_as` validates it into a pydantic
    model, which restores types such as ``Decimal`` and ``datetime`` exactly.
    """

    model_config = ConfigDict(frozen=True)

    id: int
    topics: tuple[str, ...]
    type: str
    data: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    occurred_at: dt.datetime

    def data_as(self, model: type[ModelT]) -> ModelT:
        """Validate `data` into `model`."""
        return model.model_validate(self.data)

    def to_json_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-ready dict, as the CLI and the web endpoint print it."""
        return {
            "id": self.id,
            "topics": list(self.topics),
            "type": self.type,
            "data": self.data,
            "metadata": self.metadata,
            "occurred_at": self.occurred_at.isoformat(),
        }


class NewEvent:
    """An event to publish, validated when it is created.

    Data is encoded when the event is written, so an invalid value raises
    `InvalidData` before any row is written.
    """

    __slots__ = ("topics", "type", "data", "metadata")

    def __init__(
        self,
        topics: str | Iterable[str],
        type: str,
        data: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.topics = validate_topics(topics)
        self.type = validate_type(type)
        self.data = {} if data is None else data
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"NewEvent(topics={self.topics!r}, type={self.type!r})"
