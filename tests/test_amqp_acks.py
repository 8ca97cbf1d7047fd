"""AMQP acks of a batch: one ``basic.ack(multiple=True)``, never over unfinished."""

import uuid
from typing import Any

import aio_pika
import pytest
from taskiq import InMemoryBroker
from taskiq.acks import AckController
from taskiq_aio_pika import AioPikaBroker, Exchange, Queue
from taskiq_redis import RedisAsyncResultBackend

from batchtask import BatchReceiver, batch_task
from batchtask.brokers.amqp import Amqp
from tests.conftest import require_server, results_through

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class FakeChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append((delivery_tag, multiple))


class FakeMessage:
    """Looks like an aio-pika delivery to the tracker."""

    def __init__(self, channel: FakeChannel, tag: int) -> None:
        self.channel = channel
        self.delivery_tag = tag

    async def ack(self) -> None:
        await self.channel.basic_ack(self.delivery_tag)


FakeMessage.__module__ = "aio_pika.message"


async def test_a_batch_is_acked_with_one_frame_unless_an_older_delivery_is_open() -> (
    None
):
    channel = FakeChannel()
    acks = Amqp(InMemoryBroker())
    messages = [FakeMessage(channel, tag) for tag in range(1, 11)]
    assert all(acks.delivered(m.ack) for m in messages)

    def pairs(tags: list[int]) -> list[tuple[AckController, Any]]:
        return [(AckController(messages[t - 1].ack), messages[t - 1].ack) for t in tags]

    first = pairs([1, 2, 3])
    assert await acks.ack_many(first) == [None, None, None]
    assert channel.frames == [(3, True)]
    assert all(controller.is_acked for controller, _ in first)

    # 4 is unfinished: 5 and 6 are acked alone, not covered by a multiple ack.
    await acks.ack_many(pairs([6, 5]))
    assert channel.frames[1:] == [(5, False), (6, False)]
    # 4 finishes: a multiple ack up to 4 covers nothing already acked.
    await acks.ack_many(pairs([4]))
    assert channel.frames[3:] == [(4, True)]
    # 7..10: one frame.
    await acks.ack_many(pairs([8, 7, 10, 9]))
    assert channel.frames[4:] == [(10, True)]
    # Already acked: nothing more is sent.
    done = pairs([10])
    done[0][0].is_acked = True
    await acks.ack_many(done)
    assert len(channel.frames) == 5


async def test_deliveries_noted_out_of_tag_order_are_never_covered_unfinished() -> None:
    """Two consumers of one channel (the queue and a fleet inbox) merged: a
    delivery numbered earlier may reach the worker later. A multiple ack
    covers by tag, so the run starts at the lowest unacked tag."""
    channel = FakeChannel()
    acks = Amqp(InMemoryBroker())
    messages = {tag: FakeMessage(channel, tag) for tag in (1, 2, 3, 4)}
    for tag in (2, 3, 1, 4):  # 1 arrives after 2 and 3
        assert acks.delivered(messages[tag].ack)

    def pairs(tags: list[int]) -> list[tuple[AckController, Any]]:
        return [(AckController(messages[t].ack), messages[t].ack) for t in tags]

    await acks.ack_many(pairs([2, 3]))
    assert channel.frames == [(2, False), (3, False)], "1 is still unfinished"
    await acks.ack_many(pairs([1, 4]))
    assert channel.frames[2:] == [(4, True)]


async def test_a_multiple_ack_never_covers_a_delivery_the_worker_has_not_seen() -> None:
    """The queue's deliveries reach the worker through more hops than an
    inbox's: tag 1 may still be on its way when 2 and 3, noted, are acked.
    ``basic.ack(3, multiple=True)`` would ack 1 unfinished, and RabbitMQ
    closes the channel when 1's own ack comes (an unknown tag)."""
    channel = FakeChannel()
    acks = Amqp(InMemoryBroker())
    messages = {tag: FakeMessage(channel, tag) for tag in range(1, 7)}

    def pairs(tags: list[int]) -> list[tuple[AckController, Any]]:
        return [(AckController(messages[t].ack), messages[t].ack) for t in tags]

    for tag in (2, 3):
        acks.delivered(messages[tag].ack)
    await acks.ack_many(pairs([2, 3]))
    assert channel.frames == [(2, False), (3, False)], "1 was never seen"
    acks.delivered(messages[1].ack)
    acks.delivered(messages[4].ack)
    await acks.ack_many(pairs([1, 4]))
    assert channel.frames[2:] == [(4, True)], "1..4 seen: one frame again"
    # 5 is handed back unseen (an inbox reader stopped); 6 is noted.
    acks.handed_back(messages[5].ack)
    acks.delivered(messages[6].ack)
    await acks.ack_many(pairs([6]))
    assert channel.frames[3:] == [(6, True)], "a handed-back tag holds no gap"


async def test_a_tag_never_noted_stops_multiple_acks_only_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tag the tracker never hears of (settled outside it) would make every
    later ack a frame of its own, and its later tags a growing set; after
    `GAP_GIVEN_UP_AFTER` tags past it, it is taken as settled."""
    import batchtask.brokers.amqp as amqp

    monkeypatch.setattr(amqp, "GAP_GIVEN_UP_AFTER", 4)
    channel = FakeChannel()
    acks = Amqp(InMemoryBroker())
    messages = {tag: FakeMessage(channel, tag) for tag in range(1, 12)}

    def pairs(tags: list[int]) -> list[tuple[AckController, Any]]:
        return [(AckController(messages[t].ack), messages[t].ack) for t in tags]

    for tag in (2, 3):  # 1 is never noted
        acks.delivered(messages[tag].ack)
    await acks.ack_many(pairs([2, 3]))
    assert channel.frames == [(2, False), (3, False)]
    for tag in range(4, 12):
        acks.delivered(messages[tag].ack)
    await acks.ack_many(pairs(list(range(4, 12))))
    assert channel.frames[2:] == [(11, True)], "the gap was given up"


@pytest.mark.parametrize("slow_key", [False, True], ids=["one key", "a slow key"])
async def test_a_rabbitmq_worker_acks_batches_in_few_frames_and_leaves_nothing(
    slow_key: bool,
) -> None:
    """A slow key keeps old deliveries open: later ones are then acked alone."""
    require_server("RabbitMQ", 5672)
    require_server("Redis", 6379)
    name = f"batchtask-test-{uuid.uuid4().hex[:8]}"
    broker = AioPikaBroker(
        AMQP_URL, qos=1000, exchange=Exchange(name=name), task_queues=[Queue(name=name)]
    ).with_result_backend(
        RedisAsyncResultBackend[Any](
            "redis://127.0.0.1:6379", result_ex_time=300, prefix_str=name
        )
    )
    calls: list[int] = []

    @batch_task(broker, batch_size=100, batch_timeout=0.2, results="per_item")
    async def double(items: list[int], key: str) -> list[int]:
        calls.append(len(items))
        return [2 * item for item in items]

    @broker.task(task_name=f"{name}:plain")
    async def plain(value: int) -> int:
        return value + 1

    broker.is_worker_process = True  # it opens its consuming channel then
    await broker.startup()
    try:
        tasks = []
        for i in range(1000):
            # A second key that fills slowly keeps older deliveries unfinished.
            key = "slow" if slow_key and i % 97 == 0 else "fast"
            tasks.append(await double.kiq(i, key))
            if i % 50 == 0:
                tasks.append(await plain.kiq(i))
        receiver = BatchReceiver(broker, max_async_tasks=100, run_startup=False)
        results = await results_through(receiver, tasks)
        amqp = receiver.adapter
        assert isinstance(amqp, Amqp)
        frames = amqp.round_trips
    finally:
        await broker.shutdown()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        left = queue.declaration_result.message_count
        await channel.queue_delete(name)
        await channel.exchange_delete(name)

    print(
        f"rabbitmq ({'a slow key' if slow_key else 'one key'}): {len(tasks)} "
        f"deliveries, {frames} basic.ack frames, {left} left"
    )
    expected = [2 * i for i in range(1000)]
    assert [r.return_value for r in results if r.return_value % 2 == 0] == expected
    assert not any(r.is_err for r in results)
    assert sum(calls) == 1000
    assert left == 0, "every delivery acked"
    if not slow_key:
        assert frames < len(tasks) // 4, "batches acked in few frames"
