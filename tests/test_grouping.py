"""Point 2: a batch holds items of one task with equal extra arguments."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, Any

from pydantic import BaseModel
from taskiq import Context, InMemoryBroker, TaskiqDepends

from batchtask import batch_task, flush_all
from tests.conftest import within


class Filter(BaseModel):
    field: str
    values: list[int]


@dataclasses.dataclass
class Target:
    table: str
    shard: int


async def test_positional_and_keyword_extra_arguments_share_a_batch(
    broker: InMemoryBroker,
) -> None:
    calls: list[tuple[list[str], str, bool]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[str], table: str, *, upsert: bool = False) -> None:
        calls.append((rows, table, upsert))

    await save.kiq("a", "events")
    await save.kiq("b", table="events")
    await save.kiq("c", "events", upsert=False)
    await save.kiq("d", "events", upsert=True)
    await within(flush_all(broker))

    assert sorted(calls) == [
        (["a", "b", "c"], "events", False),
        (["d"], "events", True),
    ]


async def test_defaults_are_applied_before_grouping(broker: InMemoryBroker) -> None:
    calls: list[tuple[list[int], int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def scale(values: list[int], factor: int = 2) -> None:
        calls.append((values, factor))

    await scale.kiq(1)
    await scale.kiq(2, 2)
    await scale.kiq(3, factor=2)
    await within(flush_all(broker))

    assert calls == [([1, 2, 3], 2)]


async def test_unhashable_extra_arguments_group_by_value(
    broker: InMemoryBroker,
) -> None:
    calls: list[tuple[list[int], Any, Any, Any]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def index(
        ids: list[int], options: dict[str, Any], tags: list[str], where: Filter
    ) -> None:
        calls.append((ids, options, tags, where))

    where = Filter(field="x", values=[1, 2])
    await index.kiq(1, {"a": 1, "b": [1, 2]}, ["t"], where)
    await index.kiq(2, {"b": [1, 2], "a": 1}, ["t"], Filter(field="x", values=[1, 2]))
    await index.kiq(3, {"a": 1, "b": [1, 2]}, ["t", "u"], where)
    await index.kiq(4, {"a": 1, "b": [1, 2]}, ["t"], Filter(field="y", values=[1, 2]))
    await within(flush_all(broker))

    batches = sorted(call[0] for call in calls)
    assert batches == [[1, 2], [3], [4]]
    first = next(call for call in calls if call[0] == [1, 2])
    assert first[3] == where  # the model arrives as a model, parsed by taskiq


async def test_equal_looking_values_of_different_types_do_not_mix(
    broker: InMemoryBroker,
) -> None:
    calls: list[tuple[list[int], Any]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def tagged(ids: list[int], tag: Any) -> None:
        calls.append((ids, tag))

    for index, tag in enumerate([1, True, 1.0, "1", 1]):
        await tagged.kiq(index, tag)
    await within(flush_all(broker))

    assert sorted((ids, repr(tag)) for ids, tag in calls) == [
        ([0, 4], "1"),
        ([1], "True"),
        ([2], "1.0"),
        ([3], "'1'"),
    ]


async def test_dataclass_extra_arguments_group_by_value() -> None:
    broker = InMemoryBroker(cast_types=False)
    await broker.startup()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def route(ids: list[int], target: Any) -> None:
        calls.append(ids)

    await asyncio.gather(
        route.kiq(1, Target("a", 1)),
        route.kiq(2, Target("a", 1)),
        route.kiq(3, Target("a", 2)),
    )
    await within(flush_all(broker))
    assert sorted(calls) == [[1, 2], [3]]


async def test_different_tasks_never_share_a_batch(broker: InMemoryBroker) -> None:
    seen: list[tuple[str, list[int]]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5, task_name="first")
    async def first(ids: list[int]) -> None:
        seen.append(("first", ids))

    @batch_task(broker, batch_size=10, batch_timeout=5, task_name="second")
    async def second(ids: list[int]) -> None:
        seen.append(("second", ids))

    await first.kiq(1)
    await second.kiq(2)
    await first.kiq(3)
    await within(flush_all(broker))
    assert sorted(seen) == [("first", [1, 3]), ("second", [2])]


class Connection:
    def __init__(self) -> None:
        self.open = True


async def test_injected_dependencies_are_not_part_of_the_key_and_stay_open(
    broker: InMemoryBroker,
) -> None:
    events: list[str] = []
    opened: list[Connection] = []

    async def connection() -> AsyncIterator[Connection]:
        conn = Connection()
        opened.append(conn)
        yield conn
        conn.open = False
        events.append("closed")

    @batch_task(broker, batch_size=3, batch_timeout=5)
    async def write(
        rows: list[int],
        table: str,
        conn: Annotated[Connection, TaskiqDepends(connection)],
        context: Context = TaskiqDepends(),
    ) -> str:
        await asyncio.sleep(0.01)
        assert conn.open, "the dependency must stay open during the call"
        events.append(f"call {rows}")
        return context.message.task_id

    tasks = [await write.kiq(row, "t") for row in range(3)]
    results = [await within(task.wait_result(timeout=10)) for task in tasks]

    assert events[0] == "call [0, 1, 2]"
    assert events[1:] == ["closed"] * 3
    assert len(opened) == 3  # resolved per message, as taskiq does
    leader = results[0].return_value
    assert leader in {task.task_id for task in tasks}
    assert all(result.return_value == leader for result in results)
