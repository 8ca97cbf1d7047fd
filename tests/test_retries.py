"""Item-level control: Retry, attempts, dead letters, call_timeout, group_by.

Each behaviour runs on an ``InMemoryBroker`` twice: with batchtask's
in-process path (batch tasks kicked there are handled batch-native) and on a
subclass that keeps every message on taskiq's own path (the entry point).
``tests/test_differential.py`` compares what each message saw on both paths;
``tests/test_retry_workers.py`` runs real workers on Redis and RabbitMQ.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Hashable
from typing import Any

import pytest
from taskiq import (
    BrokerMessage,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
)
from taskiq.middlewares import SimpleRetryMiddleware

from batchtask import (
    BatchConfigError,
    BatchContext,
    BatchTaskError,
    CallTimeoutError,
    DeadLetter,
    ItemValidationError,
    PartialFailure,
    Retry,
    batch_task,
    flush_all,
)
from batchtask._lifecycle import buffered_items
from tests.conftest import within


class StockInMemoryBroker(InMemoryBroker):
    """An InMemoryBroker with a kick of its own: every message on taskiq's path."""

    async def kick(self, message: BrokerMessage) -> None:
        await super().kick(message)


PATHS = {"batch-native": InMemoryBroker, "taskiq's own": StockInMemoryBroker}


@pytest.fixture(params=list(PATHS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[InMemoryBroker]:
    broker = PATHS[request.param]()
    await broker.startup()
    yield broker
    await within(broker.wait_all(), 30)
    await broker.shutdown()


class Letters:
    """A dead-letter task that keeps what it receives."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def kiq(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


async def results(tasks: list[Any], seconds: float = 30) -> list[Any]:
    return [await within(task.wait_result(timeout=seconds), seconds) for task in tasks]


async def test_a_rate_limited_api_retries_only_the_refused_items_after_their_delay(
    broker: InMemoryBroker,
) -> None:
    """The 429 case: the API refuses some items with a Retry-After; those
    come back in a later call no earlier than that, the others succeed."""
    calls: list[tuple[float, list[int]]] = []
    refused_at: dict[int, float] = {}
    retry_after = 0.3

    @batch_task(broker, batch_size=10, batch_timeout=0.05, results="per_item")
    async def post(items: list[int]) -> list[str]:
        now = time.monotonic()
        calls.append((now, items))
        refused = {
            index: Retry(delay=retry_after)
            for index, item in enumerate(items)
            if item % 4 == 0 and item not in refused_at
        }
        for index in refused:
            refused_at[items[index]] = now
        if refused:
            raise PartialFailure(refused, results=[f"ok {item}" for item in items])
        return [f"ok {item}" for item in items]

    tasks = [await post.kiq(i) for i in range(10)]
    got = await results(tasks)

    assert [r.return_value for r in got] == [f"ok {i}" for i in range(10)]
    again = {item: at for at, items in calls[1:] for item in items}
    assert sorted(again) == [0, 4, 8], "only the refused items came back"
    waited = {item: again[item] - refused_at[item] for item in again}
    print(f"429 case: retried {sorted(waited)}, waited {sorted(waited.values())} s")
    assert all(seconds >= retry_after - 0.01 for seconds in waited.values())


async def test_raising_retry_sends_every_item_again_counting_its_attempts(
    broker: InMemoryBroker,
) -> None:
    seen: list[tuple[str, ...]] = []

    @batch_task(broker, batch_size=10, batch_timeout=0.05)
    async def flaky(items: list[int], ctx: BatchContext = TaskiqDepends()) -> int:
        seen.append(tuple(m.labels.get("batchtask_attempt", "0") for m in ctx.messages))
        if len(seen) < 3:
            raise Retry from ConnectionError("down")
        return sum(items)

    tasks = [await flaky.kiq(i) for i in range(3)]
    got = await results(tasks)
    assert [r.return_value for r in got] == [3, 3, 3]
    assert seen == [("0",) * 3, ("1",) * 3, ("2",) * 3]


async def test_without_max_attempts_an_explicit_retry_gets_ten_attempts_in_all(
    broker: InMemoryBroker,
) -> None:
    calls = 0

    @batch_task(broker, batch_size=10, batch_timeout=0.05)
    async def never(items: list[int]) -> None:
        nonlocal calls
        calls += 1
        raise Retry from LookupError("still missing")

    [result] = await results([await never.kiq(1)])
    assert calls == 10
    assert result.is_err
    assert isinstance(result.error, LookupError), "the Retry's cause is stored"


async def test_max_attempts_ends_in_the_stored_error_and_one_dead_letter(
    broker: InMemoryBroker,
) -> None:
    letters = Letters()
    calls: list[list[int]] = []

    @batch_task(
        broker,
        batch_size=10,
        batch_timeout=0.05,
        results="per_item",
        max_attempts=3,
        retry_delay=0.05,
        dead_letter=letters,
    )
    async def save(rows: list[int], table: str) -> list[int]:
        calls.append(rows)
        bad = {i: ValueError(f"row {r} is bad") for i, r in enumerate(rows) if r == 2}
        if bad:
            raise PartialFailure(bad, results=rows)
        return rows

    tasks = [await save.kiq(i, "events") for i in range(4)]
    got = await results(tasks)

    assert [r.return_value for r in got if not r.is_err] == [0, 1, 3]
    assert isinstance(got[2].error, ValueError)
    assert sum(2 in rows for rows in calls) == 3, "called 3 times, then final"
    [letter] = letters.letters
    assert letter.task_id == tasks[2].task_id
    assert letter.item == 2
    assert letter.args == ["events"]
    assert letter.attempts == 3
    assert letter.error == "row 2 is bad"
    assert letter.error_type == "builtins.ValueError"
    assert letter.task_name == save.task_name


async def test_a_dead_letter_task_can_be_a_taskiq_task(broker: InMemoryBroker) -> None:
    received: list[DeadLetter] = []

    @broker.task
    async def dead(letter: DeadLetter) -> None:
        received.append(letter)

    @batch_task(broker, batch_size=10, batch_timeout=0.05, dead_letter=dead)
    async def fails(items: list[str]) -> None:
        raise RuntimeError("no")

    [result] = await results([await fails.kiq("x")])
    await within(broker.wait_all(), 30)
    assert result.is_err
    assert [(r.item, r.attempts, r.error_type) for r in received] == [
        ("x", 1, "builtins.RuntimeError")
    ]


async def test_batchtask_counts_and_taskiqs_retry_middleware_keeps_off() -> None:
    broker = StockInMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=5)
    )
    await broker.startup()
    calls = 0

    @batch_task(
        broker, batch_size=10, batch_timeout=0.05, max_attempts=2, retry_on_error=True
    )
    async def fails(items: list[int]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("no")

    [result] = await results([await fails.kiq(1)])
    await asyncio.sleep(0.3)  # a retry by taskiq's middleware would run now
    await within(broker.wait_all(), 30)
    await broker.shutdown()
    assert result.is_err
    assert calls == 2, "max_attempts=2 calls, not 2 x taskiq's 5"


async def test_without_max_attempts_taskiqs_retry_middleware_counts_as_before() -> None:
    broker = StockInMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=3)
    )
    await broker.startup()
    calls = 0

    @batch_task(broker, batch_size=10, batch_timeout=0.05, retry_on_error=True)
    async def fails(items: list[int]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("no")

    await fails.kiq(1)
    for _ in range(300):
        if calls >= 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await within(broker.wait_all(), 30)
    await broker.shutdown()
    assert calls == 3


async def test_a_held_retry_takes_no_buffer_or_call_slot(
    broker: InMemoryBroker,
) -> None:
    """With one call slot, an item waiting 0.5 s for its retry blocks nothing:
    items kicked meanwhile are called before it comes back."""
    order: list[int] = []
    retried: set[int] = set()

    @batch_task(
        broker,
        batch_size=1,
        batch_timeout=0.05,
        max_concurrent_calls=1,
        results="per_item",
    )
    async def one(items: list[int]) -> list[int]:
        order.extend(items)
        if items == [0] and 0 not in retried:
            retried.add(0)
            raise Retry(delay=0.5)
        return items

    first = await one.kiq(0)
    for _ in range(300):
        if retried:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert buffered_items(broker) == 0, "the held item is in no buffer"
    later = [await one.kiq(i) for i in range(1, 4)]
    got = await results([first, *later])
    assert [r.return_value for r in got] == [0, 1, 2, 3]
    assert order == [0, 1, 2, 3, 0], "the others ran while it waited"


async def test_retry_item_from_the_batch_context(broker: InMemoryBroker) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=0.05, results="per_item")
    async def asks(items: list[int], ctx: BatchContext = TaskiqDepends()) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            await ctx.retry_item(items.index(1), delay=0.1)
        return [item * 2 for item in items]

    got = await results([await asks.kiq(i) for i in range(3)])
    assert [r.return_value for r in got] == [0, 2, 4]
    assert calls[1:] == [[1]]
    with pytest.raises(ValueError, match="delay=-1"):
        Retry(delay=-1)


async def test_a_call_past_call_timeout_is_cancelled_and_retried(
    broker: InMemoryBroker,
) -> None:
    cancelled = 0
    calls = 0

    @batch_task(
        broker, batch_size=10, batch_timeout=0.05, call_timeout=0.2, max_attempts=2
    )
    async def hangs_once(items: list[int]) -> int:
        nonlocal cancelled, calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled += 1
                raise
        return len(items)

    got = await results([await hangs_once.kiq(i) for i in range(3)])
    assert [r.return_value for r in got] == [3, 3, 3]
    assert (calls, cancelled) == (2, 1)


async def test_a_timed_out_call_fails_its_items_with_call_timeout_error(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    @batch_task(
        broker,
        batch_size=10,
        batch_timeout=0.05,
        call_timeout=0.1,
        bisect_on_error=True,
    )
    def blocks(items: list[int]) -> None:
        time.sleep(0.5)

    with caplog.at_level(logging.WARNING, logger="batchtask"):
        got = await results([await blocks.kiq(i) for i in range(4)])
    errors = [r.error for r in got]
    assert all(isinstance(e, CallTimeoutError) for e in errors)
    assert all(
        isinstance(e, TimeoutError) and isinstance(e, BatchTaskError) for e in errors
    )
    assert "call_timeout=0.1s" in str(errors[0])
    assert "thread is left to finish" in caplog.text
    assert caplog.text.count("ran past call_timeout") == 1, "not bisected"


async def test_group_by_keeps_groups_apart_and_fails_a_bad_key_alone(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[dict[str, Any]]] = []

    def tenant(row: dict[str, Any]) -> Hashable:
        if row["tenant"] == "unhashable":
            return ["a list"]  # type: ignore[return-value]  # what a user may do
        return row["tenant"]

    @batch_task(broker, batch_size=10, batch_timeout=0.05, group_by=tenant)
    async def save(rows: list[dict[str, Any]], table: str) -> int:
        calls.append(rows)
        return len(rows)

    rows = [{"tenant": t, "n": n} for n, t in enumerate("abab")]
    tasks = [await save.kiq(row, "events") for row in rows]
    bad = [
        await save.kiq({"tenant": "unhashable"}, "events"),
        await save.kiq({}, "events"),
    ]
    got = await results(tasks + bad)
    assert [r.return_value for r in got[:4]] == [2, 2, 2, 2]
    assert sorted(tuple(sorted({row["tenant"] for row in call})) for call in calls) == [
        ("a",),
        ("b",),
    ]
    assert all(isinstance(r.error, ItemValidationError) for r in got[4:])
    assert "group_by=" in str(got[4].error)


@pytest.mark.parametrize(
    ("setting", "value", "text"),
    [
        ("max_attempts", 0, "max_attempts=0 must be an int >= 1"),
        ("max_attempts", 2.5, "max_attempts=2.5 must be an int >= 1"),
        ("retry_delay", -1, "retry_delay=-1 must be a finite number of seconds >= 0"),
        ("retry_delay", float("inf"), "retry_delay=inf"),
        ("call_timeout", 0, "call_timeout=0 must be a finite number of seconds > 0"),
        ("group_by", "tenant", "group_by='tenant' must be a function of one item"),
        ("dead_letter", print, "must be a taskiq task (anything with .kiq)"),
    ],
)
def test_bad_item_level_settings_are_refused_at_the_decorator(
    setting: str, value: Any, text: str
) -> None:
    settings: dict[str, Any] = {setting: value}
    with pytest.raises(BatchConfigError) as raised:
        batch_task(InMemoryBroker(), batch_size=10, batch_timeout=1.0, **settings)
    assert text in str(raised.value)
    assert "Fix:" in str(raised.value)


async def test_a_long_hold_is_handed_back_within_the_window(
    broker: InMemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that redelivers after W seconds: a retried item due later than
    W/2 is held W/2, then sent again as it is (so no other worker claims it
    meanwhile), and runs once, no earlier than its delay."""
    monkeypatch.setattr("batchtask._task.hold_limit", lambda adapter: 0.2)
    monkeypatch.setattr("batchtask._native.hold_limit", lambda adapter: 0.2)
    calls: list[float] = []
    deliveries = 0

    class Count(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            nonlocal deliveries
            deliveries += 1
            return message

    broker.add_middlewares(Count())

    @batch_task(broker, batch_size=10, batch_timeout=0.05)
    async def later(items: list[int]) -> int:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise Retry(delay=0.7)
        return len(items)

    [result] = await results([await later.kiq(1)])
    assert result.return_value == 1
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.7 - 0.01
    # The original, its retry, then a hand-back every 0.2 s of the 0.7 s.
    assert deliveries >= 4


async def test_a_retry_on_a_broker_that_runs_kicks_in_place_does_not_hang() -> None:
    """``InMemoryBroker(await_inplace=True)`` runs a kicked message inside the
    kick: the retry's send must not wait for it from inside the call (with
    one call slot, that wait would be for the slot the call holds)."""
    broker = InMemoryBroker(await_inplace=True)
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=0.05, max_concurrent_calls=1)
    async def once_more(items: list[int]) -> int:
        calls.append(items)
        if len(calls) == 1:
            raise Retry(delay=0.1)
        return len(items)

    task = await within(once_more.kiq(7), 10)
    await within(flush_all(broker), 10)
    [result] = await results([task])
    await broker.shutdown()
    assert result.return_value == 1
    assert calls == [[7], [7]]
