"""The batch-native path against taskiq's own: every message sees the same.

Each scenario kicks the same messages (same task ids) into a fresh broker and
runs them once through taskiq's stock ``Receiver`` (batch tasks then ride the
entry point) and once through `BatchReceiver` (the batch-native path). A
recording middleware, result backend and ack log note, per task id, what
happened to the message in order: the hooks with the message each saw, the
result stored (value or error class and text), the ack. The two runs must
record the same sequence for every message. Where they differ, the stock one
is right.

The broker is an in-memory one whose messages are ackable, so that every ack
type can be observed without a server; ``tests/test_ack_types.py`` runs the
ack types on real brokers and workers.
"""

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
from pydantic import BaseModel
from taskiq import (
    AckableMessage,
    AsyncBroker,
    BrokerMessage,
    Context,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq.middlewares import SimpleRetryMiddleware
from taskiq.receiver import Receiver

from batchtask import (
    BatchContext,
    BatchReceiver,
    DeadLetter,
    PartialFailure,
    Retry,
    batch_task,
)
from batchtask._lifecycle import close_all
from tests.conftest import results_through, within

Log = dict[str, list[tuple[Any, ...]]]


def _error(error: BaseException | None) -> tuple[str, str] | None:
    return None if error is None else (type(error).__name__, str(error))


class Recorder(TaskiqMiddleware):
    """Notes each hook with what its message and result held."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def note(self, message: TaskiqMessage, *event: Any) -> None:
        self.log.setdefault(delivery(message.task_id, message.labels), []).append(event)

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self.note(message, "pre_execute", list(message.args), dict(message.kwargs))
        return message

    def on_error(
        self,
        message: TaskiqMessage,
        result: TaskiqResult[Any],
        exception: BaseException,
    ) -> None:
        self.note(message, "on_error", list(message.args), _error(exception))

    async def post_execute(
        self, message: TaskiqMessage, result: TaskiqResult[Any]
    ) -> None:
        await asyncio.sleep(0)  # an async hook among sync ones
        self.note(
            message,
            "post_execute",
            list(message.args),
            result.is_err,
            result.return_value,
            _error(result.error),
        )

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.note(message, "post_save", result.is_err)


class Rewriter(TaskiqMiddleware):
    """Rewrites every message before it runs: its item plus 1000."""

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        if message.args:
            message.args[0] = message.args[0] + 1000
        message.labels["rewritten"] = "yes"
        return message


class AsyncRewriter(Rewriter):
    """The same, from an async hook."""

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().pre_execute(message)


class RecordingBackend(InmemoryResultBackend[Any]):
    def __init__(self, log: Log) -> None:
        super().__init__(max_stored_results=-1)
        self.log = log

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        self.log.setdefault(delivery(task_id, result.labels), []).append(
            ("stored", result.is_err, result.return_value, _error(result.error))
        )
        await super().set_result(task_id, result)


class AckingBroker(AsyncBroker):
    """In memory, but every message is an `AckableMessage` whose ack is logged."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.kicked = 0

    async def kick(self, message: BrokerMessage) -> None:
        self.kicked += 1
        self.queue.put_nowait(message.message)

    async def listen(self) -> AsyncGenerator[bytes | AckableMessage, None]:
        deliveries: dict[str, int] = {}
        while True:
            message = json.loads(await self.queue.get())
            task_id = message["task_id"]
            deliveries[task_id] = deliveries.get(task_id, 0) + 1
            message["labels"]["delivery"] = str(deliveries[task_id])
            key = delivery(task_id, message["labels"])

            async def ack(key: str = key) -> None:
                await asyncio.sleep(0)
                self.log.setdefault(key, []).append(("ack",))

            # Compact, as taskiq's JSON formatter writes it.
            data = json.dumps(message, separators=(",", ":")).encode()
            yield AckableMessage(data=data, ack=ack)


def delivery(task_id: str, labels: dict[str, Any]) -> str:
    """A message's task id and which delivery of it this is."""
    return f"{task_id}#{labels.get('delivery')}"


@dataclass
class Scenario:
    """One way of using a batch task; `define` registers it on a broker."""

    name: str
    define: Callable[[AsyncBroker], Any]
    items: list[Any]
    kiq_labels: dict[int, dict[str, Any]] = field(default_factory=lambda: {})
    middlewares: Callable[[], list[TaskiqMiddleware]] = lambda: []
    ack_type: str | None = None
    expect_stored: int | None = None
    """Results that end the run (default: one per item)."""
    settle: float = 0.0
    """Seconds to wait after the last result (acks that follow it)."""
    shutdown: bool = False
    """Shut the worker down gracefully once every message was delivered."""
    extra: Callable[[Any], tuple[Any, ...]] = lambda item: ()
    """The extra arguments kicked with an item (its group key)."""
    backend: Callable[[Log], InmemoryResultBackend[Any]] = lambda log: RecordingBackend(
        log
    )


class Row(BaseModel):
    id: int


def shared(broker: AsyncBroker) -> Any:
    @batch_task(broker, batch_size=4, batch_timeout=0.05, task_name="t")
    async def save(items: list[int], table: str = "events") -> str:
        return f"saved into {table}"

    return save


def per_item(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def double(items: list[int]) -> list[int]:
        return [2 * item for item in items]

    return double


def sync_per_item(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    def double(items: list[int]) -> list[int]:
        return [2 * item for item in items]

    return double


def partial(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def fives_fail(items: list[int]) -> list[int]:
        bad = {
            i: ValueError(f"{v} ends in 5") for i, v in enumerate(items) if v % 5 == 0
        }
        if bad:
            raise PartialFailure(bad, results=[v + 1 for v in items])
        return [v + 1 for v in items]

    return fives_fail


def bisect(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=8,
        batch_timeout=0.05,
        results="per_item",
        bisect_on_error=True,
        task_name="t",
    )
    async def poisoned(items: list[int]) -> list[int]:
        if 7 in items:
            raise KeyError(f"poison among {len(items)}")
        return [-item for item in items]

    return poisoned


def failing(broker: AsyncBroker) -> Any:
    @batch_task(broker, batch_size=4, batch_timeout=0.05, task_name="t")
    async def always(items: list[int]) -> None:
        # Not the batch's size: how arrivals split into batches is timing.
        raise LookupError("no table")

    return always


def wrong_length(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    return short


def validated(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def ids(rows: list[Row], scale: int) -> list[int]:
        return [row.id * scale for row in rows]

    return ids


def with_context(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def seen(
        items: list[int], ctx: Annotated[Context, TaskiqDepends()]
    ) -> list[str]:
        return [f"{item}:{ctx.message.task_name}" for item in items]

    return seen


def manual_context_ack(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, ack_type="manual", task_name="t"
    )
    async def acks_all(items: list[int], ctx: Context = TaskiqDepends()) -> int:
        await ctx.ack()
        return len(items) * 0

    return acks_all


def manual_batch_context(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, ack_type="manual", task_name="t"
    )
    async def acks_even(items: list[int], ctx: BatchContext = TaskiqDepends()) -> None:
        assert [m.args[0] for m in ctx.messages] == items
        for index, item in enumerate(items):
            if item % 2 == 0:
                await ctx.ack_item(index)
            if item == 3:
                ctx.reject_item(index)

    return acks_even


def manual_batch_context_all(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, ack_type="manual", task_name="t"
    )
    async def acks(items: list[int], ctx: BatchContext = TaskiqDepends()) -> None:
        await ctx.ack()

    return acks


def manual_silent(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, ack_type="manual", task_name="t"
    )
    async def never_acks(items: list[int]) -> None:
        return None

    return never_acks


def requeues(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def once_more(
        items: list[int], ctx: BatchContext = TaskiqDepends()
    ) -> list[int]:
        for index, message in enumerate(ctx.messages):
            if items[index] == 2 and "X-Taskiq-requeue" not in message.labels:
                await ctx.requeue_item(index)
        return items

    return once_more


def slow(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=100, batch_timeout=0.6, results="per_item", task_name="t"
    )
    async def waits(items: list[int]) -> list[int]:
        return items

    return waits


def waits_long(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=100, batch_timeout=60, results="per_item", task_name="t"
    )
    async def waits(items: list[int]) -> list[int]:
        return items

    return waits


def retried(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.05,
        results="per_item",
        bisect_on_error=True,
        retry_on_error=True,
        max_retries=3,
        task_name="t",
    )
    async def flaky(items: list[int]) -> list[int]:
        if 5 in items:
            raise RuntimeError("5 is never accepted")
        return items

    return flaky


def retries_later(broker: AsyncBroker) -> Any:
    seen: set[int] = set()

    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def once_later(items: list[int]) -> list[int]:
        again = {i: Retry(delay=0.1) for i, v in enumerate(items) if v % 3 == 0}
        for v in items:
            if v % 3 == 0 and v in seen:
                del again[items.index(v)]
            seen.add(v)
        if again:
            raise PartialFailure(again, results=[v * 10 for v in items])
        return [v * 10 for v in items]

    return once_later


def retries_all(broker: AsyncBroker) -> Any:
    calls: list[int] = []

    # A full batch (all 10 items) each time: which items share a call is not
    # left to timing.
    @batch_task(
        broker, batch_size=10, batch_timeout=5, results="per_item", task_name="t"
    )
    async def whole_call(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(calls) == 1:
            raise Retry from ConnectionError("the API is down")
        return items

    return whole_call


def retries_in_context(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def asks(items: list[int], ctx: BatchContext = TaskiqDepends()) -> list[int]:
        for index, message in enumerate(ctx.messages):
            if items[index] == 4 and "batchtask_attempt" not in message.labels:
                await ctx.retry_item(index, delay=0.05)
        return items

    return asks


def retries_much_later(broker: AsyncBroker) -> Any:
    @batch_task(
        broker, batch_size=4, batch_timeout=0.05, results="per_item", task_name="t"
    )
    async def three_in_a_minute(
        items: list[int], ctx: BatchContext = TaskiqDepends()
    ) -> list[int]:
        for index, message in enumerate(ctx.messages):
            if items[index] == 3 and "batchtask_attempt" not in message.labels:
                await ctx.retry_item(index, delay=60)
        return items

    return three_in_a_minute


class Letters:
    """A dead-letter task: notes each letter under its item's task id."""

    def __init__(self, log: Log) -> None:
        self.log = log

    async def kiq(self, letter: DeadLetter) -> None:
        self.log.setdefault(f"dead letter of {letter.task_id}", []).append(
            (letter.item, letter.attempts, letter.error, letter.error_type)
        )


def attempts(broker: AsyncBroker) -> Any:
    log = next(m.log for m in broker.middlewares if isinstance(m, Recorder))

    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.05,
        results="per_item",
        max_attempts=3,
        dead_letter=Letters(log),
        retry_on_error=True,
        max_retries=5,
        task_name="t",
    )
    async def sevens_fail(items: list[int]) -> list[int]:
        bad = {i: ValueError(f"{v} is 7") for i, v in enumerate(items) if v == 7}
        if bad:
            raise PartialFailure(bad, results=items)
        return items

    return sevens_fail


def timed_out(broker: AsyncBroker) -> Any:
    slept: set[int] = set()

    @batch_task(
        broker,
        batch_size=10,  # all 10 in the call that times out, not left to timing
        batch_timeout=5,
        results="per_item",
        call_timeout=0.2,
        max_attempts=2,
        task_name="t",
    )
    async def hangs_once(items: list[int]) -> list[int]:
        if 2 in items and 2 not in slept:
            slept.add(2)
            await asyncio.sleep(30)
        return items

    return hangs_once


def grouped(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=100,
        batch_timeout=0.05,
        results="per_item",
        group_by=lambda n: 1 // (n - 9) if n >= 9 else n % 2,
        task_name="t",
    )
    async def one_parity(items: list[int]) -> list[int]:
        assert len({v % 2 for v in items}) == 1, "one group per call"
        return [v % 2 for v in items]

    return one_parity


def weighed(broker: AsyncBroker) -> Any:
    def weight(n: int) -> float:
        if n == 3:
            raise ValueError("3 cannot be weighed")
        return n

    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.05,
        results="per_item",
        max_weight=9,
        weight=weight,
        task_name="t",
    )
    async def save(items: list[int]) -> list[str]:
        return [f"{n} with {sum(items)}" for n in items]

    return save


def deduplicated(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=5,
        batch_timeout=0.05,
        results="per_item",
        dedup_key=lambda n: n % 3,
        task_name="t",
    )
    async def save(items: list[int]) -> list[str]:
        if 7 in items:
            raise PartialFailure({items.index(7): ValueError("no 7")}, results=items)
        return [f"{n} of {items}" for n in items]

    return save


def aged(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.05,
        results="per_item",
        max_item_age=60,
        task_name="t",
    )
    async def save(items: list[int]) -> list[str]:
        return [f"{n} of {items}" for n in items]

    return save


def limited(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=2,
        batch_timeout=0.05,
        results="per_item",
        max_concurrent_calls=1,
        max_concurrent_calls_per_key=1,
        debounce=0.02,
        adaptive=True,
        task_name="t",
    )
    async def save(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return [n * 2 for n in items]

    return save


def taking_turns(broker: AsyncBroker) -> Any:
    # Which items share a call must not depend on the machine's speed: the
    # busy table's batches fill (4 items kicked well within the 0.5 s
    # window), the small tables' close at 0.5 s, in the middle of the third
    # 0.2 s call, and wait for the slot with the busy table's.
    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.5,
        results="per_item",
        max_concurrent_calls=1,
        task_name="t",
    )
    async def save(items: list[int], table: str) -> list[str]:
        await asyncio.sleep(0.2)
        return [f"{table}: {n} of {items}" for n in items]

    return save


def hot_or_small_table(n: int) -> tuple[str]:
    """Items 0-23 go to one busy table, the rest two each to three others."""
    return ("events",) if n < 24 else ("abc"[n % 3],)


def _sent_long_ago() -> str:
    return str(time.time() - 600)


N = list(range(10))

SCENARIOS = [
    Scenario("shared", shared, N),
    Scenario("per_item", per_item, N),
    Scenario("sync function", sync_per_item, N),
    Scenario("partial failure", partial, N),
    Scenario("bisect", bisect, N),
    Scenario("a raising call", failing, N),
    Scenario("a wrong number of results", wrong_length, N),
    Scenario(
        "invalid items and arguments",
        validated,
        [{"id": 1}, {"id": "x"}, {"id": 3}, "nope", {"id": 5}],
    ),
    Scenario("taskiq's Context", with_context, N),
    Scenario("pre_execute rewrites", per_item, N, middlewares=lambda: [Rewriter()]),
    Scenario(
        "async pre_execute rewrites",
        per_item,
        N,
        middlewares=lambda: [AsyncRewriter()],
    ),
    Scenario("when_received", per_item, N, ack_type="when_received"),
    Scenario("when_executed", per_item, N, ack_type="when_executed"),
    Scenario("when_saved", per_item, N, ack_type="when_saved"),
    Scenario("manual: Context.ack()", manual_context_ack, N, settle=0.1),
    Scenario("manual: BatchContext.ack_item()", manual_batch_context, N, settle=0.1),
    Scenario("manual: BatchContext.ack()", manual_batch_context_all, N, settle=0.1),
    Scenario("manual: no ack", manual_silent, N, settle=0.1),
    Scenario("requeue one item", requeues, [1, 2, 3], expect_stored=3, settle=0.2),
    Scenario(
        "the timeout label",
        slow,
        [1, 2, 3],
        kiq_labels={1: {"timeout": 0.1}},
    ),
    Scenario("graceful shutdown", waits_long, N, shutdown=True),
    Scenario("weights, one that fails", weighed, N),
    Scenario("dedup_key, a failing duplicate", deduplicated, N),
    Scenario(
        "max_item_age",
        aged,
        N,
        kiq_labels={
            1: {"batchtask_sent_at": _sent_long_ago},
            6: {"batchtask_sent_at": _sent_long_ago},
        },
    ),
    Scenario("call limits, debounce, adaptive", limited, N),
    Scenario(
        "keys taking turns for one call slot",
        taking_turns,
        list(range(30)),
        extra=hot_or_small_table,
    ),
    Scenario(
        "retries of single items",
        retried,
        N,
        middlewares=lambda: [SimpleRetryMiddleware()],
        settle=0.3,
    ),
    Scenario("Retry in PartialFailure, with a delay", retries_later, N, settle=0.2),
    Scenario("Retry raised for the whole call", retries_all, N, settle=0.2),
    Scenario("BatchContext.retry_item", retries_in_context, N, settle=0.2),
    Scenario(
        "max_attempts, a dead letter, taskiq's retries kept off",
        attempts,
        N,
        middlewares=lambda: [SimpleRetryMiddleware()],
        settle=0.3,
    ),
    Scenario("call_timeout", timed_out, N, settle=0.2),
    Scenario("group_by, one that raises", grouped, N),
]


async def kick_items(broker: AsyncBroker, task: Any, scenario: Scenario) -> None:
    """Send the scenario's items as messages m0, m1, ... (the same on every run)."""
    for index, item in enumerate(scenario.items):
        kicker = task.kicker().with_task_id(f"m{index}")
        labels = {
            name: value() if callable(value) else value
            for name, value in scenario.kiq_labels.get(index, {}).items()
        }
        if scenario.ack_type is not None:
            labels["ack_type"] = scenario.ack_type
        if labels:
            kicker = kicker.with_labels(**labels)
        if scenario.define is validated:
            await broker.kick(
                broker.formatter.dumps(
                    TaskiqMessage(
                        task_id=f"m{index}",
                        task_name=task.task_name,
                        labels={},
                        args=[item] if index != 3 else [item, 2, 3],
                        kwargs={} if index == 3 else {"scale": 2},
                    )
                )
            )
        else:
            await kicker.kiq(item, *scenario.extra(item))


def stored(log: Log) -> int:
    """Results the scenario's backend stored so far."""
    return sum(1 for events in log.values() for e in events if e[0] == "stored")


async def run(scenario: Scenario, receiver_class: type[Receiver]) -> Log:
    log: Log = {}
    broker = AckingBroker(log)
    broker.with_result_backend(scenario.backend(log))
    broker.add_middlewares(*scenario.middlewares(), Recorder(log))
    task = scenario.define(broker)
    await broker.startup()
    await kick_items(broker, task, scenario)
    receiver = receiver_class(
        broker, max_async_tasks=100, run_startup=False, **_receiver_args(receiver_class)
    )
    finish = asyncio.Event()
    listener = asyncio.create_task(receiver.listen(finish))
    expected = scenario.expect_stored or len(scenario.items)

    async def stored_all() -> None:
        while stored(log) < expected:
            await asyncio.sleep(0.01)

    if scenario.shutdown:
        while not broker.queue.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        # What the worker's SIGTERM handler does (see batchtask._lifecycle).
        close_all(asyncio.get_running_loop())
        finish.set()
    await within(stored_all(), 30)
    await asyncio.sleep(scenario.settle + 0.05)
    finish.set()
    await within(listener, 30)
    await broker.shutdown()
    if (
        isinstance(receiver, BatchReceiver)
        and scenario.define is not retries_much_later
    ):
        assert receiver.native is not None
        assert receiver.native.taken == broker.kicked, "the native path took all"
    scenario_queues[scenario.name] = [json.loads(m) for m in drained(broker.queue)]
    return log


scenario_queues: dict[str, list[dict[str, Any]]] = {}
"""What each scenario's last run left in its broker's queue, by name."""


def drained(queue: "asyncio.Queue[bytes]") -> list[bytes]:
    left: list[bytes] = []
    while not queue.empty():
        left.append(queue.get_nowait())
    return left


def _receiver_args(receiver_class: type[Receiver]) -> dict[str, Any]:
    return {}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_each_message_sees_the_same_on_both_paths(scenario: Scenario) -> None:
    stock = await run(scenario, Receiver)
    native = await run(scenario, BatchReceiver)
    assert stock, "the scenario recorded something"
    for task_id in sorted(set(stock) | set(native)):
        assert native.get(task_id) == stock.get(task_id), (
            f"{scenario.name}: message {task_id}\n"
            f"  taskiq:    {stock.get(task_id)}\n  batch-native: {native.get(task_id)}"
        )


async def test_the_native_path_resolves_dependencies_once_per_call() -> None:
    """The one difference on purpose: a dependency per call, not per message."""
    log: Log = {}
    broker = AckingBroker(log)
    broker.with_result_backend(RecordingBackend(log))
    opened: list[int] = []
    closed: list[str | None] = []

    async def session() -> AsyncGenerator[int, None]:
        opened.append(len(opened))
        try:
            yield len(opened)
        except Exception as exc:
            closed.append(type(exc).__name__)
            raise
        else:
            closed.append(None)

    @batch_task(broker, batch_size=5, batch_timeout=0.05, results="per_item")
    async def use(
        items: list[int], db: Annotated[int, TaskiqDepends(session)]
    ) -> list[int]:
        if 13 in items:
            raise ValueError("13")
        return [db] * len(items)

    await broker.startup()
    tasks = [await use.kiq(i) for i in [*range(10), 13]]
    receiver = BatchReceiver(broker, max_async_tasks=100, run_startup=False)
    results = await results_through(receiver, tasks, 10)

    assert len(opened) == 3, "one session per call of 5, 5 and 1 items"
    assert sorted(closed, key=str) == [None, None, "ValueError"]
    assert [r.return_value for r in results[:5]] == [results[0].return_value] * 5
    assert results[-1].is_err


def manual_dedup(broker: AsyncBroker) -> Any:
    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.05,
        ack_type="manual",
        dedup_key=lambda n: n,
        max_item_age=60,
        task_name="t",
    )
    async def acks_ones(items: list[int], ctx: BatchContext = TaskiqDepends()) -> None:
        assert [m.args[0] for m in ctx.messages] == items
        await ctx.ack_item(items.index(1))

    return acks_ones


async def test_under_manual_acks_the_native_path_acks_what_the_function_never_saw() -> (
    None
):
    # m0=1 and m2=1 share a key (m2 is passed), m1=2 is never acked by the
    # function, m3=3 is too old to pass.
    scenario = Scenario(
        "manual acks, dedup, expiry",
        manual_dedup,
        [1, 2, 1, 3],
        kiq_labels={3: {"batchtask_sent_at": _sent_long_ago}},
        ack_type="manual",
        settle=0.1,
    )
    log = await run(scenario, BatchReceiver)
    acked = sorted(key for key, events in log.items() if ("ack",) in events)
    assert acked == ["m0#1", "m2#1", "m3#1"]
    assert all(events.count(("ack",)) <= 1 for events in log.values())


class FailingWrites(RecordingBackend):
    """Cannot store m1's result (not a connection fault: it is not retried)."""

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        if task_id == "m1":
            key = delivery(task_id, result.labels)
            self.log.setdefault(key, []).append(("write failed",))
            raise TypeError("cannot serialize this result")
        await super().set_result(task_id, result)


async def test_a_result_that_cannot_be_written_is_acked_by_taskiq_only() -> None:
    """The other difference on purpose: taskiq logs the failed write and acks
    the message anyway; the native path does not ack it ``when_saved``, so
    the broker hands it out again rather than leave it without a result."""
    scenario = Scenario(
        "a failing result write",
        per_item,
        [1, 2, 3],
        backend=FailingWrites,
        expect_stored=2,
        settle=0.1,
    )
    stock = await run(scenario, Receiver)
    native = await run(scenario, BatchReceiver)
    assert ("write failed",) in stock["m1#1"]
    assert ("write failed",) in native["m1#1"]
    assert ("ack",) in stock["m1#1"], "taskiq acks without the result"
    assert ("ack",) not in native["m1#1"], "no ack without the result"
    for key in ("m0#1", "m2#1"):
        assert ("ack",) in native[key]
        assert native[key] == stock[key]


@pytest.mark.parametrize("receiver_class", [Receiver, BatchReceiver])
async def test_a_held_retry_is_handed_back_at_shutdown_without_waiting_for_it(
    receiver_class: type[Receiver],
) -> None:
    """Item 3 asks to come back in 60 s; the worker shuts down meanwhile. The
    held copy is sent again as it is (its time still ahead) and acknowledged:
    nothing waits a minute, nothing is lost, nothing runs twice. (taskiq's
    receiver may take a handed-back copy once more before it stops listening,
    and hand it back again: how many times is timing, so this is not a
    scenario of the differential suite.)"""
    scenario = Scenario(
        "a held retry at shutdown",
        retries_much_later,
        N,
        expect_stored=9,
        shutdown=True,
    )
    log = await within(run(scenario, receiver_class), 30)
    left = scenario_queues[scenario.name]
    assert [m["args"] for m in left] == [[3]], "one copy of item 3 waits in the broker"
    assert left[0]["labels"]["batchtask_attempt"] == "1"
    assert float(left[0]["labels"]["batchtask_not_before"]) > time.time() + 50
    m3 = [events for key, events in log.items() if key.startswith("m3#")]
    assert len(m3) >= 2, "the original and at least one held copy"
    assert all(("ack",) in events for events in m3), "each delivery acked"
    assert not any(e[0] == "stored" for events in m3 for e in events)
    for index in (0, 1, 2, 4, 5, 6, 7, 8, 9):
        stored = [e for e in log[f"m{index}#1"] if e[0] == "stored"]
        assert stored == [("stored", False, index, None)]
