"""The event: as the API takes it (`EventIn`) and as the task stores it (`Event`)."""

from typing import Annotated
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, Field

TableName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
"""An event table's name: lower case, digits and ``_``, at most 32 characters."""


class Event(BaseModel):
    """One event, a row of its table."""

    id: UUID
    """The client's id for the event: a retried POST is stored once."""
    user_id: int
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    value: float
    at: AwareDatetime
    """When it happened, with a time zone."""


class EventIn(Event):
    """The body of ``POST /events``: an event and the table it goes to."""

    table: TableName

    def event(self) -> Event:
        """The event without its table (the table is the task's group key)."""
        return Event.model_validate(self.model_dump(exclude={"table"}))


class Accepted(BaseModel):
    """The answer to a POST: the task that stores the event."""

    task_id: str
