"""What a worker warns about when it starts: caps, prefetch, redelivery timers.

What a broker caps and when it redelivers is its adapter's to say
(`batchtask.brokers`).

Each check returns a warning naming the tasks concerned and the fix, or None.
`warnings` runs them all for one broker's batch tasks.
"""

from collections.abc import Iterator, Mapping

from taskiq import AsyncBroker
from taskiq.cli.worker.args import WorkerArgs

from batchtask._config import BatchConfig
from batchtask.brokers import BrokerAdapter, adapter_for

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
    adapter: BrokerAdapter | None = None,
) -> Iterator[str]:
    """Every warning for `broker`'s batch `tasks` on a worker started by `argv`.

    `max_buffered` is what a `BatchReceiver` buffers without a slot (0: no
    cap), None without one (then ``--max-async-tasks`` caps batches);
    `adapter` the broker's, as the worker's receiver asked for it.
    """
    sizes = {name: config.batch_size for name, config in tasks.items()}
    timeouts = {name: config.batch_timeout for name, config in tasks.items()}
    for warning in (
        capped_batch_warning(sizes, argv)
        if max_buffered is None
        else receiver_cap_warning(sizes, max_buffered),
        prefetch_warning(broker, sizes, adapter),
        redelivery_warning(broker, timeouts, adapter),
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


def prefetch_warning(
    broker: AsyncBroker,
    sizes: dict[str, int],
    adapter: BrokerAdapter | None = None,
) -> str | None:
    """Say which batch sizes the broker's own prefetch limit makes unreachable.

    A broker may cap the unacknowledged messages one worker holds (the
    adapter's `unacked_cap`: taskiq-aio-pika's ``AioPikaBroker(qos=10)``), and
    a buffered item is unacknowledged until its batch ran.
    """
    cap = (adapter or adapter_for(broker)).unacked_cap()
    if cap is None:
        return None
    capped = _capped(sizes, cap.limit)
    if capped is None:
        return None
    tasks, largest = capped
    return (
        f"batchtask: {cap.setting} lets this worker hold at most {cap.limit} "
        f"unacknowledged messages, so these batches can never fill up and will "
        f"wait batch_timeout each time: {tasks}. Fix: "
        f"{cap.fix.format(n=largest)} or more (or lower batch_size)."
    )


def redelivery_warning(
    broker: AsyncBroker,
    timeouts: dict[str, float],
    adapter: BrokerAdapter | None = None,
) -> str | None:
    """Say which tasks buffer items longer than the broker waits for an ack.

    A Redis stream (``idle_timeout``) or a NATS JetStream consumer
    (``ack_wait``) hands a message that stays unacknowledged that long to
    another consumer (the adapter's `redelivery_window`); a buffered item
    stays unacknowledged for up to ``batch_timeout`` plus its call, so it
    would run twice.
    """
    window = (adapter or adapter_for(broker)).redelivery_window()
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


def _capped(sizes: dict[str, int], limit: int) -> tuple[str, int] | None:
    """The tasks whose batch size exceeds a positive `limit`, and the largest."""
    capped = {name: size for name, size in sizes.items() if 0 < limit < size}
    if not capped:
        return None
    tasks = ", ".join(
        f"{name} (batch_size={size})" for name, size in sorted(capped.items())
    )
    return tasks, max(capped.values())
