"""``kiq_many``: one message per item, exactly like ``kiq``, sent in bulk."""

from typing import Any

import pytest
from taskiq import InMemoryBroker, TaskiqMessage, TaskiqMiddleware

from batchtask import BatchArgumentError, batch_task, flush_all
from tests.conftest import within
from tests.workers import (
    new_queue,
    processed,
    recorded_calls,
    require_broker,
    serving,
)


class CountSends(TaskiqMiddleware):
    def __init__(self) -> None:
        super().__init__()
        self.pre: list[str] = []
        self.post: list[str] = []

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        self.pre.append(message.task_id)
        message.labels["stamped"] = "yes"
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        self.post.append(message.task_id)


async def test_each_item_is_its_own_message_with_its_own_result() -> None:
    sends = CountSends()
    broker = InMemoryBroker().with_middlewares(sends)
    await broker.startup()
    calls: list[tuple[list[int], str]] = []
    labels: list[str] = []

    @batch_task(broker, batch_size=50, batch_timeout=60, results="per_item")
    async def double(values: list[int], tag: str) -> list[int]:
        calls.append((list(values), tag))
        return [2 * v for v in values]

    class SeeLabels(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            labels.append(message.labels.get("stamped", ""))
            return message

    broker.add_middlewares(SeeLabels())
    tasks = await double.kiq_many(range(10), tag="t")
    await within(flush_all(broker))
    results = [await within(t.wait_result(timeout=10)) for t in tasks]
    await broker.shutdown()

    assert len({t.task_id for t in tasks}) == 10
    assert [r.return_value for r in results] == [2 * i for i in range(10)]
    assert calls == [(list(range(10)), "t")]
    assert sends.pre == sends.post == [t.task_id for t in tasks]
    assert labels == ["yes"] * 10, "pre_send's changes reach the worker"


async def test_bad_arguments_fail_before_anything_is_sent() -> None:
    broker = InMemoryBroker()
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=50, batch_timeout=0.1)
    async def save(values: list[int], table: str) -> None:
        calls.append(values)

    with pytest.raises(BatchArgumentError, match="missing required argument 'table'"):
        await save.kiq_many([1, 2, 3])  # type: ignore[call-arg]  # the point
    await within(flush_all(broker))
    await broker.shutdown()
    assert calls == []


async def test_no_items_send_nothing() -> None:
    broker = InMemoryBroker()

    @batch_task(broker, batch_size=5, batch_timeout=0.1)
    async def save(values: list[int]) -> None:
        raise AssertionError("never called")

    assert await save.kiq_many([]) == []


@pytest.mark.parametrize("kind", ["list", "stream"])
async def test_a_real_worker_gets_every_pipelined_message_once(kind: str) -> None:
    require_broker(kind)
    queue = new_queue()
    async with serving(
        queue,
        BATCHTASK_BROKER=kind,
        BATCHTASK_BATCH_SIZE="100",
        BATCHTASK_BATCH_TIMEOUT="0.3",
    ) as (_, app):
        tasks: list[Any] = await app.double.kiq_many(range(1000), "t")
        results = [await t.wait_result(timeout=60) for t in tasks]
        counts = await processed(queue)
        calls = await recorded_calls(queue)

    assert [r.return_value for r in results] == [2 * i for i in range(1000)]
    assert counts == dict.fromkeys(range(1000), 1), "each item exactly once"
    assert all(len(call) <= 100 for _, call in calls)
