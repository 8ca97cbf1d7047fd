"""The HTTP API: ``POST /events`` sends one task per event, nothing waits for it.

Run with ``uvicorn app.api:app`` (``examples/service/run`` starts it with the
worker).
"""

from collections import defaultdict
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, status
from pydantic import Field

from .broker import broker
from .models import Accepted, Event, EventIn
from .tasks import insert


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
    """Start the broker in the API process (the worker starts its own)."""
    if not broker.is_worker_process:
        await broker.startup()
    yield
    if not broker.is_worker_process:
        await broker.shutdown()


app = FastAPI(title="events", lifespan=lifespan)


@app.post("/events", status_code=status.HTTP_202_ACCEPTED)
async def post_event(event: EventIn) -> Accepted:
    """Queue one event for its table; the worker stores it with its batch."""
    task = await insert.kiq(event.event(), event.table)
    return Accepted(task_id=task.task_id)


@app.post("/events/batch", status_code=status.HTTP_202_ACCEPTED)
async def post_events(
    events: Annotated[list[EventIn], Field(max_length=10_000)],
) -> list[Accepted]:
    """Queue many events at once: one message each, sent in one round trip per table.

    The answer lists their tasks in the order of `events`.
    """
    by_table: defaultdict[str, list[tuple[int, Event]]] = defaultdict(list)
    for index, event in enumerate(events):
        by_table[event.table].append((index, event.event()))
    accepted: list[Accepted | None] = [None] * len(events)
    for table, indexed in by_table.items():
        tasks = await insert.kiq_many([event for _, event in indexed], table)
        for (index, _), task in zip(indexed, tasks, strict=True):
            accepted[index] = Accepted(task_id=task.task_id)
    return [answer for answer in accepted if answer is not None]


@app.get("/health")
async def health() -> dict[str, str]:
    """Whether the API is up (it does not check the worker)."""
    return {"status": "ok"}
