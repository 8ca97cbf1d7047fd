"""Buffers items per group key and runs one call per batch (pure asyncio).

One `Batcher` serves one batch task on one event loop. `submit` puts an item
in the open batch of its group key and returns an `Entry` whose future the
batch run resolves; its caller awaits that future and, if the wait is
cancelled, calls `withdraw`.

Invariants:

- An open batch holds 1 .. batch_size-1 live entries: the entry that fills it
  flushes it inside `submit`, and an entry whose waiter is cancelled while it
  is still buffered leaves it (an emptied batch is dropped with its timer).
- An open batch has exactly one timer, armed by its first entry for
  ``batch_timeout`` seconds later and cancelled when the batch is flushed, so
  no item waits longer than ``batch_timeout`` for its call to start.
- A flushed batch runs in a task the batcher owns (kept in `_running`) until it
  ends; when that task ends, every entry's future is done: the run resolves
  them, and whatever it left unresolved fails with the run's error.
- A running batch whose waiters were all cancelled is cancelled too.
- After `close()` nothing waits for a timer: open batches are flushed at once
  and a batch opened later is flushed on the next turn of the event loop
  (items arriving in the same turn still share it). `open()` undoes `close()`.
- `wait_idle()` returns only when no batch is running; `drain()` closes,
  then waits, leaving nothing buffered or running behind.
"""

import asyncio
import contextvars
import enum
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger("batchtask")

V = TypeVar("V")
R = TypeVar("R")


class FlushReason(enum.Enum):
    """Why a batch was called."""

    SIZE = "size"
    """It reached ``batch_size`` items."""
    TIMEOUT = "timeout"
    """``batch_timeout`` seconds passed since its first item."""
    SHUTDOWN = "shutdown"
    """The worker is shutting down gracefully."""
    MANUAL = "manual"
    """`batchtask.flush_all()` asked for it."""
    IMMEDIATE = "immediate"
    """Each message runs in place (``InMemoryBroker(await_inplace=True)``)."""


class Observer(Protocol):
    """What a batcher reports, for metrics (see `batchtask.metrics`)."""

    def submitted(self, task: str) -> None:
        """One item entered a buffer."""

    def withdrawn(self, task: str) -> None:
        """One buffered item left before its batch was called (cancelled)."""

    def flushed(self, task: str, reason: "FlushReason", size: int) -> None:
        """A batch of `size` items left the buffer to be called."""

    def waited(self, task: str, seconds: Sequence[float]) -> None:
        """Each item's wait from entering the buffer to its call's start."""

    def failed(self, task: str, items: int) -> None:
        """`items` items of one call ended with an error."""


@dataclass(eq=False, slots=True)
class Entry(Generic[V, R]):
    """One buffered item and the future its batch run resolves."""

    value: V
    future: "asyncio.Future[R]"
    batch: "Batch[V, R]"
    submitted: float = 0.0
    """Event-loop time it entered the buffer (kept only with an observer)."""


@dataclass(eq=False, slots=True)
class Batch(Generic[V, R]):
    """Items of one group key, called together."""

    key: Hashable
    opened_at: float
    """Event-loop time of the first item."""
    context: contextvars.Context
    """The first item's context: the call runs in a copy of it."""
    entries: "list[Entry[V, R]]" = field(default_factory=lambda: [])
    timer: asyncio.Handle | None = None
    reason: FlushReason | None = None
    """Why it was flushed; None while it is open."""
    task: "asyncio.Task[None] | None" = None
    abandoned: int = 0
    """Entries whose waiter was cancelled after the flush."""


RunBatch = Callable[[Batch[V, R]], Awaitable[None]]


@dataclass(slots=True)
class Eagerness:
    """Shared by the batchers of one loop to skip timers while tests flush.

    While `level` > 0, new batches are flushed on the next loop turn instead
    of waiting for their timer.
    """

    level: int = 0


class Batcher(Generic[V, R]):
    """Groups items by key; flushes on size, timeout, close or request."""

    def __init__(
        self,
        run: RunBatch[V, R],
        *,
        name: str,
        batch_size: int,
        batch_timeout: float,
        eagerness: Eagerness | None = None,
        observer: Observer | None = None,
    ) -> None:
        """Prepare an empty batcher on the running event loop.

        `run` is called once per flushed batch and must resolve the future of
        every entry whose future is not done yet.
        """
        self.name = name
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self._run_batch = run
        self._loop = asyncio.get_running_loop()
        self._open: dict[Hashable, Batch[V, R]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._eagerness = eagerness or Eagerness()
        self._observer = observer

    @property
    def buffered(self) -> int:
        """Items waiting in open batches."""
        return sum(len(batch.entries) for batch in self._open.values())

    @property
    def running(self) -> int:
        """Batches being called now."""
        return len(self._running)

    def submit(
        self, key: Hashable, value: V, *, flush_now: bool = False
    ) -> Entry[V, R]:
        """Add one item to the open batch of `key`; flush it if it is full."""
        batch = self._open.get(key)
        if batch is None:
            batch = self._open_batch(key)
        entry: Entry[V, R] = Entry(value, self._loop.create_future(), batch)
        if self._observer is not None:
            entry.submitted = self._loop.time()
            self._observer.submitted(self.name)
        batch.entries.append(entry)
        if flush_now:
            self._flush(batch, FlushReason.IMMEDIATE)
        elif len(batch.entries) >= self.batch_size:
            self._flush(batch, FlushReason.SIZE)
        return entry

    def withdraw(self, entry: Entry[V, R]) -> None:
        """After a wait on ``entry.future`` was cancelled: take it out of its batch."""
        if entry.future.cancelled():
            self._abandon(entry)

    def flush(self, reason: FlushReason) -> None:
        """Call every open batch now."""
        for batch in list(self._open.values()):
            self._flush(batch, reason)

    def close(self) -> None:
        """Flush everything now and stop waiting for timers from here on."""
        self._closed = True
        self.flush(FlushReason.SHUTDOWN)

    def open(self) -> None:
        """Batch by size and timeout again after `close()`."""
        self._closed = False

    async def wait_idle(self) -> None:
        """Return when no batch is running (batches started meanwhile included)."""
        while self._running:
            await asyncio.wait(set(self._running))

    async def drain(self) -> None:
        """Close, then wait until nothing is buffered or running."""
        self.close()
        await self.wait_idle()

    def _open_batch(self, key: Hashable) -> Batch[V, R]:
        loop = self._loop
        batch: Batch[V, R] = Batch(key, loop.time(), contextvars.copy_context())
        if self._closed:
            batch.timer = loop.call_soon(self._on_timer, batch, FlushReason.SHUTDOWN)
        elif self._eagerness.level:
            batch.timer = loop.call_soon(self._on_timer, batch, FlushReason.MANUAL)
        else:
            batch.timer = loop.call_at(
                batch.opened_at + self.batch_timeout,
                self._on_timer,
                batch,
                FlushReason.TIMEOUT,
            )
        self._open[key] = batch
        return batch

    def _is_open(self, batch: Batch[V, R]) -> bool:
        return self._open.get(batch.key) is batch

    def _on_timer(self, batch: Batch[V, R], reason: FlushReason) -> None:
        if self._is_open(batch):
            self._flush(batch, reason)

    def _flush(self, batch: Batch[V, R], reason: FlushReason) -> None:
        del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        batch.reason = reason
        if self._observer is not None:
            self._observer.flushed(self.name, reason, len(batch.entries))
        task = self._loop.create_task(self._run(batch), context=batch.context)
        batch.task = task
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: Batch[V, R]) -> None:
        started = self._loop.time()
        if self._observer is not None:
            self._observer.waited(
                self.name, [started - entry.submitted for entry in batch.entries]
            )
        failure: BaseException | None = None
        try:
            await self._run_batch(batch)
        except asyncio.CancelledError:
            for entry in batch.entries:
                entry.future.cancel()
            raise
        except BaseException as exc:  # a fault of the run itself, not of user code
            logger.exception("batch task %s: running a batch failed", self.name)
            failure = exc
        for entry in batch.entries:
            if not entry.future.done():
                entry.future.set_exception(
                    failure
                    or RuntimeError(
                        f"batch task {self.name!r}: the batch ended without an "
                        "outcome for this item"
                    )
                )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "batch task %s: flushed %d item(s), key=%r, reason=%s, "
                "waited %.3fs, ran %.3fs",
                self.name,
                len(batch.entries),
                batch.key,
                batch.reason.value if batch.reason else None,
                started - batch.opened_at,
                self._loop.time() - started,
            )

    def _abandon(self, entry: Entry[V, R]) -> None:
        batch = entry.batch
        if self._is_open(batch):
            batch.entries.remove(entry)
            if self._observer is not None:
                self._observer.withdrawn(self.name)
            if not batch.entries:
                del self._open[batch.key]
                if batch.timer is not None:
                    batch.timer.cancel()
            return
        batch.abandoned += 1
        if batch.abandoned >= len(batch.entries) and batch.task is not None:
            batch.task.cancel()
