"""Buffers items per group key and runs one call per batch (pure asyncio).

One `Batcher` serves one batch task on one event loop. `submit` puts an item
in the open batch of its group key and returns an `Entry` whose future the
batch run resolves; its caller awaits that future and, if the wait is
cancelled, calls `withdraw`. `Limits` say when a batch is full, when it is
due and how many calls may run at once; `configure` changes them.

Invariants:

- An open batch holds 1 .. batch_size-1 live entries whose weights add up to
  less than ``max_weight``, or one entry heavier than that alone: the entry
  that fills it flushes it inside `submit`, an entry that would overfill it
  flushes it first and opens the next one, and an entry whose waiter is
  cancelled while it is still buffered leaves it (an emptied batch is
  dropped with its timer).
- An open batch has exactly one timer. It fires no later than
  ``batch_timeout`` seconds after the batch's first item (the hard bound,
  fixed when the batch opens) and flushes the batch then; with ``debounce``
  or ``adaptive`` it may fire earlier, flush the batch if it is due
  (``debounce`` seconds without a new item; the adaptive rule, see `Limits`)
  and otherwise re-arm itself for the next moment it could be due. Items
  joining never touch the timer.
- A flushed batch either runs or waits for a call slot (``max_calls`` for
  the batcher, ``max_calls_per_key`` per key) in its key's `_Turn`: the
  key's waiting batches in flush order. A key has a turn exactly while it
  has waiting batches, and ``waiting`` counts the batches of all turns.
- Turns rotate (fair turns): each turn holds a ticket, and a free slot goes
  to the oldest waiting batch of the ready turn with the lowest ticket. A
  key gets a new ticket, the highest so far, when its turn opens and each
  time one of its batches starts, so it goes to the back of the rotation.
  A turn whose key is at ``max_calls_per_key`` is parked: it keeps its
  ticket but is out of `_rotation` until one of the key's calls ends (or
  `configure` raises the limit), so it neither blocks other keys nor loses
  its place. `_rotation` is a heap holding one entry per ready turn, plus
  stale entries of turns that ended or moved on (skipped when popped).
  So with k keys waiting, every other key starts at most one batch before a
  key's oldest waiting batch starts: it is among the next k starts, unless
  its own key's limit parks it.
- A batch starts at its flush only when no turn waits and its slots are
  free; otherwise it joins its key's turn (and starts at once if that turn
  is next and a slot is free). Every flush, call end and `configure` starts
  what the free slots allow, so a batch waits only while some call runs (all
  slots taken, or its key at its limit). A waiting batch whose waiters were
  all cancelled is dropped (its turn ends when it was the last one); a
  running one is cancelled.
- A started batch runs in a task the batcher owns (kept in `_running`) until
  it ends; when that task ends, every entry's future is done: the run
  resolves them, and whatever it left unresolved fails with the run's error.
- After `close()` nothing waits for a timer: open batches are flushed at once
  and a batch opened later is flushed on the next turn of the event loop
  (items arriving in the same turn still share it). `open()` undoes `close()`.
- `wait_idle()` returns only when no batch is running or waiting; `drain()`
  closes, then waits, leaving nothing buffered, waiting or running behind.
"""

import asyncio
import contextvars
import enum
import heapq
import itertools
import logging
from collections import Counter, deque
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
    WEIGHT = "weight"
    """Its weights reached ``max_weight``, or the next item would exceed it."""
    TIMEOUT = "timeout"
    """``batch_timeout`` seconds passed since its first item."""
    DEBOUNCE = "debounce"
    """No item joined it for ``debounce`` seconds."""
    ADAPTIVE = "adaptive"
    """Its key's arrivals said waiting would not fill it (``adaptive=True``)."""
    SHUTDOWN = "shutdown"
    """The worker is shutting down gracefully."""
    MANUAL = "manual"
    """`batchtask.flush_all()` asked for it."""
    IMMEDIATE = "immediate"
    """Each message runs in place (``InMemoryBroker(await_inplace=True)``)."""
    RECONFIGURED = "reconfigured"
    """`reconfigure` lowered a limit the batch had reached."""


@dataclass(frozen=True, slots=True)
class Limits:
    """When a batch is full, when it is due, and how many calls run at once.

    The adaptive rule: a batch is due once it is filling too slowly to be
    full by its deadline, judged both by its own items (n items in e seconds
    since it opened, extrapolated) and by its key's arrivals over the last
    ``batch_timeout`` seconds; it waits while either says it will fill. So a
    lone item waits ``batch_timeout / batch_size`` seconds for company, and
    each item that joins buys that much more.
    """

    batch_size: int
    batch_timeout: float
    max_weight: float | None = None
    debounce: float | None = None
    adaptive: bool = False
    max_calls: int | None = None
    max_calls_per_key: int | None = None


class Observer(Protocol):
    """What batchers and batch runs report, for metrics (see `batchtask.metrics`)."""

    def submitted(self, task: str) -> None:
        """One item entered a buffer."""

    def withdrawn(self, task: str) -> None:
        """One buffered item left before its batch was called (cancelled)."""

    def flushed(self, task: str, reason: "FlushReason", size: int) -> None:
        """A batch of `size` items left the buffer to be called."""

    def queued(self, task: str, batches: int) -> None:
        """`batches` flushed batches of the task now wait for a call slot."""

    def waited(self, task: str, seconds: Sequence[float]) -> None:
        """Each item's wait from entering the buffer to its call's start."""

    def failed(self, task: str, items: int) -> None:
        """`items` items of one call ended with an error."""

    def expired(self, task: str, items: int) -> None:
        """`items` items were too old to pass (``max_item_age``)."""

    def deduplicated(self, task: str, items: int) -> None:
        """`items` items were folded into an equal one (``dedup_key``)."""

    def retried(self, task: str, items: int) -> None:
        """`items` items were sent again to be retried (``Retry``, ``max_attempts``)."""

    def dead_lettered(self, task: str, items: int) -> None:
        """`items` items failed for good and were sent to ``dead_letter``."""

    def called_group(self, task: str, group: str) -> None:
        """A call of the ``group_by`` key shown as `group` started."""


@dataclass(eq=False, slots=True)
class Entry(Generic[V, R]):
    """One buffered item and the future its batch run resolves."""

    value: V
    future: "asyncio.Future[R]"
    batch: "Batch[V, R]"
    weight: float = 0.0
    submitted: float = 0.0
    """Event-loop time it entered the buffer (kept only with an observer)."""


@dataclass(eq=False, slots=True)
class Batch(Generic[V, R]):
    """Items of one group key, called together."""

    key: Hashable
    opened_at: float
    """Event-loop time of the first item."""
    deadline: float
    """Event-loop time by which it is called (``batch_timeout`` after opening)."""
    context: contextvars.Context
    """The first item's context: the call runs in a copy of it."""
    limits: Limits
    """The limits it opened under (its timing follows them)."""
    entries: "list[Entry[V, R]]" = field(default_factory=lambda: [])
    weight: float = 0.0
    """The sum of its live entries' weights."""
    last_joined: float = 0.0
    """Event-loop time of the latest item."""
    timer: asyncio.TimerHandle | asyncio.Handle | None = None
    reason: FlushReason | None = None
    """Why it was flushed; None while it is open."""
    task: "asyncio.Task[None] | None" = None
    abandoned: int = 0
    """Entries whose waiter was cancelled after the flush."""


RunBatch = Callable[[Batch[V, R]], Awaitable[None]]


@dataclass(eq=False, slots=True)
class _Turn(Generic[V, R]):
    """One key's place in the rotation for call slots, and its waiting batches."""

    ticket: int
    """Its place in the rotation: the lowest ticket among ready turns goes next."""
    batches: "deque[Batch[V, R]]" = field(default_factory=lambda: deque())
    """Flushed batches of the key waiting for a call slot, in flush order."""
    parked: bool = False
    """Its key is at ``max_calls_per_key``: out of the rotation until a call ends."""


@dataclass(slots=True)
class Eagerness:
    """Shared by the batchers of one loop to skip timers while tests flush.

    While `level` > 0, new batches are flushed on the next loop turn instead
    of waiting for their timer.
    """

    level: int = 0


_EARLY = 0.001
"""A timer firing this close before a deadline counts as on time."""


class Batcher(Generic[V, R]):
    """Groups items by key; flushes when full or due, on close or request."""

    def __init__(
        self,
        run: RunBatch[V, R],
        *,
        name: str,
        limits: Limits,
        eagerness: Eagerness | None = None,
        observer: Observer | None = None,
    ) -> None:
        """Prepare an empty batcher on the running event loop.

        `run` is called once per started batch and must resolve the future of
        every entry whose future is not done yet.
        """
        self.name = name
        self.limits = limits
        self._run_batch = run
        self._loop = asyncio.get_running_loop()
        self._open: dict[Hashable, Batch[V, R]] = {}
        self._turns: dict[Hashable, _Turn[V, R]] = {}
        self._rotation: list[tuple[int, Hashable]] = []
        """A heap of (ticket, key) of the ready turns (and stale entries)."""
        self._tickets = itertools.count()
        self._waiting = 0
        """The batches of all turns."""
        self._running: set[asyncio.Task[None]] = set()
        self._calls_per_key: Counter[Hashable] = Counter()
        self._arrivals: dict[Hashable, deque[float]] = {}
        self._closed = False
        self._eagerness = eagerness or Eagerness()
        self._observer = observer

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop it serves."""
        return self._loop

    @property
    def buffered(self) -> int:
        """Items waiting in open batches."""
        return sum(len(batch.entries) for batch in self._open.values())

    @property
    def running(self) -> int:
        """Batches being called now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Flushed batches waiting for a call slot."""
        return self._waiting

    def submit(
        self,
        key: Hashable,
        value: V,
        *,
        weight: float = 0.0,
        flush_now: bool = False,
    ) -> Entry[V, R]:
        """Add one item to the open batch of `key`; flush it if it is full.

        `weight` counts against ``max_weight`` (a finite number >= 0).
        """
        limits = self.limits
        batch = self._open.get(key)
        if (
            batch is not None
            and limits.max_weight is not None
            and batch.weight + weight > limits.max_weight
        ):
            self._flush(batch, FlushReason.WEIGHT)
            batch = None
        if batch is None:
            batch = self._open_batch(key)
        entry: Entry[V, R] = Entry(value, self._loop.create_future(), batch, weight)
        if self._observer is not None:
            entry.submitted = self._loop.time()
            self._observer.submitted(self.name)
        batch.entries.append(entry)
        batch.weight += weight
        if batch.limits.debounce is not None or batch.limits.adaptive:
            now = batch.last_joined = self._loop.time()
            if batch.limits.adaptive:
                self._arrived(key, now)
        if flush_now:
            self._flush(batch, FlushReason.IMMEDIATE)
        else:
            reason = self._full(batch)
            if reason is not None:
                self._flush(batch, reason)
        return entry

    def withdraw(self, entry: Entry[V, R]) -> None:
        """After a wait on ``entry.future`` was cancelled: take it out of its batch."""
        if entry.future.cancelled():
            self._abandon(entry)

    def flush(self, reason: FlushReason) -> None:
        """Call every open batch now."""
        for batch in list(self._open.values()):
            self._flush(batch, reason)

    def configure(self, limits: Limits) -> None:
        """Use `limits` from now on.

        Size, weight and call limits apply at once (an open batch at or over
        a lowered one is flushed now); timing (``batch_timeout``,
        ``debounce``, ``adaptive``) applies to batches opened from now on.
        """
        self.limits = limits
        for key, turn in self._turns.items():
            turn.parked = self._at_key_limit(key)
        self._rebuild_rotation()
        for batch in list(self._open.values()):
            if self._full(batch) is not None:
                self._flush(batch, FlushReason.RECONFIGURED)
        self._start_waiting()

    def close(self) -> None:
        """Flush everything now and stop waiting for timers from here on."""
        self._closed = True
        self.flush(FlushReason.SHUTDOWN)

    def open(self) -> None:
        """Batch by size and timeout again after `close()`."""
        self._closed = False

    async def wait_idle(self) -> None:
        """Return when no batch is running or waiting (later ones included)."""
        while self._running:
            await asyncio.wait(set(self._running))

    async def drain(self) -> None:
        """Close, then wait until nothing is buffered, waiting or running."""
        self.close()
        await self.wait_idle()

    # -- open batches ----------------------------------------------------

    def _open_batch(self, key: Hashable) -> Batch[V, R]:
        loop = self._loop
        limits = self.limits
        now = loop.time()
        batch: Batch[V, R] = Batch(
            key,
            now,
            now + limits.batch_timeout,
            contextvars.copy_context(),
            limits,
        )
        if self._closed:
            batch.timer = loop.call_soon(self._on_timer, batch, FlushReason.SHUTDOWN)
        elif self._eagerness.level:
            batch.timer = loop.call_soon(self._on_timer, batch, FlushReason.MANUAL)
        else:
            batch.timer = loop.call_at(
                self._next_check(batch, now), self._on_timer, batch, None
            )
        self._open[key] = batch
        return batch

    def _full(self, batch: Batch[V, R]) -> FlushReason | None:
        limits = self.limits
        if len(batch.entries) >= limits.batch_size:
            return FlushReason.SIZE
        if limits.max_weight is not None and batch.weight >= limits.max_weight:
            return FlushReason.WEIGHT
        return None

    def _is_open(self, batch: Batch[V, R]) -> bool:
        return self._open.get(batch.key) is batch

    def _on_timer(self, batch: Batch[V, R], reason: FlushReason | None) -> None:
        if not self._is_open(batch):
            return
        if reason is None:
            now = self._loop.time()
            reason = self._due(batch, now)
            if reason is None:
                batch.timer = self._loop.call_at(
                    self._next_check(batch, now), self._on_timer, batch, None
                )
                return
        self._flush(batch, reason)

    def _due(self, batch: Batch[V, R], now: float) -> FlushReason | None:
        """Why `batch` is due at `now`, if it is."""
        now += _EARLY
        if now >= batch.deadline:
            return FlushReason.TIMEOUT
        debounce = batch.limits.debounce
        if debounce is not None and now >= batch.last_joined + debounce:
            return FlushReason.DEBOUNCE
        if batch.limits.adaptive and now >= self._adaptive_due(batch, now):
            return FlushReason.ADAPTIVE
        return None

    def _next_check(self, batch: Batch[V, R], now: float) -> float:
        """The earliest moment `batch` could be due, as far as is known now."""
        limits = batch.limits
        when = batch.deadline
        if limits.debounce is not None:
            when = min(when, max(batch.opened_at, batch.last_joined) + limits.debounce)
        if limits.adaptive:
            when = min(when, self._adaptive_due(batch, now))
        return when

    def _adaptive_due(self, batch: Batch[V, R], now: float) -> float:
        """When, at the rates measured until `now`, waiting stops paying off.

        Extrapolating the batch's own n items over its e seconds open, it
        fills by its deadline while e <= n * batch_timeout / batch_size. At
        the key's rate k (items per second over the last batch_timeout
        seconds) it fills while the time left is >= (batch_size - n) / k.
        """
        limits = batch.limits
        size = limits.batch_size
        n = max(len(batch.entries), 1)
        own = batch.opened_at + n * limits.batch_timeout / size
        arrivals = self._arrivals.get(batch.key)
        if not arrivals:
            return own
        _forget(arrivals, now - limits.batch_timeout)
        rate = len(arrivals) / limits.batch_timeout
        if rate <= 0:
            return own
        return max(own, batch.deadline - (size - n) / rate)

    def _arrived(self, key: Hashable, now: float) -> None:
        arrivals = self._arrivals.get(key)
        if arrivals is None:
            if len(self._arrivals) > 2 * len(self._open) + 64:
                self._forget_quiet_keys(now)
            arrivals = self._arrivals[key] = deque()
        arrivals.append(now)
        _forget(arrivals, now - self.limits.batch_timeout)

    def _forget_quiet_keys(self, now: float) -> None:
        since = now - self.limits.batch_timeout
        for key in [k for k, seen in self._arrivals.items() if seen[-1] < since]:
            del self._arrivals[key]

    # -- flushed batches -------------------------------------------------

    def _flush(self, batch: Batch[V, R], reason: FlushReason) -> None:
        del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        batch.reason = reason
        if self._observer is not None:
            self._observer.flushed(self.name, reason, len(batch.entries))
        if self._turns or not self._has_slot(batch):
            self._wait_for_turn(batch)
            self._report_waiting()
            self._start_waiting()
        else:
            self._start(batch)

    def _has_slot(self, batch: Batch[V, R]) -> bool:
        return self._slot_free() and not self._at_key_limit(batch.key)

    def _slot_free(self) -> bool:
        max_calls = self.limits.max_calls
        return max_calls is None or len(self._running) < max_calls

    def _at_key_limit(self, key: Hashable) -> bool:
        per_key = self.limits.max_calls_per_key
        return per_key is not None and self._calls_per_key[key] >= per_key

    def _wait_for_turn(self, batch: Batch[V, R]) -> None:
        """Queue `batch` in its key's turn; a new turn joins the rotation's back."""
        turn = self._turns.get(batch.key)
        if turn is None:
            turn = self._turns[batch.key] = _Turn(next(self._tickets))
            self._take_place(batch.key, turn)
        turn.batches.append(batch)
        self._waiting += 1

    def _take_place(self, key: Hashable, turn: _Turn[V, R]) -> None:
        """Put `turn` in the rotation by its ticket, or park it at its key's limit."""
        turn.parked = self._at_key_limit(key)
        if not turn.parked:
            heapq.heappush(self._rotation, (turn.ticket, key))

    def _rebuild_rotation(self) -> None:
        """The rotation of the ready turns alone, without stale entries."""
        self._rotation = [
            (turn.ticket, key) for key, turn in self._turns.items() if not turn.parked
        ]
        heapq.heapify(self._rotation)

    def _start_waiting(self) -> None:
        """Start waiting batches while slots are free, taking turns by key."""
        started = False
        while self._rotation and self._slot_free():
            ticket, key = heapq.heappop(self._rotation)
            turn = self._turns.get(key)
            if turn is None or turn.ticket != ticket or turn.parked:
                continue  # stale: that turn ended or moved on
            batch = turn.batches.popleft()
            self._waiting -= 1
            if turn.batches:
                turn.ticket = next(self._tickets)
            else:
                del self._turns[key]
            self._start(batch)
            if turn.batches:
                self._take_place(key, turn)
            started = True
        if started:
            self._report_waiting()

    def _report_waiting(self) -> None:
        if self._observer is not None:
            self._observer.queued(self.name, self._waiting)

    def _start(self, batch: Batch[V, R]) -> None:
        task = self._loop.create_task(self._run(batch), context=batch.context)
        batch.task = task
        self._running.add(task)
        self._calls_per_key[batch.key] += 1

        def ended(task: "asyncio.Task[None]") -> None:
            self._running.discard(task)
            calls = self._calls_per_key
            calls[batch.key] -= 1
            if calls[batch.key] <= 0:
                del calls[batch.key]
            turn = self._turns.get(batch.key)
            if turn is not None and turn.parked:
                self._take_place(batch.key, turn)
            self._start_waiting()

        task.add_done_callback(ended)

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
            batch.weight -= entry.weight
            if self._observer is not None:
                self._observer.withdrawn(self.name)
            if not batch.entries:
                del self._open[batch.key]
                if batch.timer is not None:
                    batch.timer.cancel()
            return
        batch.abandoned += 1
        if batch.abandoned < len(batch.entries):
            return
        if batch.task is not None:
            batch.task.cancel()
            return
        turn = self._turns.get(batch.key)
        if turn is None or batch not in turn.batches:
            return
        turn.batches.remove(batch)
        self._waiting -= 1
        if not turn.batches:
            del self._turns[batch.key]  # its entry in the rotation goes stale
            if len(self._rotation) > 2 * len(self._turns) + 64:
                self._rebuild_rotation()
        self._report_waiting()


def _forget(arrivals: "deque[float]", before: float) -> None:
    """Drop arrival times earlier than `before` (they are in order)."""
    while arrivals and arrivals[0] < before:
        arrivals.popleft()
