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
- a ``taskiq worker`` whose ``--max-async-tasks`` is below a batch size warns at
  start, naming the flag (the worker counts buffered items as running tasks).
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

from taskiq import AsyncBroker, InMemoryBroker, TaskiqEvents, TaskiqState
from taskiq.cli.worker.args import WorkerArgs

from batchtask._batcher import Batcher, Eagerness, FlushReason, Observer, RunBatch
from batchtask._config import BatchConfig

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


def receiver_started(broker: AsyncBroker, max_buffered: int | None) -> None:
    """Note that a `BatchReceiver` serves `broker`.

    `max_buffered` is how many items it buffers without a slot, 0 if the
    worker has no task limit at all, None if it cannot lift the cap.
    """
    if max_buffered is None:
        _receiver_limits.pop(broker, None)
    else:
        _receiver_limits[broker] = max_buffered


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
    batch_size: int,
    batch_timeout: float,
) -> Batcher[V, R]:
    """Create a task's batcher for the running loop and list it there."""
    here = _here()
    batcher = Batcher(
        run,
        name=name,
        batch_size=batch_size,
        batch_timeout=batch_timeout,
        eagerness=here.eagerness,
        observer=_observers.get(broker),
    )
    here.members.append((broker, batcher))
    if broker in here.closed:
        batcher.close()
    return batcher


def close_all(loop: asyncio.AbstractEventLoop) -> None:
    """Flush every buffer on `loop` now and stop waiting for timers there."""
    here = _here(loop)
    here.closed.update(_watched_brokers.keys())
    for batcher in here.of():
        batcher.close()


def watch(broker: AsyncBroker, task_name: str, config: BatchConfig) -> None:
    """Hook a broker's worker start and stop once, however many tasks it has."""
    tasks = _watched_brokers.get(broker)
    if tasks is not None:
        tasks[task_name] = config
        return
    _watched_brokers[broker] = {task_name: config}
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, _make_startup(broker))
    broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, _make_shutdown(broker))


def _make_startup(broker: AsyncBroker) -> Callable[[TaskiqState], None]:
    def on_worker_startup(_: TaskiqState) -> None:
        here = _here()
        here.closed.discard(broker)
        for batcher in here.of(broker):
            batcher.open()
        if not broker.is_worker_process:
            return
        tasks = _watched_brokers.get(broker, {})
        sizes = {name: config.batch_size for name, config in tasks.items()}
        timeouts = {name: config.batch_timeout for name, config in tasks.items()}
        buffered = _receiver_limits.get(broker)
        for warning in (
            capped_batch_warning(sizes, sys.argv)
            if buffered is None
            else receiver_cap_warning(sizes, buffered),
            prefetch_warning(broker, sizes),
            redelivery_warning(broker, timeouts),
        ):
            if warning:
                logger.warning(warning)
        if threading.current_thread() is threading.main_thread():
            _chain_shutdown_signals(asyncio.get_running_loop())

    return on_worker_startup


def capped_batch_warning(sizes: dict[str, int], argv: list[str]) -> str | None:
    """Say which batch sizes ``taskiq worker --max-async-tasks`` makes unreachable.

    The worker counts every buffered item as a running task, so one worker
    process never holds more than ``--max-async-tasks`` items at once.
    """
    if not argv or argv[0] != "worker":
        return None  # not the taskiq worker command line
    try:
        limit = WorkerArgs.from_cli(argv[1:]).max_async_tasks
    except (SystemExit, Exception):  # argparse exits on what it cannot parse
        return None
    capped = _capped(sizes, limit)
    if capped is None:
        return None
    tasks, largest = capped
    return (
        f"batchtask: taskiq worker --max-async-tasks={limit} counts every buffered "
        f"item, so these batches can never fill up on this worker and will wait "
        f"batch_timeout each time: {tasks}. Fix: start the worker with "
        f"--receiver batchtask:BatchReceiver (lifts the cap), or with "
        f"--max-async-tasks {largest} or more (or lower batch_size)."
    )


def receiver_cap_warning(sizes: dict[str, int], max_buffered: int) -> str | None:
    """Say which batch sizes exceed what a `BatchReceiver` buffers without a slot."""
    capped = _capped(sizes, max_buffered)
    if capped is None:
        return None
    tasks, largest = capped
    return (
        f"batchtask: BatchReceiver(max_buffered={max_buffered}) holds at most "
        f"{max_buffered} buffered items per worker without a task slot, so these "
        f"batches may not fill up: {tasks}. Fix: --receiver_arg "
        f"max_buffered={largest} or more (or lower batch_size)."
    )


def prefetch_warning(broker: AsyncBroker, sizes: dict[str, int]) -> str | None:
    """Say which batch sizes the broker's own prefetch limit makes unreachable.

    taskiq-aio-pika's ``AioPikaBroker(qos=10)`` lets a worker hold at most
    `qos` unacknowledged messages, and a buffered item is unacknowledged
    until its batch ran.
    """
    qos = getattr(broker, "_qos", None)
    if type(broker).__name__ != "AioPikaBroker" or not isinstance(qos, int):
        return None
    capped = _capped(sizes, qos)
    if capped is None:
        return None
    tasks, largest = capped
    return (
        f"batchtask: AioPikaBroker(qos={qos}) lets this worker hold at most {qos} "
        f"unacknowledged messages, so these batches can never fill up and will "
        f"wait batch_timeout each time: {tasks}. Fix: AioPikaBroker(..., "
        f"qos={largest}) or more (or lower batch_size)."
    )


NATS_DEFAULT_ACK_WAIT = 30.0
"""Seconds: a NATS JetStream consumer's ``ack_wait`` when none is configured."""


def redelivery_warning(broker: AsyncBroker, timeouts: dict[str, float]) -> str | None:
    """Say which tasks buffer items longer than the broker waits for an ack.

    A Redis stream (``idle_timeout``) or a NATS JetStream consumer
    (``ack_wait``) hands a message that stays unacknowledged that long to
    another consumer; a buffered item stays unacknowledged for up to
    ``batch_timeout`` plus its call, so it would run twice.
    """
    window = _redelivery_window(broker)
    if window is None:
        return None
    seconds, setting = window
    late = {name: t for name, t in timeouts.items() if t >= seconds}
    if not late:
        return None
    tasks = ", ".join(
        f"{name} (batch_timeout={t:g})" for name, t in sorted(late.items())
    )
    return (
        f"batchtask: {setting} redelivers a message left unacknowledged for "
        f"{seconds:g} s, but these tasks may buffer an item that long before its "
        f"call even starts, so items would run twice: {tasks}. Fix: raise it well "
        f"above batch_timeout plus the longest call (or lower batch_timeout)."
    )


def _redelivery_window(broker: AsyncBroker) -> tuple[float, str] | None:
    """(seconds, setting name) after which the broker redelivers, if known."""
    kinds = {cls.__name__ for cls in type(broker).__mro__}
    if "RedisStreamBroker" in kinds:
        idle = getattr(broker, "idle_timeout", None)
        if isinstance(idle, (int, float)) and not isinstance(idle, bool):
            return idle / 1000, f"RedisStreamBroker(idle_timeout={idle:g})"
    if kinds & {"PullBasedJetStreamBroker", "PushBasedJetStreamBroker"}:
        config = getattr(broker, "consumer_config", None)
        ack_wait = getattr(config, "ack_wait", None) or NATS_DEFAULT_ACK_WAIT
        if isinstance(ack_wait, (int, float)):
            return float(ack_wait), f"the NATS consumer's ack_wait={ack_wait:g}"
    return None


def _capped(sizes: dict[str, int], limit: int) -> tuple[str, int] | None:
    """The tasks whose batch size exceeds a positive `limit`, and the largest."""
    capped = {name: size for name, size in sizes.items() if 0 < limit < size}
    if not capped:
        return None
    tasks = ", ".join(
        f"{name} (batch_size={size})" for name, size in sorted(capped.items())
    )
    return tasks, max(capped.values())


def _make_shutdown(broker: AsyncBroker) -> Callable[[TaskiqState], Any]:
    async def on_worker_shutdown(_: TaskiqState) -> None:
        here = _here()
        here.closed.add(broker)
        for batcher in here.of(broker):
            await batcher.drain()

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
    ``broker.wait_all()``), so their items are flushed and their results stored
    when it returns.
    """
    here = _here()
    here.eagerness.level += 1
    try:
        for batcher in here.of():
            batcher.flush(FlushReason.MANUAL)
        if isinstance(broker, InMemoryBroker):
            await broker.wait_all()
        for batcher in here.of():
            await batcher.wait_idle()
    finally:
        here.eagerness.level -= 1


def buffered_items(broker: AsyncBroker | None = None) -> int:
    """Items waiting in open batches on this event loop (of `broker`'s tasks)."""
    return sum(batcher.buffered for batcher in _here().of(broker))
