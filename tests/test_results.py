"""Point 5: shared and per-item results, failures and PartialFailure."""

import asyncio

import pytest
from taskiq import InMemoryBroker

from batchtask import (
    BatchCallError,
    BatchResultError,
    PartialFailure,
    batch_task,
    flush_all,
)
from tests.conftest import within


async def _results(broker: InMemoryBroker, tasks: list) -> list:  # type: ignore[type-arg]
    await within(flush_all(broker))
    return [await task.get_result() for task in tasks]


async def test_shared_mode_stores_the_return_value_under_every_task_id(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def count(ids: list[int]) -> int:
        return len(ids)

    tasks = [await count.kiq(i) for i in range(4)]
    results = await _results(broker, tasks)
    assert len({task.task_id for task in tasks}) == 4
    assert [r.return_value for r in results] == [4, 4, 4, 4]
    assert not any(r.is_err for r in results)


async def test_per_item_mode_gives_item_i_element_i(broker: InMemoryBroker) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5, results="per_item")
    async def square(values: list[int]) -> list[int]:
        return [v * v for v in values]

    tasks = [await square.kiq(i) for i in range(6)]
    results = await _results(broker, tasks)
    assert [r.return_value for r in results] == [0, 1, 4, 9, 16, 25]


@pytest.mark.parametrize("returned", [[1], [1, 2, 3, 4], 7, "ab", {"a": 1}])
async def test_per_item_mode_with_a_wrong_result_fails_every_item(
    broker: InMemoryBroker, returned: object
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5, results="per_item")
    async def broken(values: list[int]) -> object:
        return returned

    tasks = [await broken.kiq(i) for i in range(2)]
    results = await _results(broker, tasks)
    for result in results:
        assert result.is_err
        assert isinstance(result.error, BatchResultError)
        assert "results='per_item' and got 2 item(s)" in str(result.error)
        assert "return a list with exactly one result per item" in str(result.error)


async def test_a_raising_call_fails_all_its_items_with_that_exception(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def explode(values: list[int], table: str) -> None:
        if table == "bad":
            raise ValueError(f"cannot write {values}")

    bad = [await explode.kiq(i, "bad") for i in range(3)]
    good = [await explode.kiq(i, "good") for i in range(2)]
    results = await _results(broker, bad + good)
    errors = [r.error for r in results[:3]]
    assert all(
        isinstance(e, ValueError) and str(e) == "cannot write [0, 1, 2]" for e in errors
    )
    assert not any(r.is_err for r in results[3:])


async def test_partial_failure_fails_only_the_named_items_shared(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(values: list[int]) -> str:
        errors = {i: ValueError(f"odd {v}") for i, v in enumerate(values) if v % 2}
        raise PartialFailure(errors, results="saved")

    tasks = [await save.kiq(v) for v in range(5)]
    results = await _results(broker, tasks)
    assert [r.return_value for r in results if not r.is_err] == ["saved"] * 3
    assert [str(r.error) for r in results if r.is_err] == ["odd 1", "odd 3"]


async def test_partial_failure_fails_only_the_named_items_per_item(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5, results="per_item")
    async def parse(texts: list[str]) -> list[int]:
        values: list[int] = []
        errors: dict[int, BaseException] = {}
        for index, text in enumerate(texts):
            try:
                values.append(int(text))
            except ValueError as exc:
                values.append(0)
                errors[index] = exc
        if errors:
            raise PartialFailure(errors, results=values)
        return values

    tasks = [await parse.kiq(t) for t in ["1", "x", "3"]]
    r1, r2, r3 = await _results(broker, tasks)
    assert (r1.return_value, r3.return_value) == (1, 3)
    assert isinstance(r2.error, ValueError)


async def test_partial_failure_with_an_index_outside_the_batch_fails_every_item(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(values: list[int]) -> None:
        raise PartialFailure({len(values): ValueError("off by one")})

    tasks = [await save.kiq(v) for v in range(2)]
    for result in await _results(broker, tasks):
        assert isinstance(result.error, BatchResultError)
        assert "names index(es) [2], but the call got 2 item(s)" in str(result.error)


def test_partial_failure_rejects_a_mapping_that_is_not_index_to_exception() -> None:
    with pytest.raises(TypeError, match="index '0' is not an int"):
        PartialFailure({"0": ValueError()})  # type: ignore[dict-item]  # the bad key is the point
    with pytest.raises(TypeError, match="index 0 maps to 'oops'"):
        PartialFailure({0: "oops"})  # type: ignore[dict-item]  # the bad value is the point


async def test_bisect_isolates_the_failing_item(broker: InMemoryBroker) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=8, batch_timeout=5, bisect_on_error=True)
    async def save(values: list[int]) -> int:
        calls.append(values)
        if 5 in values:
            raise ValueError("5 is poison")
        return len(values)

    tasks = [await save.kiq(v) for v in range(8)]
    results = await _results(broker, tasks)
    assert [r.is_err for r in results] == [v == 5 for v in range(8)]
    assert str(results[5].error) == "5 is poison"
    # 1 first call + at most 2 per level of the bisection tree (log2(8) = 3)
    assert len(calls) <= 1 + 2 * 3
    assert calls[0] == list(range(8))


async def test_cancelled_error_raised_inside_fails_the_items_and_the_worker_serves_on(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def odd(values: list[int]) -> int:
        if values == [0, 1]:
            raise asyncio.CancelledError("from inside")
        return sum(values)

    tasks = [await odd.kiq(v) for v in range(2)]
    results = await _results(broker, tasks)
    for result in results:
        assert isinstance(result.error, BatchCallError)
        assert "raised CancelledError" in str(result.error)
        assert isinstance(result.error.__cause__, asyncio.CancelledError)

    later = [await odd.kiq(v) for v in (5, 6)]
    assert [r.return_value for r in await _results(broker, later)] == [11, 11]


async def test_keyboard_interrupt_raised_inside_a_sync_function_is_contained(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    def stubborn(values: list[int]) -> None:
        raise KeyboardInterrupt

    tasks = [await stubborn.kiq(v) for v in range(2)]
    for result in await _results(broker, tasks):
        assert isinstance(result.error, BatchCallError)
        assert isinstance(result.error.__cause__, KeyboardInterrupt)


async def test_wait_result_parses_per_item_results_to_the_element_type(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5, results="per_item")
    async def halve(values: list[int]) -> list[float]:
        return [v / 2 for v in values]

    assert halve.return_type is float
    task = await halve.kiq(3)
    await within(flush_all(broker))
    assert (await task.wait_result(timeout=5)).return_value == 1.5
