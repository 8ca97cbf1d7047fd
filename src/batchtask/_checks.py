"""What a worker warns about when it starts: caps, prefetch, redelivery timers.

Each check returns a warning naming the tasks concerned and the fix, or None.
`warnings` runs them all for one broker's batch tasks.
"""

from collections.abc import Iterator, Mapping

from taskiq import AsyncBroker
from taskiq.cli.worker.args import WorkerArgs

from batchtask._config import BatchConfig

STOCK_RECEIVER_NOTE = (
    "batchtask: batch tasks run on taskiq's own receiver here (one task per "
    "waiting item, batches capped by --max-async-tasks); start the worker with "
    "--receiver batchtask:BatchReceiver for the batch-native path (no task per "
    "item, the cap lifted, a batch's results and acks sent together)"
)
"""Logged once at the start of a worker without `BatchReceiver`."""


def warnings(
    broker: AsyncBroker,
    tasks: Mapping[str, BatchConfig],
    argv: list[str],
    max_buffered: int | None,
) -> Iterator[str]:
    """Every warning for `broker`'s batch `tasks` on a worker started by `argv`.

    `max_buffered` is what a `BatchReceiver` buffers without a slot (0: no
    cap), None without one (then ``--max-async-tasks`` caps batches).
    """
    sizes = {name: config.batch_size for name, config in tasks.items()}
    timeouts = {name: config.batch_timeout for name, config in tasks.items()}
    for warning in (
        capped_batch_warning(sizes, argv)
        if max_buffered is None
        else receiver_cap_warning(sizes, max_buffered),
        prefetch_warning(broker, sizes),
        redelivery_warning(broker, timeouts),
    ):
        if warning:
            yield warning


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
