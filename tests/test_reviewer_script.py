"""Point 10: the upstream reviewer's script finishes, with every result right."""

import asyncio
import logging

import pytest
from taskiq import InMemoryBroker

from batchtask import batch_task


async def test_400_concurrent_items_make_seven_calls_and_400_correct_results() -> None:
    broker = InMemoryBroker()  # taskiq's default keeps only 100 results
    calls: list[int] = []

    @batch_task(broker, batch_size=60, batch_timeout=3, results="per_item")
    async def double(values: list[int]) -> list[int]:
        calls.append(len(values))
        return [2 * v for v in values]

    await broker.startup()
    tasks = await asyncio.gather(*(double.kiq(i) for i in range(400)))
    await asyncio.wait_for(broker.wait_all(), timeout=30)
    results = await asyncio.wait_for(
        asyncio.gather(*(task.wait_result(timeout=10) for task in tasks)), timeout=60
    )

    assert sorted(calls) == [40, 60, 60, 60, 60, 60, 60]
    assert [r.return_value for r in results] == [2 * i for i in range(400)]
    await broker.shutdown()


def test_the_default_inmemory_result_cap_is_lifted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = InMemoryBroker()
    with caplog.at_level(logging.INFO, logger="batchtask"):

        @batch_task(broker, batch_size=60, batch_timeout=3)
        async def save(values: list[int]) -> None: ...

    assert broker.result_backend.max_stored_results == -1
    assert "InMemoryBroker result cap lifted" in caplog.text


def test_an_explicit_inmemory_result_cap_is_kept() -> None:
    broker = InMemoryBroker(max_stored_results=5000)

    @batch_task(broker, batch_size=60, batch_timeout=3)
    async def save(values: list[int]) -> None: ...

    assert broker.result_backend.max_stored_results == 5000
