"""Where batchers live, and how the worker's life reaches them.

Each batch task gets one `Batcher` per event loop, created on its first
message and listed here under that loop with the task's broker, so that:

- a graceful worker shutdown flushes every buffer at once. The worker's
  SIGINT/SIGTERM/SIGHUP handlers (installed by ``taskiq worker``) are chained
  at ``WORKER_STARTUP``: on the signal, taskiq's own handler runs as before and
  every batcher on the worker's loop is closed, so buffered items run now
  instead of after ``batch_timeout``. ``WORKER_SHUTDOWN`` drains whatever is
  left;
- `flush_all` can run everything buffered right away, for tests;
- a worker's start runs the start-up checks (`batchtask._checks`) and, on a
  worker without `BatchReceiver`, groups its batches' result writes
  (`batchtask._grouping.install_on_stock_worker`).
"""

import asyncio
import logging
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

from batchtask import _checks, _grouping, _notices, _retries
from batchtask._batcher import (
    Batcher,
    Eagerness,
    FlushReason,
    Limits,
    Observer,
    RunBatch,
)
from batchtask._config import BatchConfig
from batchtask.brokers import Options, adapter_for
from batchtask.brokers._base import DEFAULTS

logger = logging.getLogger("batchtask")

V = TypeVar("V")
R = TypeVar("R")

_SHUTDOWN_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP")
    if hasattr(signal, name)
)


@dataclass(eq=False)
class _LoopBatchers:
    """The batchers living on one event loop, with the broker of each."""

    eagerness: Eagerness = field(default_factory=Eagerness)
    members: list[tuple[AsyncBroker, Batcher[Any, Any]]] = field(
        default_factory=lambda: []
    )
    closed: "weakref.WeakSet[AsyncBroker]" = field(
        default_factory=lambda: weakref.WeakSet[AsyncBroker]()
    )
    """Brokers whose worker is shutting down on this loop."""
    callers: "weakref.WeakSet[asyncio.Task[Any]]" = field(
        default_factory=lambda: weakref.WeakSet[asyncio.Task[Any]]()
    )
    """Tasks running an entry point (taskiq's message tasks) on this loop."""
    holds: "set[asyncio.Future[bool]]" = field(default_factory=lambda: set())
    """Entry points holding a retried item until its time (`hold`)."""

    def release_holds(self) -> None:
        """End every hold now: the worker is shutting down."""
        for held in self.holds:
            if not held.done():
                held.set_result(False)

    def of(self, broker: AsyncBroker | None = None) -> list[Batcher[Any, Any]]:
        return [b for owner, b in self.members if broker is None or owner is broker]


_loops: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBatchers]" = (
    weakref.WeakKeyDictionary()
)
_watched_brokers: "weakref.WeakKeyDictionary[AsyncBroker, dict[str, BatchConfig]]" = (
    weakref.WeakKeyDictionary()
)
"""Brokers whose worker start and stop are hooked, with each batch task's settings."""
_chained_signals: set[int] = set()
_observers: "weakref.WeakKeyDictionary[AsyncBroker, Observer]" = (
    weakref.WeakKeyDictionary()
)
"""Where each broker's batch tasks report (`batchtask.metrics`)."""
_receiver_limits: "weakref.WeakKeyDictionary[AsyncBroker, int]" = (
    weakref.WeakKeyDictionary()
)
"""Brokers served by a `BatchReceiver`: items it buffers without a slot (0: no cap)."""
_native_brokers: "weakref.WeakSet[AsyncBroker]" = weakref.WeakSet()
"""Brokers whose batch tasks take a `BatchReceiver`'s batch-native path."""
_receiver_options: "weakref.WeakKeyDictionary[AsyncBroker, Options]" = (
    weakref.WeakKeyDictionary()
)
"""What each broker's `BatchReceiver` asked of its adapter (an idle time)."""


def receiver_started(
    broker: AsyncBroker,
    max_buffered: int | None,
    *,
    native: bool,
    options: Options = DEFAULTS,
) -> None:
    """Note that a `BatchReceiver` serves `broker`.

    `max_buffered` is how many items it buffers without a slot, 0 if the
    worker has no task limit at all, None if it cannot lift the cap; `native`
    whether batch tasks take its batch-native path; `options` what it asked
    of the broker's adapter (the start-up checks ask the same).
    """
    _receiver_options[broker] = options
    if max_buffered is None:
        _receiver_limits.pop(broker, None)
    else:
        _receiver_limits[broker] = max_buffered
    if native:
        _native_brokers.add(broker)
    else:
        _native_brokers.discard(broker)


def observe(broker: AsyncBroker, observer: Observer) -> None:
    """Report the batches of `broker`'s tasks to `observer` from now on."""
    _observers[broker] = observer


def observer_of(broker: AsyncBroker) -> Observer | None:
    """The observer `broker`'s batch tasks report to, if any."""
    return _observers.get(broker)


def _here(loop: asyncio.AbstractEventLoop | None = None) -> _LoopBatchers:
    loop = loop or asyncio.get_running_loop()
    found = _loops.get(loop)
    if found is None:
        # Each entry's batchers refer to their loop, so the weak keys alone
        # never let a loop go: drop the entries of closed loops here, when a
        # new loop arrives (every asyncio.run(), every test's loop).
        for closed in [known for known in _loops if known.is_closed()]:
            del _loops[closed]
        found = _loops[loop] = _LoopBatchers()
    return found


def new_batcher(
    broker: AsyncBroker,
    run: RunBatch[V, R],
    *,
    name: str,
    limits: Limits,
) -> Batcher[V, R]:
    """Create a task's batcher for the running loop and list it there."""
    here = _here()
    batcher = Batcher(
        run,
        name=name,
        limits=limits,
        eagerness=here.eagerness,
        observer=_observers.get(broker),
    )
    here.members.append((broker, batcher))
    if broker in here.closed:
        batcher.close()
    return batcher


def note_caller() -> None:
    """Note the running task as one that runs an entry point (see shutdown)."""
    task = asyncio.current_task()
    if task is not None:
        _here().callers.add(task)


def close_all(loop: asyncio.AbstractEventLoop) -> None:
    """Flush every buffer on `loop` now and stop waiting for timers there."""
    here = _here(loop)
    here.closed.update(_watched_brokers.keys())
    here.release_holds()
    for batcher in here.of():
        batcher.close()


async def hold(broker: AsyncBroker, seconds: float) -> bool:
    """Wait `seconds` outside every batch; False if the worker shuts down first."""
    here = _here()
    if broker in here.closed:
        return False
    loop = asyncio.get_running_loop()
    held: asyncio.Future[bool] = loop.create_future()
    timer = loop.call_later(seconds, _end_hold, held)
    here.holds.add(held)
    try:
        return await held
    finally:
        timer.cancel()
        here.holds.discard(held)


def _end_hold(held: "asyncio.Future[bool]") -> None:
    if not held.done():
        held.set_result(True)


def watch(broker: AsyncBroker, task_name: str, config: BatchConfig) -> None:
    """Hook a broker's worker start and stop once, however many tasks it has."""
    tasks = _watched_brokers.get(broker)
    if tasks is not None:
        tasks[task_name] = config
        return
    _watched_brokers[broker] = {task_name: config}
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, _make_startup(broker))
    broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, _make_shutdown(broker))


def batch_tasks(broker: AsyncBroker) -> dict[str, BatchConfig]:
    """Each batch task registered on `broker`, with its settings."""
    return dict(_watched_brokers.get(broker, {}))


def start_report(broker: AsyncBroker, argv: list[str]) -> tuple[list[str], str | None]:
    """What a worker started by `argv` logs at start for `broker`'s batch tasks.

    Its warnings, and the stock receiver's note unless batch tasks take a
    `BatchReceiver`'s batch-native path (None then). ``python -m batchtask
    check`` reports the same.
    """
    found = list(
        _checks.warnings(
            broker,
            batch_tasks(broker),
            argv,
            _receiver_limits.get(broker),
            adapter_for(broker, _receiver_options.get(broker, DEFAULTS)),
        )
    )
    note = None if broker in _native_brokers else _checks.STOCK_RECEIVER_NOTE
    return found, note


def _make_startup(broker: AsyncBroker) -> Callable[[TaskiqState], None]:
    def on_worker_startup(_: TaskiqState) -> None:
        here = _here()
        here.closed.discard(broker)
        for batcher in here.of(broker):
            batcher.open()
        if not broker.is_worker_process:
            return
        _notices.start(broker)
        warnings, note = start_report(broker, sys.argv)
        for warning in warnings:
            logger.warning(warning)
        if note is not None:
            logger.info(note)
            _grouping.install_on_stock_worker(broker)
        if threading.current_thread() is threading.main_thread():
            _chain_shutdown_signals(asyncio.get_running_loop())

    return on_worker_startup


SHUTDOWN_WAIT = 30.0
"""Seconds a worker's shutdown waits for message tasks whose batch ran."""


def _make_shutdown(broker: AsyncBroker) -> Callable[[TaskiqState], Any]:
    async def on_worker_shutdown(_: TaskiqState) -> None:
        here = _here()
        here.closed.add(broker)
        here.release_holds()
        await _notices.stop(broker)
        for batcher in here.of(broker):
            await batcher.drain()
        # A receiver that stopped on an error left its message tasks behind:
        # let those whose batch just ran store their results and ack before
        # the broker and its result backend close (bounded).
        current = asyncio.current_task()
        waiting = {task for task in here.callers if not task.done()} - {current}
        if waiting:
            await asyncio.wait(waiting, timeout=SHUTDOWN_WAIT)

    return on_worker_shutdown


def _chain_shutdown_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Make the worker's shutdown signals also close this loop's batchers."""
    for signum in _SHUTDOWN_SIGNALS:
        if signum in _chained_signals:
            continue
        previous = signal.getsignal(signum)
        if not callable(previous):
            # No Python handler to keep: the signal keeps its default meaning.
            continue

        def handler(
            signum: int,
            frame: FrameType | None,
            previous: Callable[[int, FrameType | None], Any] = previous,
        ) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(close_all, loop)
            previous(signum, frame)

        signal.signal(signum, handler)
        _chained_signals.add(signum)


async def flush_all(broker: AsyncBroker | None = None) -> None:
    """Run every buffered batch now and wait until those calls have finished.

    Meant for tests: instead of waiting ``batch_timeout`` for partly filled
    batches, ``await flush_all(broker)`` after kicking. While it runs, batches
    are called on the next loop turn instead of waiting for their timer. With
    an `InMemoryBroker` it also waits for every message already kicked (like
    ``broker.wait_all()``: the adapter's ``wait_kicked``), so their items are
    flushed and their results stored when it returns.
    """
    here = _here()
    here.eagerness.level += 1
    try:
        for batcher in here.of():
            batcher.flush(FlushReason.MANUAL)
        if broker is not None:
            await adapter_for(broker).wait_kicked()
        for batcher in here.of():
            await batcher.wait_idle()
        await _retries.wait_sent()
    finally:
        here.eagerness.level -= 1


def buffered_items(broker: AsyncBroker | None = None) -> int:
    """Items waiting in open batches on this event loop (of `broker`'s tasks)."""
    return sum(batcher.buffered for batcher in _here().of(broker))
