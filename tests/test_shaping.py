"""Batch shaping: weight, call limits, debounce, item age, dedup, reconfigure, adaptive.

Each setting on taskiq's own path (InMemoryBroker); the batch-native path is
compared with it message by message in test_differential.py.
"""

import asyncio
import math
import time
from typing import Any

import pytest
from taskiq import InMemoryBroker

from batchtask import (
    BatchConfigError,
    FlushReason,
    ItemExpiredError,
    ItemValidationError,
    batch_task,
)
from batchtask._batcher import Batcher, Limits
from tests.conftest import within

# -- settings are checked when the decorator runs ---------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"max_weight": 10}, "max_weight=10 needs weight="),
        ({"max_weight": 0, "weight": len}, "max_weight=0 must be a finite number > 0"),
        ({"max_weight": math.inf, "weight": len}, "max_weight=inf must be a finite"),
        ({"weight": 3}, "weight=3 must be a function of one item"),
        ({"max_concurrent_calls": 0}, "max_concurrent_calls=0 must be an int >= 1"),
        ({"max_concurrent_calls": True}, "max_concurrent_calls=True must be an int"),
        ({"max_concurrent_calls_per_key": 1.5}, "max_concurrent_calls_per_key=1.5"),
        ({"debounce": 0}, "debounce=0 must be a finite number of seconds > 0"),
        ({"debounce": 2.0}, "debounce=2.0 must be below batch_timeout=2.0"),
        ({"max_item_age": -1}, "max_item_age=-1 must be a finite number of seconds"),
        ({"dedup_key": "id"}, "dedup_key='id' must be a function of one item"),
        ({"adaptive": 1}, "adaptive=1 must be True or False"),
        (
            {"batch_timout": 3},
            "batch_timout=3 is not a batch setting; did you mean 'batch_timeout'?",
        ),
        ({"bisect_on_eror": True}, "did you mean 'bisect_on_error'?"),
        ({"Max_Weight": 3}, "did you mean 'max_weight'?"),
    ],
)
def test_a_bad_shaping_setting_is_refused_with_what_and_how_to_fix(
    settings: dict[str, Any], expected: str
) -> None:
    with pytest.raises(BatchConfigError) as raised:
        batch_task(InMemoryBroker(), batch_size=10, batch_timeout=2.0, **settings)
    assert expected in str(raised.value)
    assert "Fix: " in str(raised.value)


def test_a_label_far_from_every_setting_stays_a_taskiq_label() -> None:
    broker = InMemoryBroker()

    @batch_task(
        broker, batch_size=10, batch_timeout=1.0, priority=3, retry_on_error=True
    )
    async def save(rows: list[int]) -> None: ...

    assert save.labels["priority"] == 3
    assert save.labels["retry_on_error"] is True


# -- weight -----------------------------------------------------------------


async def test_weights_of_a_call_never_exceed_max_weight_and_a_heavy_item_runs_alone(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(
        broker, batch_size=100, batch_timeout=0.2, max_weight=10, weight=lambda n: n
    )
    async def save(sizes: list[int]) -> int:
        calls.append(sizes)
        return sum(sizes)

    sizes = [4, 4, 3, 12, 5, 5, 0, 1]
    tasks = [await save.kiq(n) for n in sizes]
    results = await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))

    # 4+4 then 3 would exceed 10: 3 opens the next batch; 12 alone; 5+5 fills.
    assert calls == [[4, 4], [3], [12], [5, 5], [0, 1]]
    assert [r.return_value for r in results] == [8, 8, 3, 12, 10, 10, 1, 1]


@pytest.mark.parametrize("bad", ["raises", "nan", "negative", "text"])
async def test_a_weight_that_fails_fails_its_item_alone_and_nothing_hangs(
    broker: InMemoryBroker, bad: str
) -> None:
    calls: list[list[int]] = []

    def weigh(n: int) -> Any:
        if n != 2:
            return 1
        return {
            "raises": lambda: 1 / 0,
            "nan": lambda: math.nan,
            "negative": lambda: -1,
            "text": lambda: "heavy",
        }[bad]()

    @batch_task(
        broker,
        batch_size=3,
        batch_timeout=0.1,
        max_weight=100,
        weight=weigh,
        task_name="shop:weigh",
    )
    async def save(items: list[int]) -> int:
        calls.append(items)
        return len(items)

    tasks = [await save.kiq(n) for n in range(5)]
    results = await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))

    assert calls == [[0, 1, 3], [4]]
    failed = results[2]
    assert failed.is_err
    assert isinstance(failed.error, ItemValidationError)
    assert "batch task 'shop:weigh': weight=" in str(failed.error)
    assert "weigh" in str(failed.error)
    assert [r.return_value for i, r in enumerate(results) if i != 2] == [3, 3, 3, 1]


# -- concurrency ------------------------------------------------------------


async def test_max_concurrent_calls_holds_and_batches_wait_their_turn_in_order(
    broker: InMemoryBroker,
) -> None:
    running = 0
    most = 0
    order: list[int] = []

    @batch_task(broker, batch_size=2, batch_timeout=5, max_concurrent_calls=2)
    async def save(items: list[int]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        order.append(items[0])
        await asyncio.sleep(0.05)
        running -= 1

    tasks = [await save.kiq(n) for n in range(12)]
    await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))
    assert most == 2
    assert order == [0, 2, 4, 6, 8, 10], "full batches are called in flush order"


async def test_max_concurrent_calls_per_key_lets_other_keys_run_meanwhile(
    broker: InMemoryBroker,
) -> None:
    running: dict[str, int] = {}
    most: dict[str, int] = {}
    overall = 0
    most_overall = 0

    @batch_task(broker, batch_size=2, batch_timeout=5, max_concurrent_calls_per_key=1)
    async def save(items: list[int], table: str) -> None:
        nonlocal overall, most_overall
        running[table] = running.get(table, 0) + 1
        overall += 1
        most[table] = max(most.get(table, 0), running[table])
        most_overall = max(most_overall, overall)
        await asyncio.sleep(0.05)
        running[table] -= 1
        overall -= 1

    tasks = [await save.kiq(n, table) for n in range(8) for table in ("a", "b", "c")]
    await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))
    assert most == {"a": 1, "b": 1, "c": 1}
    assert most_overall == 3, "one call per key, the keys side by side"


# -- debounce ---------------------------------------------------------------


async def test_debounce_calls_a_batch_once_items_stop_coming(
    broker: InMemoryBroker,
) -> None:
    loop = asyncio.get_running_loop()
    calls: list[tuple[list[int], float]] = []

    @batch_task(broker, batch_size=100, batch_timeout=30, debounce=0.2)
    async def save(items: list[int]) -> None:
        calls.append((items, loop.time()))

    started = loop.time()
    last = started
    for n in range(5):
        if n:
            await asyncio.sleep(0.05)
        last = loop.time()  # the last item joins its batch as it is kicked
        await save.kiq(n)
    await within(broker.wait_all())

    assert [items for items, _ in calls] == [[0, 1, 2, 3, 4]]
    called = calls[0][1]
    # Timers may fire up to 1 ms early (the batcher's tolerance).
    assert called - last >= 0.2 - 0.002, "not before the quiet period"
    assert called - started < 10, "long before batch_timeout"


async def test_batch_timeout_stays_the_hard_bound_under_debounce(
    broker: InMemoryBroker,
) -> None:
    loop = asyncio.get_running_loop()
    calls: list[tuple[int, float]] = []

    @batch_task(broker, batch_size=1000, batch_timeout=0.3, debounce=0.2)
    async def save(items: list[int]) -> None:
        calls.append((len(items), loop.time()))

    started = loop.time()
    for n in range(12):  # an item every 50 ms: never quiet for 0.2 s
        await save.kiq(n)
        await asyncio.sleep(0.05)
    await within(broker.wait_all())
    first_size, first_at = calls[0]
    assert first_size < 12
    assert first_at - started >= 0.3


# -- item age ---------------------------------------------------------------


async def test_an_item_older_than_max_item_age_fails_expired_and_is_not_passed(
    broker: InMemoryBroker,
) -> None:
    seen: list[list[int]] = []

    @batch_task(broker, batch_size=3, batch_timeout=0.1, max_item_age=60)
    async def save(items: list[int]) -> int:
        seen.append(items)
        return len(items)

    old = (
        await save.kicker().with_labels(batchtask_sent_at=str(time.time() - 120)).kiq(1)
    )
    fresh = await save.kiq(2)
    unstamped = await save.kicker().with_labels(batchtask_sent_at="not a time").kiq(3)
    results = await within(
        asyncio.gather(*(t.wait_result(timeout=10) for t in (old, fresh, unstamped)))
    )

    assert seen == [[2, 3]], (
        "the old item is not passed; a bad stamp counts from receipt"
    )
    assert isinstance(results[0].error, ItemExpiredError)
    assert "max_item_age=60" in str(results[0].error)
    assert [r.return_value for r in results[1:]] == [2, 2]


async def test_kiq_stamps_the_send_time_label(broker: InMemoryBroker) -> None:
    labels: list[dict[str, Any]] = []

    @batch_task(broker, batch_size=2, batch_timeout=0.1)
    async def save(items: list[int]) -> None: ...

    before = time.time()
    task = await save.kiq(1)
    result = await within(task.wait_result(timeout=10))
    labels.append(result.labels)
    stamp = float(labels[0]["batchtask_sent_at"])
    assert before - 1 <= stamp <= time.time() + 1


async def test_an_expired_item_alone_is_not_called_at_all(
    broker: InMemoryBroker,
) -> None:
    calls = 0

    @batch_task(broker, batch_size=3, batch_timeout=0.05, max_item_age=1)
    async def save(items: list[int]) -> None:
        nonlocal calls
        calls += 1

    task = await save.kicker().with_labels(batchtask_sent_at="0").kiq(1)
    result = await within(task.wait_result(timeout=10))
    assert isinstance(result.error, ItemExpiredError)
    assert calls == 0


# -- dedup ------------------------------------------------------------------


async def test_duplicates_are_passed_once_as_the_latest_and_share_its_outcome(
    broker: InMemoryBroker,
) -> None:
    seen: list[list[tuple[int, str]]] = []

    @batch_task(
        broker,
        batch_size=6,
        batch_timeout=0.1,
        results="per_item",
        dedup_key=lambda doc: doc[0],
    )
    async def index(docs: list[tuple[int, str]]) -> list[str]:
        seen.append(docs)
        return [f"{key}={text}" for key, text in docs]

    docs = [(1, "a"), (2, "b"), (1, "c"), (3, "d"), (2, "e"), (1, "f")]
    tasks = [await index.kiq(doc) for doc in docs]
    results = await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))

    assert seen == [[(3, "d"), (2, "e"), (1, "f")]]
    assert [r.return_value for r in results] == [
        "1=f",
        "2=e",
        "1=f",
        "3=d",
        "2=e",
        "1=f",
    ]


async def test_a_duplicate_of_a_failed_item_fails_with_it(
    broker: InMemoryBroker,
) -> None:
    from batchtask import PartialFailure

    @batch_task(
        broker,
        batch_size=4,
        batch_timeout=0.1,
        results="per_item",
        dedup_key=lambda n: n % 2,
    )
    async def save(items: list[int]) -> list[int]:
        raise PartialFailure({items.index(3): ValueError("odd")}, results=items)

    tasks = [await save.kiq(n) for n in (1, 2, 3, 4)]
    results = await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))
    assert [
        type(r.error).__name__ if r.is_err else r.return_value for r in results
    ] == [
        "ValueError",
        4,
        "ValueError",
        4,
    ]


async def test_a_dedup_key_that_fails_fails_its_item_alone(
    broker: InMemoryBroker,
) -> None:
    @batch_task(
        broker,
        batch_size=3,
        batch_timeout=0.1,
        dedup_key=lambda doc: doc["id"],
        task_name="docs:index",
    )
    async def index(docs: list[dict[str, Any]]) -> int:
        return len(docs)

    tasks = [
        await index.kiq({"id": 1}),
        await index.kiq({"name": "no id"}),
        await index.kiq({"id": [1, 2]}),  # unhashable key
        await index.kiq({"id": 2}),
    ]
    results = await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))
    assert [r.return_value for r in (results[0], results[3])] == [2, 2]
    for failed in results[1:3]:
        assert isinstance(failed.error, ItemValidationError)
        assert "batch task 'docs:index': dedup_key=" in str(failed.error)


# -- reconfigure --------------------------------------------------------------


async def test_reconfigure_changes_settings_for_batches_opened_afterwards(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=30)
    async def save(items: list[int]) -> None:
        calls.append(items)

    for n in range(5):
        await save.kiq(n)
    await asyncio.sleep(0.05)
    assert calls == []
    save.reconfigure(batch_size=3)  # the open batch of 5 is over it: flushed now
    await asyncio.sleep(0.05)
    assert calls == [[0, 1, 2, 3, 4]]
    for n in range(5, 11):
        await save.kiq(n)
    await asyncio.sleep(0.05)
    assert calls[1:] == [[5, 6, 7], [8, 9, 10]]
    save.reconfigure(batch_timeout=0.05, batch_size=100)
    await save.kiq(11)
    await within(broker.wait_all())
    assert calls[3:] == [[11]]
    assert save.config.batch_timeout == 0.05


def test_reconfigure_checks_like_the_decorator_and_changes_nothing_on_error() -> None:
    broker = InMemoryBroker()

    @batch_task(broker, batch_size=10, batch_timeout=1.0, task_name="t:save")
    async def save(items: list[int]) -> None: ...

    with pytest.raises(BatchConfigError, match=r"batch task 't:save': debounce=1\.5"):
        save.reconfigure(debounce=1.5)
    with pytest.raises(BatchConfigError, match="batch_timout=3 is not a batch setting"):
        save.reconfigure(batch_timout=3)  # type: ignore[call-arg]  # the typo is the point
    with pytest.raises(BatchConfigError, match="results='per_item' cannot change"):
        save.reconfigure(results="per_item")  # type: ignore[call-arg]  # not a setting of reconfigure
    assert save.config.batch_size == 10
    assert save.config.debounce is None
    save.reconfigure(max_weight=5, weight=lambda n: n)
    assert save.config.max_weight == 5.0
    save.reconfigure(max_weight=None)
    assert save.config.max_weight is None


async def test_reconfigure_raising_the_call_limit_starts_waiting_batches(
    broker: InMemoryBroker,
) -> None:
    gate = asyncio.Event()
    started: list[int] = []

    @batch_task(broker, batch_size=1, batch_timeout=5, max_concurrent_calls=1)
    async def save(items: list[int]) -> None:
        started.append(items[0])
        await gate.wait()

    for n in range(3):
        await save.kiq(n)
    await asyncio.sleep(0.05)
    assert started == [0]
    save.reconfigure(max_concurrent_calls=3)
    await asyncio.sleep(0.05)
    assert started == [0, 1, 2]
    gate.set()
    await within(broker.wait_all())


# -- adaptive ---------------------------------------------------------------


async def test_adaptive_calls_a_trickle_early_and_a_burst_full() -> None:
    sizes: list[int] = []
    reasons: list[FlushReason] = []

    async def run(batch: Any) -> None:
        sizes.append(len(batch.entries))
        reasons.append(batch.reason)
        for entry in batch.entries:
            entry.future.set_result(None)

    batcher: Batcher[int, None] = Batcher(
        run, name="t", limits=Limits(batch_size=100, batch_timeout=2.0, adaptive=True)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    trickle = [batcher.submit("k", n) for n in range(3)]
    await within(asyncio.gather(*(e.future for e in trickle)))
    assert sizes == [3]
    assert reasons == [FlushReason.ADAPTIVE]
    assert loop.time() - started < 1.0, "long before batch_timeout"

    burst = [batcher.submit("k", n) for n in range(1000)]
    await within(asyncio.gather(*(e.future for e in burst)))
    assert sizes[1:] == [100] * 10
    await batcher.drain()


async def test_reconfigure_from_another_thread_reaches_the_worker_loop(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=30)
    async def save(items: list[int]) -> None:
        calls.append(items)

    for n in range(4):
        await save.kiq(n)
    await asyncio.sleep(0.05)
    await asyncio.to_thread(save.reconfigure, batch_size=2)
    await within(broker.wait_all())
    assert calls == [[0, 1, 2, 3]]
    assert save.config.batch_size == 2


async def test_items_buffered_before_dedup_key_was_set_are_passed_each(
    broker: InMemoryBroker,
) -> None:
    seen: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=0.3)
    async def save(items: list[int]) -> int:
        seen.append(items)
        return len(items)

    tasks = [await save.kiq(n) for n in (1, 1)]
    await asyncio.sleep(0.05)
    save.reconfigure(dedup_key=lambda n: n)
    tasks += [await save.kiq(n) for n in (1, 1)]
    results = await within(asyncio.gather(*(t.wait_result(timeout=10) for t in tasks)))
    assert seen == [[1, 1, 1]], "the two keyless items, then one for the keyed pair"
    assert [r.return_value for r in results] == [3, 3, 3, 3]
