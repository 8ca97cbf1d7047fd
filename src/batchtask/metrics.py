"""Prometheus metrics for batch tasks, in the style of taskiq's own.

Add the middleware to the broker, next to taskiq's ``PrometheusMiddleware``
(which serves every metric of the worker's processes on its port)::

    from taskiq.middlewares.prometheus_middleware import PrometheusMiddleware
    from batchtask.metrics import BatchMetricsMiddleware

    broker = broker.with_middlewares(PrometheusMiddleware(), BatchMetricsMiddleware())

Metrics, each labelled ``task_name`` like taskiq's (names without a prefix,
as taskiq's ``received_tasks`` or ``execution_time``):

- ``batch_flushes{task_name, reason}`` (counter): batches called, by why:
  ``size``, ``weight`` (``max_weight``), ``timeout``, ``debounce``,
  ``adaptive``, ``shutdown``, ``manual`` (``flush_all``), ``immediate``
  (``InMemoryBroker(await_inplace=True)``), ``reconfigured`` (a lowered
  limit in ``reconfigure``);
- ``batch_size`` (histogram): items per call;
- ``batch_item_wait`` (histogram, seconds): from an item entering its buffer
  to the start of its call;
- ``batch_items_failed`` (counter): items whose outcome was an error
  (expired, retried and requeued items not included);
- ``batch_items_retried`` (counter): items sent again to be retried
  (``Retry``, ``max_attempts``);
- ``batch_items_dead_lettered`` (counter): items whose failure was final,
  sent to the task's ``dead_letter``;
- ``batch_group_calls{task_name, group}`` (counter): calls per ``group_by``
  key (its ``repr``, cut to 64 characters); past `MAX_GROUPS` keys of one
  task in a process, further keys count as ``group="other"``;
- ``batch_items_expired`` (counter): items older than ``max_item_age``,
  failed with ``ItemExpiredError`` instead of being passed;
- ``batch_items_deduplicated`` (counter): items folded into an item with an
  equal ``dedup_key`` in the same call;
- ``batch_calls_waiting`` (gauge): flushed batches waiting for a call slot
  (``max_concurrent_calls`` / ``max_concurrent_calls_per_key``);
- ``batch_items_buffered`` (gauge): items waiting in buffers now (summed
  over the worker's live processes).

Faults a `batchtask.BatchReceiver` worker survived (no ``task_name``: a
batch's writes and acks may span tasks), each a counter:

- ``batch_retries{what}``: messages whose result write (``what="write"``) or
  ack (``"ack"``) failed transiently and was sent again (once per retry);
- ``batch_given_up{what}``: messages whose write or ack still failed after
  every retry (the message is redelivered and runs again);
- ``batch_redelivered{outcome}``: redelivered copies recognised: ``joined``
  (the first copy was still held here; the copy's ack replaced its ack) or
  ``acked_unrun`` (the first copy had finished: acked without a call);
- ``batch_suspect_items``: items delivered again without a result, run in
  a smaller call alone in the process;
- ``batch_poison_items``: items that ended a call alone, failed with
  ``PoisonItemError``;
- ``batch_relistens``: times the broker's ``listen()`` failed on a fault and
  was started again.

Needs ``prometheus-client`` (``pip install batchtask[metrics]``). Metrics are
created when the middleware is, so create it after taskiq's
``PrometheusMiddleware`` (which points ``PROMETHEUS_MULTIPROC_DIR`` at its
directory) and before the worker receives messages.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from taskiq import AsyncBroker, TaskiqMiddleware

from batchtask import _lifecycle
from batchtask._batcher import FlushReason

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MAX_GROUPS = 100
"""The most ``group_by`` keys of one task labelled apart in one process."""

SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Bucket bounds of ``batch_size``."""
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Bucket bounds of ``batch_item_wait``, in seconds."""


class BatchMetricsMiddleware(TaskiqMiddleware):
    """Exports the batches of the broker's batch tasks as Prometheus metrics."""

    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        """Create the metrics in `registry` (prometheus_client's default)."""
        super().__init__()
        try:
            from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        except ImportError as exc:
            raise ImportError(
                "batchtask.metrics needs prometheus-client: "
                "pip install 'batchtask[metrics]'"
            ) from exc
        target = registry or REGISTRY
        self.flushes = Counter(
            "batch_flushes",
            "Batches called, by flush reason",
            ["task_name", "reason"],
            registry=target,
        )
        self.sizes = Histogram(
            "batch_size",
            "Items per batch call",
            ["task_name"],
            buckets=SIZE_BUCKETS,
            registry=target,
        )
        self.waits = Histogram(
            "batch_item_wait",
            "Seconds from an item entering its buffer to the start of its call",
            ["task_name"],
            buckets=WAIT_BUCKETS,
            registry=target,
        )
        self.failures = Counter(
            "batch_items_failed",
            "Items whose outcome was an error",
            ["task_name"],
            registry=target,
        )
        self.expired_items = Counter(
            "batch_items_expired",
            "Items older than max_item_age, not passed to the function",
            ["task_name"],
            registry=target,
        )
        self.deduplicated_items = Counter(
            "batch_items_deduplicated",
            "Items folded into an item with an equal dedup_key",
            ["task_name"],
            registry=target,
        )
        self.retried_items = Counter(
            "batch_items_retried",
            "Items sent again to be retried (Retry, max_attempts)",
            ["task_name"],
            registry=target,
        )
        self.dead_lettered_items = Counter(
            "batch_items_dead_lettered",
            "Items whose failure was final, sent to the dead-letter task",
            ["task_name"],
            registry=target,
        )
        self.group_calls = Counter(
            "batch_group_calls",
            "Calls per group_by key (bounded: see MAX_GROUPS)",
            ["task_name", "group"],
            registry=target,
        )
        self._groups: dict[str, set[str]] = {}
        self.calls_waiting = Gauge(
            "batch_calls_waiting",
            "Flushed batches waiting for a call slot",
            ["task_name"],
            multiprocess_mode="livesum",
            registry=target,
        )
        self.buffered = Gauge(
            "batch_items_buffered",
            "Items waiting in buffers now",
            ["task_name"],
            multiprocess_mode="livesum",
            registry=target,
        )

        self.retries = Counter(
            "batch_retries",
            "Result writes or acks sent again after a transient failure",
            ["what"],
            registry=target,
        )
        self.given_up = Counter(
            "batch_given_up",
            "Result writes or acks that failed after every retry",
            ["what"],
            registry=target,
        )
        self.redelivered = Counter(
            "batch_redelivered",
            "Redelivered copies recognised, by what became of them",
            ["outcome"],
            registry=target,
        )
        self.suspect_items = Counter(
            "batch_suspect_items",
            "Items delivered again without a result, run in a call alone",
            registry=target,
        )
        self.poison_items = Counter(
            "batch_poison_items",
            "Items that ended a call alone, failed with PoisonItemError",
            registry=target,
        )
        self.relistens = Counter(
            "batch_relistens",
            "Times the broker's listen() was started again after a fault",
            registry=target,
        )

    def set_broker(self, broker: AsyncBroker) -> None:
        """Called by taskiq when the middleware is added: observe `broker`."""
        super().set_broker(broker)
        _lifecycle.observe(broker, self)

    def submitted(self, task: str) -> None:
        """One item entered a buffer."""
        self.buffered.labels(task).inc()

    def withdrawn(self, task: str) -> None:
        """One buffered item left before its batch was called."""
        self.buffered.labels(task).dec()

    def flushed(self, task: str, reason: FlushReason, size: int) -> None:
        """A batch of `size` items left the buffer to be called."""
        self.buffered.labels(task).dec(size)
        self.flushes.labels(task, reason.value).inc()
        self.sizes.labels(task).observe(size)

    def waited(self, task: str, seconds: Sequence[float]) -> None:
        """Each item's wait from entering the buffer to its call's start."""
        histogram: Any = self.waits.labels(task)
        for value in seconds:
            histogram.observe(value)

    def failed(self, task: str, items: int) -> None:
        """`items` items of one call ended with an error."""
        self.failures.labels(task).inc(items)

    def queued(self, task: str, batches: int) -> None:
        """`batches` flushed batches of `task` now wait for a call slot."""
        self.calls_waiting.labels(task).set(batches)

    def expired(self, task: str, items: int) -> None:
        """`items` items were too old to pass."""
        self.expired_items.labels(task).inc(items)

    def deduplicated(self, task: str, items: int) -> None:
        """`items` items were folded into an equal one."""
        self.deduplicated_items.labels(task).inc(items)

    def retried(self, task: str, items: int) -> None:
        """`items` items were sent again to be retried."""
        self.retried_items.labels(task).inc(items)

    def dead_lettered(self, task: str, items: int) -> None:
        """`items` items were sent to the dead-letter task."""
        self.dead_lettered_items.labels(task).inc(items)

    def called_group(self, task: str, group: str) -> None:
        """A call of one ``group_by`` key started (keys beyond `MAX_GROUPS`: other)."""
        seen = self._groups.setdefault(task, set())
        if group not in seen:
            if len(seen) >= MAX_GROUPS:
                group = "other"
            else:
                seen.add(group)
        self.group_calls.labels(task, group).inc()

    def fault(self, event: str, count: int) -> None:
        """`count` messages (or listens) met a fault `event`.

        One of ``batchtask._faults.FAULT_EVENTS``.
        """
        what, _, stage = event.partition("_")
        if stage in ("retried", "given_up") and what in ("write", "ack"):
            counter = self.retries if stage == "retried" else self.given_up
            counter.labels(what).inc(count)
        elif event.startswith("redelivered_"):
            outcome = event.removeprefix("redelivered_")
            self.redelivered.labels(outcome).inc(count)
        elif event == "suspect":
            self.suspect_items.inc(count)
        elif event == "poison":
            self.poison_items.inc(count)
        elif event == "relisten":
            self.relistens.inc(count)
