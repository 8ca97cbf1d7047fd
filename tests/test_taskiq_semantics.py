"""Points 6 and 7: sync functions in threads; taskiq's per-message semantics kept."""

import asyncio
import contextvars
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from taskiq import Context, InMemoryBroker, ScheduleSource, TaskiqDepends, TaskiqMessage
from taskiq.abc.middleware import TaskiqMiddleware
from taskiq.middlewares import SimpleRetryMiddleware
from taskiq.result import TaskiqResult
from taskiq.scheduler.scheduled_task import ScheduledTask

from batchtask import PartialFailure, batch_task, flush_all
from tests.conftest import within

request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "request_id", default="-"
)


async def test_sync_functions_run_in_a_thread_without_blocking_the_loop(
    broker: InMemoryBroker,
) -> None:
    seen: list[tuple[str, str, list[int]]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    def slow(values: list[int]) -> int:
        time.sleep(0.3)
        seen.append((threading.current_thread().name, request_id.get(), values))
        return sum(values)

    request_id.set("req-7")
    tasks = [await slow.kiq(v) for v in (1, 2)]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await within(flush_all(broker))
    ticker.cancel()

    thread, context_value, values = seen[0]
    assert thread != threading.current_thread().name
    assert context_value == "req-7", "contextvars are copied into the thread"
    assert values == [1, 2]
    assert ticks >= 5, "the loop kept running while the function slept"
    assert [(await t.get_result()).return_value for t in tasks] == [3, 3]


async def test_async_functions_run_on_the_loop(broker: InMemoryBroker) -> None:
    threads: list[str] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def fast(values: list[int]) -> None:
        threads.append(threading.current_thread().name)

    await fast.kiq(1)
    await within(flush_all(broker))
    assert threads == [threading.current_thread().name]


class Recorder(TaskiqMiddleware):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self.events.append(("pre_execute", message.task_id))
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.events.append(("post_execute", message.task_id))

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.events.append(("post_save", message.task_id))


async def test_middlewares_run_once_per_message_and_results_are_per_task_id() -> None:
    recorder = Recorder()
    broker = InMemoryBroker().with_middlewares(recorder)
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=3, batch_timeout=5, results="per_item")
    async def double(values: list[int]) -> list[int]:
        calls.append(values)
        return [2 * v for v in values]

    tasks = [await double.kiq(v) for v in range(3)]
    results = [await within(t.wait_result(timeout=10)) for t in tasks]

    assert calls == [[0, 1, 2]]
    assert [r.return_value for r in results] == [0, 2, 4]
    for task in tasks:
        for hook in ("pre_execute", "post_execute", "post_save"):
            assert recorder.events.count((hook, task.task_id)) == 1
    await broker.shutdown()


async def test_retry_middleware_retries_only_failed_items_in_later_batches() -> None:
    broker = InMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=3)
    )
    await broker.startup()
    calls: list[list[int]] = []
    failed_once: set[int] = set()

    @batch_task(
        broker, batch_size=4, batch_timeout=0.2, results="per_item", retry_on_error=True
    )
    async def flaky(values: list[int]) -> list[int]:
        calls.append(values)
        errors: dict[int, BaseException] = {}
        for index, value in enumerate(values):
            if value % 2 and value not in failed_once:
                failed_once.add(value)
                errors[index] = RuntimeError(f"transient {value}")
        if errors:
            raise PartialFailure(errors, results=[v * 10 for v in values])
        return [v * 10 for v in values]

    tasks = [await flaky.kiq(v) for v in range(4)]
    results = [await within(t.wait_result(timeout=10)) for t in tasks]

    assert [r.return_value for r in results] == [0, 10, 20, 30]
    assert not any(r.is_err for r in results)
    assert calls[0] == [0, 1, 2, 3]
    assert sorted(v for call in calls[1:] for v in call) == [1, 3], (
        "only 1 and 3 retried"
    )
    await broker.shutdown()


async def test_timeout_label_fails_items_whose_call_runs_too_long(
    broker: InMemoryBroker,
) -> None:
    finished: list[list[int]] = []

    @batch_task(broker, batch_size=2, batch_timeout=5, timeout=0.2)
    async def stuck(values: list[int]) -> None:
        await asyncio.sleep(30)
        finished.append(values)

    tasks = [await stuck.kiq(v) for v in range(2)]
    results = [await within(t.wait_result(timeout=10)) for t in tasks]
    assert all(isinstance(r.error, TimeoutError) for r in results)
    assert finished == [], "the call was cancelled when all its items timed out"


async def test_labels_pass_through_to_taskiq_and_kicker_labels_reach_the_worker(
    broker: InMemoryBroker,
) -> None:
    seen: list[dict[str, Any]] = []

    @batch_task(
        broker, batch_size=1, batch_timeout=5, priority=5, task_name="jobs:label"
    )
    async def labelled(values: list[int], context: Context = TaskiqDepends()) -> None:
        seen.append(dict(context.message.labels))

    assert labelled.task_name == "jobs:label"
    assert labelled.labels == {"priority": 5}
    assert broker.find_task("jobs:label") is not None
    task = (
        await labelled.kicker()
        .with_labels(tenant="acme")
        .with_task_id("fixed-id")
        .kiq(1)
    )
    await within(task.wait_result(timeout=10))
    assert task.task_id == "fixed-id"
    assert seen[0]["priority"] == 5
    assert seen[0]["tenant"] == "acme"


def test_calling_the_task_directly_calls_the_function_with_a_list() -> None:
    broker = InMemoryBroker()

    @batch_task(broker, batch_size=10, batch_timeout=5)
    def total(values: list[int], scale: int) -> int:
        return sum(values) * scale

    assert total([1, 2, 3], 10) == 60
    assert total.__name__ == "total"


class MemorySource(ScheduleSource):
    def __init__(self) -> None:
        self.schedules: list[ScheduledTask] = []

    async def get_schedules(self) -> list[ScheduledTask]:
        return self.schedules

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        self.schedules.append(schedule)


async def test_schedule_methods_schedule_one_item_with_its_extra_arguments(
    broker: InMemoryBroker,
) -> None:
    received: list[tuple[list[int], str]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(values: list[int], table: str) -> None:
        received.append((values, table))

    source = MemorySource()
    await save.schedule_by_cron(source, "* * * * *", 1, "t")
    await save.schedule_by_interval(source, timedelta(seconds=5), 2, table="t")
    await save.schedule_by_time(source, datetime.now(UTC), 3, "t")
    assert [(s.task_name, s.args, s.kwargs) for s in source.schedules] == [
        (save.task_name, [1, "t"], {}),
        (save.task_name, [2], {"table": "t"}),
        (save.task_name, [3, "t"], {}),
    ]
    # What the scheduler sends for each schedule joins one batch on the worker.
    for schedule in source.schedules:
        await save.kicker().kiq(*schedule.args, **schedule.kwargs)
    await within(flush_all(broker))
    assert received == [([1, 2, 3], "t")]
