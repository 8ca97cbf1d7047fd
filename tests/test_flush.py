"""Points 3 and 8: batches flush on size, on timeout, at shutdown and on request."""

import asyncio

from taskiq import InMemoryBroker

from batchtask import batch_task, flush_all
from tests.conftest import within


async def test_a_full_batch_is_called_without_waiting_for_its_timeout(
    broker: InMemoryBroker,
) -> None:
    loop = asyncio.get_running_loop()
    calls: list[tuple[int, float]] = []

    @batch_task(broker, batch_size=5, batch_timeout=60)
    async def save(ids: list[int]) -> int:
        calls.append((len(ids), loop.time()))
        return len(ids)

    started = loop.time()
    tasks = await asyncio.gather(*(save.kiq(i) for i in range(10)))
    results = await within(asyncio.gather(*(t.wait_result(timeout=30) for t in tasks)))

    assert [size for size, _ in calls] == [5, 5]
    assert all(result.return_value == 5 for result in results)
    # Far below the 60 s timeout: these batches were flushed by size.
    assert all(at - started < 30 for _, at in calls)


async def test_a_partial_batch_is_called_batch_timeout_after_its_first_item(
    broker: InMemoryBroker,
) -> None:
    loop = asyncio.get_running_loop()
    calls: list[tuple[list[int], float]] = []

    @batch_task(broker, batch_size=100, batch_timeout=0.3)
    async def save(ids: list[int]) -> None:
        calls.append((ids, loop.time()))

    first = loop.time()
    await save.kiq(1)
    await asyncio.sleep(0.1)
    await save.kiq(2)
    await within(broker.wait_all())

    assert [ids for ids, _ in calls] == [[1, 2]]
    waited = calls[0][1] - first
    assert waited >= 0.3, "the timer starts at the first item and is not cut short"


async def test_items_arriving_after_a_flush_start_a_new_batch(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=3, batch_timeout=0.2)
    async def save(ids: list[int]) -> None:
        calls.append(ids)

    for i in range(7):
        await save.kiq(i)
    await within(broker.wait_all())
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]


async def test_flush_all_runs_partial_batches_at_once(broker: InMemoryBroker) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def save(ids: list[int]) -> int:
        calls.append(ids)
        return sum(ids)

    tasks = [await save.kiq(i) for i in range(4)]
    await within(flush_all(broker), seconds=10)

    assert calls == [[0, 1, 2, 3]]
    for task in tasks:
        assert (await task.get_result()).return_value == 6


async def test_flush_all_also_flushes_items_that_arrive_while_it_waits(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def follow_up(ids: list[int]) -> None:
        calls.append(ids)

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def first(ids: list[int]) -> None:
        calls.append(ids)
        for i in ids:
            await follow_up.kiq(i + 100)

    await first.kiq(1)
    await first.kiq(2)
    await within(flush_all(broker), seconds=10)
    await within(flush_all(broker), seconds=10)
    assert calls == [[1, 2], [101, 102]]


async def test_await_inplace_runs_each_kiq_as_a_batch_of_one() -> None:
    broker = InMemoryBroker(await_inplace=True)
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def save(ids: list[int]) -> int:
        calls.append(ids)
        return ids[0] * 10

    task = await within(save.kiq(7), seconds=10)
    assert calls == [[7]]
    assert (await task.get_result()).return_value == 70
    await broker.shutdown()


async def test_graceful_shutdown_runs_every_buffer_at_once() -> None:
    broker = InMemoryBroker()
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def save(ids: list[int], table: str) -> int:
        calls.append(ids)
        return len(ids)

    tasks = [await save.kiq(i, "a" if i % 2 else "b") for i in range(6)]
    await asyncio.sleep(0)  # let the messages reach their buffers
    await within(broker.shutdown(), seconds=10)

    assert sorted(calls) == [[0, 2, 4], [1, 3, 5]]
    for task in tasks:
        assert (await task.get_result()).return_value == 3


async def test_items_arriving_during_shutdown_are_not_held_for_the_timer() -> None:
    broker = InMemoryBroker()
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def save(ids: list[int]) -> None:
        calls.append(ids)

    await within(broker.shutdown(), seconds=10)  # nothing buffered yet
    await save.kiq(1)
    await save.kiq(2)
    await within(broker.wait_all(), seconds=10)
    assert calls == [[1, 2]]


async def test_a_new_startup_batches_by_size_and_timeout_again() -> None:
    broker = InMemoryBroker()
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=2, batch_timeout=3600)
    async def save(ids: list[int]) -> None:
        calls.append(ids)

    await save.kiq(0)
    await asyncio.sleep(0)
    await within(broker.shutdown(), seconds=10)  # runs [0] at once
    await broker.startup()
    for i in range(1, 5):
        await save.kiq(i)
    await within(broker.wait_all(), seconds=10)
    assert calls == [[0], [1, 2], [3, 4]]
    await broker.shutdown()


def test_a_worker_whose_max_async_tasks_caps_a_batch_warns_naming_the_flag() -> None:
    from batchtask._checks import capped_batch_warning

    sizes = {"app:save": 500, "app:small": 50}
    warning = capped_batch_warning(sizes, ["worker", "app:broker"])
    assert warning is not None
    assert "--max-async-tasks=100" in warning
    assert "app:save (batch_size=500)" in warning
    assert "app:small" not in warning
    assert "Fix: start the worker with --receiver batchtask:BatchReceiver" in warning
    assert "or with --max-async-tasks 500 or more" in warning
    assert (
        capped_batch_warning(
            sizes, ["worker", "app:broker", "--max-async-tasks", "600"]
        )
        is None
    )
    assert capped_batch_warning(sizes, ["pytest"]) is None


def test_closed_event_loops_and_their_brokers_are_released() -> None:
    """Batchers refer to their loop; batchtask must still let old loops go."""
    import gc
    import weakref

    brokers: list[weakref.ref[InMemoryBroker]] = []

    async def one_run() -> None:
        broker = InMemoryBroker()
        brokers.append(weakref.ref(broker))
        await broker.startup()

        @batch_task(broker, batch_size=10, batch_timeout=0.01)
        async def count(items: list[int]) -> int:
            return len(items)

        for i in range(30):
            await count.kiq(i)
        await broker.wait_all()
        await broker.shutdown()

    for _ in range(20):
        asyncio.run(one_run())
    gc.collect()
    alive = sum(ref() is not None for ref in brokers)
    assert alive <= 1, f"{alive} of 20 finished runs' brokers are still alive"


def test_a_batch_timeout_past_the_brokers_redelivery_time_warns() -> None:
    from nats.js.api import ConsumerConfig
    from taskiq import InMemoryBroker
    from taskiq_nats import PullBasedJetStreamBroker
    from taskiq_redis import ListQueueBroker, RedisStreamBroker

    from batchtask._checks import redelivery_warning

    timeouts = {"app:save": 10.0, "app:quick": 0.5}
    stream = RedisStreamBroker("redis://127.0.0.1:6379", idle_timeout=5000)
    warning = redelivery_warning(stream, timeouts)
    assert warning is not None
    assert "RedisStreamBroker(idle_timeout=5000)" in warning
    assert "for 5 s" in warning
    assert "app:save (batch_timeout=10)" in warning
    assert "app:quick" not in warning
    assert (
        redelivery_warning(RedisStreamBroker("redis://127.0.0.1:6379"), timeouts)
        is None
    )

    nats = PullBasedJetStreamBroker(
        "nats://127.0.0.1:4222", consumer_config=ConsumerConfig(ack_wait=8)
    )
    nats_warning = redelivery_warning(nats, timeouts)
    assert nats_warning is not None
    assert "ack_wait=8" in nats_warning
    default_nats = PullBasedJetStreamBroker("nats://127.0.0.1:4222")
    assert redelivery_warning(default_nats, {"app:slow": 45.0}) is not None  # 30 s
    assert redelivery_warning(default_nats, timeouts) is None

    assert (
        redelivery_warning(ListQueueBroker("redis://127.0.0.1:6379"), timeouts) is None
    )
    assert redelivery_warning(InMemoryBroker(), timeouts) is None
