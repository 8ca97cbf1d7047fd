"""BatchReceiver: the batch-size cap lifted with a bound, writes grouped.

In-process tests run taskiq's receiver loop (`Receiver.listen`) against a
real Redis stream; the worker tests start ``taskiq worker --receiver
batchtask:BatchReceiver``.
"""

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from taskiq import TaskiqResult
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq.receiver import Receiver
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from batchtask import BatchReceiver, batch_task, flush_all
from batchtask._checks import receiver_cap_warning
from batchtask._grouping import GroupedResultBackend
from batchtask._lifecycle import buffered_items
from batchtask.brokers import adapter_for
from batchtask.brokers._base import Coalescer
from batchtask.brokers.redis_stream import RedisStream
from tests.conftest import require_server, run_python, within
from tests.faults import OwnRedis, free_port
from tests.workers import (
    RECEIVER,
    REDIS_URL,
    new_queue,
    recorded_calls,
    require_broker,
    serving,
    until,
    worker_log,
)


@dataclass
class Stream:
    """A fresh Redis stream broker with a Redis result backend, started."""

    queue: str
    backend: RedisAsyncResultBackend[Any]
    broker: RedisStreamBroker
    calls: list[list[int]] = field(default_factory=lambda: [])


@pytest.fixture
async def stream() -> AsyncIterator[Stream]:
    require_server("Redis", 6379)
    queue = new_queue()
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        REDIS_URL, result_ex_time=300, prefix_str=queue
    )
    broker = RedisStreamBroker(
        REDIS_URL, queue_name=queue, consumer_group_name=queue
    ).with_result_backend(backend)
    await broker.startup()  # creates the consumer group before anything is kicked
    try:
        yield Stream(queue, backend, broker)
    finally:
        await broker.shutdown()
        client = redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(f"{queue}:*")]
        await client.delete(queue, *keys)
        await client.aclose()


def register(stream: Stream, batch_size: int, batch_timeout: float) -> Any:
    @batch_task(
        stream.broker,
        batch_size=batch_size,
        batch_timeout=batch_timeout,
        results="per_item",
        task_name=f"{stream.queue}:double",
    )
    async def double(values: list[int]) -> list[int]:
        stream.calls.append(list(values))
        return [2 * value for value in values]

    return double


async def pending_acks(stream: Stream) -> int:
    client = redis.from_url(REDIS_URL)
    info = await client.xpending(stream.queue, stream.queue)
    await client.aclose()
    return int(info["pending"])


async def listening(receiver: Receiver, finish: asyncio.Event) -> "asyncio.Task[None]":
    task = asyncio.create_task(receiver.listen(finish))
    await asyncio.sleep(0)  # listen installs its wrappers before its first await
    return task


async def test_batches_fill_past_max_async_tasks_and_writes_are_grouped(
    stream: Stream,
) -> None:
    double = register(stream, batch_size=250, batch_timeout=600)

    @stream.broker.task(task_name=f"{stream.queue}:plain")
    async def plain(value: int) -> int:
        return value + 1

    tasks = await double.kiq_many(range(1000))
    plain_task = await plain.kiq(41)
    receiver = BatchReceiver(stream.broker, max_async_tasks=100, run_startup=False)
    finish = asyncio.Event()
    listener = await listening(receiver, finish)
    grouped = stream.broker.result_backend
    assert isinstance(grouped, GroupedResultBackend)
    results = [await within(t.wait_result(timeout=30), 60) for t in tasks]
    plain_result = await within(plain_task.wait_result(timeout=30), 60)
    finish.set()
    await within(listener, 60)

    assert [len(call) for call in stream.calls] == [250, 250, 250, 250]
    assert [r.return_value for r in results] == [2 * i for i in range(1000)]
    assert not any(r.is_err for r in results)
    assert plain_result.return_value == 42
    assert await pending_acks(stream) == 0, "every message acked"
    assert stream.broker.result_backend is stream.backend, "restored after listen"
    result_rounds = grouped.round_trips
    acks = receiver.adapter
    assert isinstance(acks, RedisStream)
    ack_rounds = acks.round_trips
    print(f"grouped: 1001 results in {result_rounds} writes, {ack_rounds} XACKs")
    # Four batches and one plain task: about one round trip each, not 1001.
    assert result_rounds <= 10
    assert ack_rounds <= 10


async def test_the_stock_receiver_caps_the_same_batches_at_max_async_tasks(
    stream: Stream,
) -> None:
    """The contrast: without BatchReceiver no call gets more than 100 items."""
    double = register(stream, batch_size=250, batch_timeout=0.3)
    tasks = await double.kiq_many(range(400))
    receiver = Receiver(stream.broker, max_async_tasks=100, run_startup=False)
    finish = asyncio.Event()
    listener = await listening(receiver, finish)
    results = [await within(t.wait_result(timeout=60), 90) for t in tasks]
    finish.set()
    await within(listener, 60)

    assert [r.return_value for r in results] == [2 * i for i in range(400)]
    assert max(len(call) for call in stream.calls) <= 100
    assert sum(len(call) for call in stream.calls) == 400


async def test_max_buffered_bounds_the_items_a_worker_holds(stream: Stream) -> None:
    double = register(stream, batch_size=1000, batch_timeout=600)
    await double.kiq_many(range(1000))
    receiver = BatchReceiver(
        stream.broker, max_async_tasks=50, max_buffered="150", run_startup=False
    )
    finish = asyncio.Event()
    listener = await listening(receiver, finish)

    async def holds_200() -> bool:
        return buffered_items(stream.broker) >= 200

    await within(until(holds_200, 30, "200 items buffered"), 60)
    await asyncio.sleep(0.5)  # anything past the bound would arrive now
    held, slot_free = buffered_items(stream.broker), receiver.buffered
    finish.set()
    await asyncio.sleep(0.1)
    await flush_all(stream.broker)
    await within(listener, 60)

    print(f"max_buffered=150, --max-async-tasks 50: held {held}, {slot_free} slot-free")
    assert (held, slot_free) == (200, 150), "150 without a slot + 50 holding one"
    assert [len(call) for call in stream.calls] == [200]


async def test_group_writes_off_leaves_the_result_backend_alone(
    stream: Stream,
) -> None:
    double = register(stream, batch_size=10, batch_timeout=600)
    tasks = await double.kiq_many(range(20))
    receiver = BatchReceiver(
        stream.broker, max_async_tasks=100, group_writes="false", run_startup=False
    )
    finish = asyncio.Event()
    listener = await listening(receiver, finish)
    assert stream.broker.result_backend is stream.backend
    results = [await within(t.wait_result(timeout=30), 60) for t in tasks]
    finish.set()
    await within(listener, 60)
    assert [r.return_value for r in results] == [2 * i for i in range(20)]
    assert await pending_acks(stream) == 0


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("max_buffered", "many", "--receiver_arg max_buffered="),
        ("max_buffered", "-1", "--receiver_arg max_buffered="),
        ("max_buffered", True, "--receiver_arg max_buffered="),
        ("group_writes", "maybe", "--receiver_arg group_writes="),
        ("gc_freeze", "sometimes", "--receiver_arg gc_freeze="),
    ],
)
def test_bad_receiver_settings_are_refused_naming_the_flag(
    setting: str, value: object, message: str
) -> None:
    from taskiq import InMemoryBroker

    with pytest.raises(ValueError, match=message) as caught:
        BatchReceiver(InMemoryBroker(), **{setting: value})
    assert repr(value) in str(caught.value)


def test_receiver_settings_from_the_command_line_are_parsed() -> None:
    from taskiq import InMemoryBroker

    receiver = BatchReceiver(
        InMemoryBroker(), max_buffered="2500", group_writes="False"
    )
    assert (receiver.max_buffered, receiver.group_writes) == (2500, False)


def test_a_batch_above_max_buffered_warns_naming_the_receiver_arg() -> None:
    warning = receiver_cap_warning({"app:save": 500, "app:small": 50}, 100)
    assert warning is not None
    assert "BatchReceiver(max_buffered=100)" in warning
    assert "app:save (batch_size=500)" in warning
    assert "app:small" not in warning
    assert "--receiver_arg max_buffered=500" in warning
    assert receiver_cap_warning({"app:save": 500}, 500) is None
    assert receiver_cap_warning({"app:save": 500}, 0) is None  # no limit at all


# -- the grouping parts alone -------------------------------------------------


class Sent:
    """A `send` for Coalescer that records each round and fails chosen requests."""

    def __init__(self, fail: Callable[[int], BaseException | None]) -> None:
        self.rounds: list[list[int]] = []
        self.fail = fail

    async def __call__(self, requests: list[int]) -> list[BaseException | None]:
        self.rounds.append(list(requests))
        await asyncio.sleep(0)
        return [self.fail(request) for request in requests]


async def test_requests_of_one_loop_turn_are_sent_together_each_with_its_error() -> (
    None
):
    sent = Sent(lambda n: KeyError(n) if n == 2 else None)
    group = Coalescer(sent)
    first = await asyncio.gather(
        *(group.submit(n) for n in range(4)), return_exceptions=True
    )
    second = await asyncio.gather(group.submit(10), return_exceptions=True)
    assert sent.rounds == [[0, 1, 2, 3], [10]]
    assert first[:2] == [None, None]
    assert first[3] is None
    assert isinstance(first[2], KeyError)
    assert first[2].args == (2,)
    assert second == [None]
    assert group.rounds == 2


async def test_a_failed_round_trip_fails_each_caller_with_its_own_exception() -> None:
    async def broken(requests: list[int]) -> list[BaseException | None]:
        raise ConnectionError("redis went away")

    group = Coalescer(broken)
    outcomes = await asyncio.gather(
        *(group.submit(n) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert all(str(o) == "redis went away" for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3, "one exception object per caller"


async def test_a_cancelled_caller_leaves_the_others_of_its_round() -> None:
    release = asyncio.Event()

    async def slow(requests: list[int]) -> list[BaseException | None]:
        await release.wait()
        return [None] * len(requests)

    group = Coalescer(slow)
    waiting = [asyncio.create_task(group.submit(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    waiting[1].cancel()
    release.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], asyncio.CancelledError)


async def test_grouped_results_are_stored_exactly_as_the_backend_stores_them() -> None:
    require_server("Redis", 6379)
    prefix = new_queue()
    for ex, px in ((300, None), (None, 300_000), (None, None)):
        inner: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
            REDIS_URL, result_ex_time=ex, result_px_time=px, prefix_str=prefix
        )
        grouped = GroupedResultBackend(inner)
        result: TaskiqResult[Any] = TaskiqResult(
            is_err=False, return_value={"rows": [1, 2]}, execution_time=0.5
        )
        bad: TaskiqResult[Any] = TaskiqResult(
            is_err=False, return_value=object(), execution_time=0.1
        )
        await inner.set_result("own", result)
        outcomes = await asyncio.gather(
            grouped.set_result("grouped", result),
            grouped.set_result("bad", bad),
            grouped.set_result("grouped2", result),
            return_exceptions=True,
        )
        with pytest.raises(Exception, match="serialize") as own_error:
            await inner.set_result("bad", bad)
        client = redis.from_url(REDIS_URL)
        own, mine, mine2, stored_bad = await client.mget(
            f"{prefix}:own", f"{prefix}:grouped", f"{prefix}:grouped2", f"{prefix}:bad"
        )
        ttls = [await client.pttl(f"{prefix}:{key}") for key in ("own", "grouped")]
        read = await grouped.get_result("grouped")  # reads go to the backend
        await client.delete(f"{prefix}:own", f"{prefix}:grouped", f"{prefix}:grouped2")
        await client.aclose()

        assert grouped.group is not None
        assert grouped.group.rounds == 1
        assert own is not None
        assert mine == own
        assert mine2 == own
        assert outcomes[0] is None
        assert outcomes[2] is None
        assert type(outcomes[1]) is type(own_error.value), "the backend's own error"
        assert stored_bad is None
        expected_ttl = ex is not None or px is not None
        assert [ttl > 0 for ttl in ttls] == [expected_ttl, expected_ttl]
        assert read.return_value == {"rows": [1, 2]}
        await inner.shutdown()


async def test_other_result_backends_are_called_as_before() -> None:
    inner: InmemoryResultBackend[Any] = InmemoryResultBackend()
    grouped = GroupedResultBackend(inner)
    result: TaskiqResult[Any] = TaskiqResult(
        is_err=False, return_value=3, execution_time=0.0
    )
    await grouped.set_result("a", result)
    assert grouped.group is None
    assert await inner.is_result_ready("a")
    assert (await grouped.get_result("a")).return_value == 3
    assert grouped.max_stored_results == inner.max_stored_results  # attributes too


async def test_only_this_stream_brokers_own_acks_are_grouped() -> None:
    broker = RedisStreamBroker(REDIS_URL, queue_name="q")
    other = RedisStreamBroker(REDIS_URL, queue_name="q")
    ack = broker._ack_generator(id="1-0", queue_name="q")  # pyright: ignore[reportPrivateUsage]
    acks = adapter_for(broker)
    assert isinstance(acks, RedisStream)
    assert acks.target(ack) == ("q", "1-0")
    assert RedisStream(other).target(ack) is None
    assert acks.target(lambda: None) is None
    assert acks.grouped(ack) is not None
    assert acks.grouped(lambda: None) is None
    from taskiq import InMemoryBroker

    assert not isinstance(adapter_for(InMemoryBroker()), RedisStream)


# -- real workers ---------------------------------------------------------------


async def test_a_default_worker_with_the_receiver_fills_batches_of_500() -> None:
    require_broker("stream")
    queue = new_queue()
    async with serving(
        queue,
        *RECEIVER,
        BATCHTASK_BROKER="stream",
        BATCHTASK_BATCH_SIZE="500",
        BATCHTASK_BATCH_TIMEOUT="60",
    ) as (worker, app):
        tasks = await app.double.kiq_many(range(1000), "t")
        results = [await t.wait_result(timeout=60) for t in tasks]
        calls = await recorded_calls(queue)
        client = redis.from_url(REDIS_URL)
        pending = await client.xpending(queue, queue)
        await client.aclose()
        log = worker_log(worker)

    assert [len(values) for _, values in calls] == [500, 500]
    assert [r.return_value for r in results] == [2 * i for i in range(1000)]
    assert pending["pending"] == 0
    assert "batchtask:" not in log, "no cap warning"


async def test_a_worker_warns_when_max_buffered_is_below_a_batch_size() -> None:
    require_broker("stream")
    queue = new_queue()
    async with serving(
        queue,
        *RECEIVER,
        "--receiver_arg",
        "max_buffered=200",
        BATCHTASK_BROKER="stream",
        BATCHTASK_BATCH_SIZE="500",
    ) as (worker, _):
        log = worker_log(worker)
    assert "BatchReceiver(max_buffered=200)" in log
    assert "app:double (batch_size=500)" in log
    assert "--receiver_arg max_buffered=500" in log


async def test_a_bad_receiver_arg_stops_the_worker_with_the_reason() -> None:
    require_broker("stream")
    from tests.workers import app_env, kill, start_worker

    queue = new_queue()
    with app_env(queue, BATCHTASK_BROKER="stream") as env:
        worker = start_worker(
            env,
            "--workers",
            "1",
            *RECEIVER,
            "--receiver_arg",
            "max_buffered=lots",
        )
    reason = "max_buffered must be a whole number >= 0, got 'lots'"

    async def refused() -> bool:
        return reason in worker_log(worker)

    try:
        await within(until(refused, 60, "the worker to log the reason"), 90)
    finally:
        kill(worker)


def test_the_start_up_warning_knows_what_the_receiver_lifts() -> None:
    """max_buffered=0 lifts nothing: the stock --max-async-tasks warning applies."""
    from taskiq import InMemoryBroker

    from batchtask import _lifecycle

    broker = InMemoryBroker()
    BatchReceiver(broker, max_async_tasks=100, max_buffered=300)
    assert _lifecycle._receiver_limits.get(broker) == 300  # pyright: ignore[reportPrivateUsage]
    BatchReceiver(broker, max_async_tasks=100, max_buffered=0)
    assert broker not in _lifecycle._receiver_limits  # pyright: ignore[reportPrivateUsage]
    BatchReceiver(broker, max_async_tasks=0)
    assert _lifecycle._receiver_limits.get(broker) == 0  # pyright: ignore[reportPrivateUsage]


async def test_a_stock_worker_groups_a_batchs_writes_and_names_the_receiver(
    tmp_path: Path,
) -> None:
    """Without --receiver: results in one pipeline, one XACK per batch, one note.

    The worker's broker and result backend are on a Redis server of the test's
    own, so its command counts are this worker's alone.
    """
    require_broker("stream")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    queue = new_queue()
    own = OwnRedis(free_port(), tmp_path)
    await own.start()
    url = f"redis://127.0.0.1:{own.port}"
    client = redis.from_url(url)

    async def commands() -> dict[str, int]:
        stats = await client.info("commandstats")
        return {
            name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in ("xack", "set")
        }

    try:
        async with serving(
            queue,
            BATCHTASK_BROKER="stream",
            BATCHTASK_BATCH_SIZE="50",
            BATCHTASK_BATCH_TIMEOUT="60",
            BATCHTASK_BROKER_URL=url,
            BATCHTASK_RESULTS_URL=url,
        ) as (worker, app):
            before = await commands()
            tasks = await app.double.kiq_many(range(400), "t")
            results = [await within(t.wait_result(timeout=60), 90) for t in tasks]
            after = await commands()
            pending = await client.xpending(queue, queue)
            log = worker_log(worker)
        await client.aclose()
    finally:
        own.kill()

    xacks, sets = (after[name] - before[name] for name in ("xack", "set"))
    print(f"stock worker, 400 items in batches of 50: {xacks} XACK, {sets} SET calls")
    assert [r.return_value for r in results] == [2 * i for i in range(400)]
    assert pending["pending"] == 0
    assert log.count("--receiver batchtask:BatchReceiver for the batch-native") == 1
    # A SET per result either way (pipelined when grouped); XACKs one per batch
    # (taskiq acks one message per XACK): far fewer than 400.
    assert sets >= 400
    assert xacks <= 400 // 50 * 4, "acks grouped per batch, not one per message"


def test_freezing_the_heap_happens_once_per_process() -> None:
    """A fresh interpreter: nothing frozen before, the start-up heap after."""
    script = (
        "import gc\n"
        "from batchtask.worker import freeze_heap\n"
        "assert gc.get_freeze_count() == 0\n"
        "frozen = freeze_heap()\n"
        "assert frozen == gc.get_freeze_count() > 1000, frozen\n"
        "garbage = [[] for _ in range(100)]\n"
        "assert freeze_heap() == frozen == gc.get_freeze_count()\n"
        "print(frozen)\n"
    )
    assert int(run_python(script)) > 1000


@pytest.mark.parametrize(
    ("flag", "frozen"), [((), True), (("gc_freeze=false",), False)]
)
async def test_a_worker_freezes_its_start_up_heap_unless_told_not_to(
    flag: tuple[str, ...], frozen: bool
) -> None:
    require_broker("stream")
    queue = new_queue()
    receiver_args = [arg for value in flag for arg in ("--receiver_arg", value)]
    async with serving(
        queue,
        *RECEIVER,
        *receiver_args,
        "--log-level",
        "DEBUG",
        BATCHTASK_BROKER="stream",
    ) as (worker, app):
        tasks = await app.double.kiq_many(range(10), "t")
        results = [await t.wait_result(timeout=60) for t in tasks]
        log = worker_log(worker)
    assert [r.return_value for r in results] == [2 * i for i in range(10)]
    assert ("objects from start-up frozen (gc.freeze)" in log) is frozen
