"""Poison items: bisection cost, no bisection, and retrying failed items."""

import asyncio
import math
from collections import Counter
from typing import Any

import pytest
from taskiq import AsyncTaskiqTask, InMemoryBroker, TaskiqMessage
from taskiq.abc.middleware import TaskiqMiddleware
from taskiq.middlewares import SmartRetryMiddleware
from taskiq.result import TaskiqResult

from batchtask import BatchCallError, PartialFailure, batch_task, flush_all
from tests.conftest import within

N = 100


async def _kiq_all(task: Any, values: list[int]) -> list[AsyncTaskiqTask[Any]]:
    """Kick every value concurrently, so they can share one batch."""
    return list(await within(asyncio.gather(*(task.kiq(v) for v in values)), 30))


async def _wait_all(tasks: list[AsyncTaskiqTask[Any]]) -> list[TaskiqResult[Any]]:
    return [await within(t.wait_result(timeout=30), 30) for t in tasks]


@pytest.mark.parametrize("poison", [{37}, {0, 50, 99}], ids=["k=1", "k=3"])
async def test_bisect_isolates_poison_items_in_a_full_batch_of_100(
    broker: InMemoryBroker, poison: set[int]
) -> None:
    calls: list[list[int]] = []
    successful_calls: list[list[int]] = []
    raised: dict[tuple[int, ...], ValueError] = {}

    @batch_task(
        broker,
        batch_size=N,
        batch_timeout=60,
        results="per_item",
        bisect_on_error=True,
    )
    async def save(values: list[int]) -> list[int]:
        calls.append(list(values))
        bad = sorted(poison.intersection(values))
        if bad:
            error = ValueError(f"poison {bad}")
            raised[tuple(values)] = error
            raise error
        successful_calls.append(list(values))
        return [v * 10 + 1 for v in values]

    tasks = await _kiq_all(save, list(range(N)))
    results = await _wait_all(tasks)

    k = len(poison)
    extra = len(calls) - 1
    bound = 2 * k * math.ceil(math.log2(N))
    positions = sorted(calls[0].index(p) for p in poison)
    print(
        f"\nbisect n={N} k={k} poison={sorted(poison)} at positions {positions}: "
        f"{len(calls)} calls ({extra} extra, bound {bound})"
    )

    assert sorted(calls[0]) == list(range(N)), "the first call got the full batch"
    assert extra <= bound
    for value, result in enumerate(results):
        if value in poison:
            # The item's error is the very ValueError its own one-item call
            # raised: batchtask passes an Exception through unwrapped.
            assert result.is_err
            assert type(result.error) is ValueError
            assert result.error is raised[(value,)]
            assert str(result.error) == f"poison [{value}]"
        else:
            assert not result.is_err, (value, result.error)
            assert result.return_value == value * 10 + 1
    # Every good item was in exactly one successful call; no poison item was.
    in_successes = Counter(v for call in successful_calls for v in call)
    assert in_successes == Counter(v for v in range(N) if v not in poison)
    # Each poison item was finally called alone.
    assert all([p] in calls for p in poison)


async def test_without_bisect_one_poison_item_fails_the_whole_batch(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []
    raised: list[ValueError] = []

    @batch_task(broker, batch_size=N, batch_timeout=60, results="per_item")
    async def save(values: list[int]) -> list[int]:
        calls.append(list(values))
        if 37 in values:
            error = ValueError("poison 37")
            raised.append(error)
            raise error
        return [v * 10 for v in values]

    tasks = await _kiq_all(save, list(range(N)))
    results = await _wait_all(tasks)

    print(f"\nno bisect n={N} k=1: {len(calls)} call(s)")
    assert len(calls) == 1
    assert sorted(calls[0]) == list(range(N))
    assert len(raised) == 1
    for result in results:
        assert result.is_err
        # The function's own exception, not wrapped in BatchCallError.
        assert result.error is raised[0]
        assert not isinstance(result.error, BatchCallError)
        assert result.error.__cause__ is None
        assert result.return_value is None


class Recorder(TaskiqMiddleware):
    def __init__(self) -> None:
        super().__init__()
        self.executed: Counter[str] = Counter()
        self.saved: Counter[str] = Counter()

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self.executed[message.task_id] += 1
        return message

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.saved[message.task_id] += 1


async def test_smart_retry_middleware_retries_only_partial_failures_later() -> None:
    recorder = Recorder()
    broker = InMemoryBroker().with_middlewares(
        SmartRetryMiddleware(default_retry_count=3, default_delay=0, use_jitter=False),
        recorder,
    )
    await broker.startup()
    try:
        calls: list[list[int]] = []
        attempts: dict[int, list[int]] = {}  # item -> indexes of its calls
        failing = {0, 3, 6, 9}

        @batch_task(
            broker,
            batch_size=12,
            batch_timeout=0.2,
            results="per_item",
            retry_on_error=True,
        )
        async def flaky(values: list[int]) -> list[int]:
            call_index = len(calls)
            calls.append(list(values))
            errors: dict[int, BaseException] = {}
            for index, value in enumerate(values):
                attempts.setdefault(value, []).append(call_index)
                if value in failing and len(attempts[value]) == 1:
                    errors[index] = RuntimeError(f"transient {value}")
            results = [v * 10 for v in values]
            if errors:
                raise PartialFailure(errors, results=results)
            return results

        tasks = await _kiq_all(flaky, list(range(12)))
        results = await _wait_all(tasks)
        await within(flush_all(broker), 30)

        print(f"\nsmart retry: calls {calls}")
        assert sorted(calls[0]) == list(range(12))
        for value, (task, result) in enumerate(zip(tasks, results, strict=True)):
            # wait_result gives the retry's success: the failed first attempt
            # stored nothing (NoResultError), the retry reused the task id.
            assert not result.is_err, (value, result.error)
            assert result.return_value == value * 10
            assert recorder.saved[task.task_id] == 1
            if value in failing:
                first, second = attempts[value]
                assert second > first, "retried in a later call"
                assert recorder.executed[task.task_id] == 2
                assert int(result.labels["_retries"]) == 1
            else:
                assert len(attempts[value]) == 1
                assert recorder.executed[task.task_id] == 1
                assert "_retries" not in result.labels
        assert sorted(v for call in calls[1:] for v in call) == sorted(failing)
    finally:
        await within(broker.wait_all(), 30)
        await broker.shutdown()
