"""What batch calls tell a tracer: a note per message, a scope around each call.

The core knows nothing of OpenTelemetry; `batchtask.tracing` implements
`CallTracer`. Both paths take each item's note in its message's own context
(after every ``pre_execute``), as the item enters its batch: taskiq's path in
the message's asyncio task, the batch-native path in the message's copy of
the listener's context. Each call of the function (each bisect attempt too)
runs inside the tracer's scope for the items it gets.
"""

import asyncio
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from taskiq import AsyncBroker

from batchtask._batcher import Batch, FlushReason
from batchtask._signature import BoundItem


@dataclass(frozen=True, slots=True)
class CallInfo:
    """One call of a batch function, as a tracer sees it."""

    task_name: str
    key: str
    """The batch's group key: the extra arguments its items share, as a call
    shows them (``'events', upsert=True``), cut to `KEY_LENGTH` characters."""
    reason: FlushReason | None
    """Why the batch was flushed (None: no batcher, e.g. a retried item)."""
    waited: float
    """Seconds from the batch's first item entering its buffer to this call."""
    size: int
    """Items passed to this call."""
    batch_size: int
    """Items passed to the batch's first call (more than `size` when bisecting)."""
    attempt: int
    """1 for the batch's first call; bisecting counts on."""
    group: str | None = None
    """The batch's ``group_by`` key as shown (its ``repr``, cut); None without."""


class CallTracer(Protocol):
    """Follows batch calls (see `batchtask.tracing`)."""

    def note(self) -> object:
        """In one message's context, as its item enters a batch: what to link."""

    def call(
        self, info: CallInfo, notes: Sequence[object]
    ) -> AbstractContextManager[object]:
        """The scope one call of the function runs in; `notes` are its items'."""
        ...


KEY_LENGTH = 256
"""The longest group key a tracer is shown."""

Scope = Callable[[int, int, int], AbstractContextManager[object]]
"""The scope of one call on items[start:stop] as attempt number n: (start, stop, n)."""

_tracers: "weakref.WeakKeyDictionary[AsyncBroker, CallTracer]" = (
    weakref.WeakKeyDictionary()
)


def trace(broker: AsyncBroker, tracer: CallTracer) -> None:
    """Report the batch calls of `broker`'s tasks to `tracer` from now on."""
    _tracers[broker] = tracer


def tracer_of(broker: AsyncBroker) -> CallTracer | None:
    """The tracer `broker`'s batch calls report to, if any."""
    return _tracers.get(broker)


def scope(
    tracer: CallTracer | None,
    task_name: str,
    batch: Batch[Any, Any],
    leader: BoundItem,
    notes: Sequence[object],
    group: str | None = None,
) -> Scope | None:
    """The scope of each call of `batch` on the items whose `notes` are given.

    `leader` holds the call's extra arguments, `group` the shown ``group_by``
    key. None without a tracer.
    """
    if tracer is None:
        return None
    loop = asyncio.get_running_loop()
    size = len(notes)
    reason, opened_at = batch.reason, batch.opened_at
    shown = [repr(arg) for arg in leader.args]
    shown += [f"{name}={value!r}" for name, value in leader.kwargs.items()]
    key = ", ".join(shown)
    if len(key) > KEY_LENGTH:
        key = key[: KEY_LENGTH - 3] + "..."

    def around(start: int, stop: int, attempt: int) -> AbstractContextManager[object]:
        info = CallInfo(
            task_name,
            key,
            reason,
            max(0.0, loop.time() - opened_at),
            stop - start,
            size,
            attempt,
            group,
        )
        return tracer.call(info, notes[start:stop])

    return around
