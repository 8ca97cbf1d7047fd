"""Batch shaping: weight, call limits, debounce, item age, dedup, reconfigure, adaptive.

Each setting on taskiq's own path (InMemoryBroker); the batch-native path is
compared with it message by message in test_differential.py.
"""

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Hashable
from typing import Any
from unittest.mock import Mock

import pytest
from taskiq import BrokerMessage, InMemoryBroker

from batchtask import (
    BatchConfigError,
    FlushReason,
    ItemExpiredError,
    ItemValidationError,
    batch_task,
    flush_all,
)
from batchtask._batcher import Batch, Batcher, Entry, Limits
from batchtask._lifecycle import buffered_items
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


class StockPathBroker(InMemoryBroker):
    """An InMemoryBroker with a kick of its own: its messages take taskiq's path."""

    async def kick(self, message: BrokerMessage) -> None:
        await super().kick(message)


@pytest.mark.parametrize(
    "broker_class",
    [InMemoryBroker, StockPathBroker],
    ids=["in-process path", "taskiq's path"],
)
async def test_with_max_concurrent_calls_group_keys_take_turns_for_the_slot(
    broker_class: type[InMemoryBroker],
) -> None:
    broker = broker_class()
    await broker.startup()
    go = asyncio.Event()
    started: list[str] = []

    @batch_task(broker, batch_size=10, batch_timeout=60, max_concurrent_calls=1)
    async def save(rows: list[int], table: str) -> None:
        started.append(table)
        await go.wait()

    tasks = [await save.kiq(n, "events") for n in range(400)]
    small = ["users", "orders", "carts", "tags", "notes"]
    tasks += [await save.kiq(n, table) for table in small for n in range(3)]

    async def all_buffered() -> None:
        while not started or buffered_items(broker) != 3 * len(small):
            await asyncio.sleep(0.01)

    await within(all_buffered())  # events' 40 batches flushed, 1 running
    flushing = asyncio.create_task(flush_all(broker))
    await asyncio.sleep(0)  # it flushes the small tables' batches at once
    go.set()
    await within(flushing)
    await within(asyncio.gather(*(task.wait_result(timeout=10) for task in tasks)))
    await broker.shutdown()

    assert started[:7] == ["events", "events", *small]
    assert started.count("events") == 40


# -- fair turns (the batcher) ----------------------------------------------


class Calls:
    """A batcher's run: notes each started batch; holds its call until released.

    Every call first waits for `go`; with ``hold=True`` it then waits for its
    own gate too (`release`). A released call resolves the futures still open.
    """

    def __init__(self, *, hold: bool = False) -> None:
        self.started: list[Batch[Any, None]] = []
        self.go = asyncio.Event()
        self.hold = hold
        self.gates: list[asyncio.Event] = []

    async def __call__(self, batch: Batch[Any, None]) -> None:
        self.started.append(batch)
        gate = asyncio.Event()
        self.gates.append(gate)
        await self.go.wait()
        if self.hold:
            await gate.wait()
        for entry in batch.entries:
            if not entry.future.done():
                entry.future.set_result(None)

    @property
    def keys(self) -> list[Hashable]:
        return [batch.key for batch in self.started]

    @property
    def firsts(self) -> list[Any]:
        """Each started batch's first item."""
        return [batch.entries[0].value for batch in self.started]

    def release(self, index: int) -> None:
        self.go.set()
        self.gates[index].set()

    def release_all(self) -> None:
        self.hold = False
        self.go.set()
        for gate in self.gates:
            gate.set()

    async def until(self, started: int) -> None:
        """Return once `started` calls have begun."""
        while len(self.started) < started:
            await asyncio.sleep(0)


def batcher_of(calls: Calls, **limits: Any) -> Batcher[Any, None]:
    return Batcher(
        calls, name="t", limits=Limits(batch_timeout=60, **limits), observer=Mock()
    )


@pytest.mark.parametrize("hot_key", ["backlog first", "backlog growing after"])
async def test_with_one_call_slot_keys_take_turns_so_a_small_key_waits_k_calls(
    hot_key: str,
) -> None:
    """400 items of A, then 3 of each of B..F: six keys wait, not 39 batches."""
    calls = Calls()
    batcher = batcher_of(calls, batch_size=10, max_calls=1)
    later = 200 if hot_key == "backlog growing after" else 400
    entries = [batcher.submit("A", n) for n in range(later)]
    await within(calls.until(1))  # A's first call holds the slot
    small = "BCDEF"
    entries += [batcher.submit(key, n) for key in small for n in range(3)]
    batcher.flush(FlushReason.MANUAL)  # the small keys' batches of 3
    flushed_at = len(calls.started)
    entries += [batcher.submit("A", n) for n in range(later, 400)]
    assert batcher.waiting == 39 + len(small)
    calls.go.set()
    await within(asyncio.gather(*(entry.future for entry in entries)))
    await within(batcher.drain())

    keys = calls.keys
    assert len(keys) == 40 + len(small)
    for key in small:
        # Among the calls started after its flush, its is among the first 6.
        assert keys.index(key) - flushed_at < 6, f"{key} waited: {keys}"
    assert keys[:7] == ["A", "A", "B", "C", "D", "E", "F"]
    a_firsts = [
        first for key, first in zip(keys, calls.firsts, strict=True) if key == "A"
    ]
    assert a_firsts == list(range(0, 400, 10)), "A's batches in flush order"


async def test_within_a_key_batches_start_in_flush_order_while_keys_alternate() -> None:
    calls = Calls()
    batcher = batcher_of(calls, batch_size=2, max_calls=1)
    entries = [batcher.submit("A", n) for n in range(8)]
    entries += [batcher.submit("B", n) for n in range(100, 108)]
    calls.go.set()
    await within(asyncio.gather(*(entry.future for entry in entries)))
    await within(batcher.drain())

    # A's first call started at its flush; then A and B alternate, A's
    # batches in flush order and B's in flush order; B's last two are
    # alone.
    assert list(zip(calls.keys, calls.firsts, strict=True)) == [
        ("A", 0),
        ("A", 2),
        ("B", 100),
        ("A", 4),
        ("B", 102),
        ("A", 6),
        ("B", 104),
        ("B", 106),
    ]


async def test_a_key_at_its_per_key_limit_lets_others_go_and_keeps_its_place() -> None:
    calls = Calls(hold=True)
    batcher = batcher_of(calls, batch_size=1, max_calls=2, max_calls_per_key=1)
    entries = [batcher.submit(key, value) for key, value in [("A", "a1"), ("A", "a2")]]
    # A is at its limit with a2 waiting: B's batch takes the free slot.
    entries.append(batcher.submit("B", "b1"))
    await within(calls.until(2))
    assert calls.firsts == ["a1", "b1"]
    assert batcher.waiting == 1
    entries += [batcher.submit("C", "c1"), batcher.submit("B", "b2")]
    assert batcher.waiting == 3

    # a2 waited for its turn before c1 flushed: when a1 ends it goes first.
    calls.release(0)
    await within(calls.until(3))
    assert calls.firsts[2] == "a2"
    # b2 flushed after c1: c1 goes before it.
    calls.release(1)
    await within(calls.until(4))
    assert calls.firsts[3] == "c1"
    calls.release_all()
    await within(asyncio.gather(*(entry.future for entry in entries)))
    assert calls.firsts == ["a1", "b1", "a2", "c1", "b2"]
    await within(batcher.drain())


async def test_a_waiting_batch_whose_waiters_were_cancelled_leaves_its_turn() -> None:
    calls = Calls(hold=True)
    batcher = batcher_of(calls, batch_size=1, max_calls=1)
    observer: Any = batcher._observer
    a1, a2, b1, a3, c1 = (
        batcher.submit(value[0].upper(), value)
        for value in ("a1", "a2", "b1", "a3", "c1")
    )
    await within(calls.until(1))
    assert batcher.waiting == 4
    for entry in (a2, b1):  # b1 was all of B's turn
        entry.future.cancel()
        batcher.withdraw(entry)
    assert batcher.waiting == 2
    assert observer.queued.call_args_list[-1].args == ("t", 2)

    calls.release_all()
    await within(asyncio.gather(a1.future, a3.future, c1.future))
    await within(batcher.drain())
    assert calls.firsts == ["a1", "a3", "c1"]
    assert a2.future.cancelled()
    assert b1.future.cancelled()
    assert batcher.waiting == 0
    assert observer.queued.call_args_list[-1].args == ("t", 0)


@pytest.mark.parametrize("seed", range(6))
async def test_under_call_limits_every_batch_runs_once_in_its_keys_flush_order(
    seed: int,
) -> None:
    """Random arrivals, call ends, cancellations and limit changes: none starves."""
    rng = random.Random(seed)
    calls = Calls(hold=True)
    calls.go.set()
    batcher = batcher_of(calls, batch_size=3, max_calls=2, max_calls_per_key=1)
    entries: list[Entry[Any, None]] = []
    cancelled: set[int] = set()
    for value in range(600):
        roll = rng.random()
        if roll < 0.55:
            key = rng.choices("ABCDEF", weights=[10, 1, 1, 1, 2, 3])[0]
            entries.append(batcher.submit(key, value))
        elif roll < 0.85:
            running = [gate for gate in calls.gates if not gate.is_set()]
            if running:
                rng.choice(running).set()
        elif roll < 0.95:
            # An item of an open or waiting batch leaves; half the time, every
            # item of its batch does.
            unstarted = [
                e for e in entries if e.batch.task is None and not e.future.done()
            ]
            if unstarted:
                chosen = rng.choice(unstarted)
                leaving = [chosen]
                if rng.random() < 0.5:
                    leaving = [e for e in chosen.batch.entries if not e.future.done()]
                for entry in leaving:
                    entry.future.cancel()
                    batcher.withdraw(entry)
                    cancelled.add(entry.value)
        else:
            batcher.configure(
                dataclasses.replace(
                    batcher.limits,
                    max_calls=rng.choice([1, 2, 3, None]),
                    max_calls_per_key=rng.choice([1, 2, None]),
                )
            )
        await asyncio.sleep(0)

    calls.release_all()
    await within(batcher.drain())  # flushes the open batches too
    live = [e.future for e in entries if e.value not in cancelled]
    await within(asyncio.gather(*live))
    assert batcher.waiting == 0
    assert batcher.running == 0

    started = calls.started
    assert len(set(map(id, started))) == len(started), "no batch ran twice"
    for key in "ABCDEF":
        flushed = list(dict.fromkeys(e.batch for e in entries if e.batch.key == key))
        ran = [batch for batch in flushed if batch.task is not None]
        assert [b for b in started if b.key == key] == ran, f"{key}: flush order"
        for batch in flushed:
            if batch.task is None:  # dropped: every one of its waiters left
                assert all(e.value in cancelled for e in batch.entries), batch


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
