"""Point 4 and bad input: items are validated alone; bad arguments fail alone."""

import pytest
from pydantic import BaseModel
from taskiq import InMemoryBroker
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker

from batchtask import BatchArgumentError, ItemValidationError, batch_task, flush_all
from tests.conftest import within


class Row(BaseModel):
    id: int
    name: str


async def test_items_are_validated_and_converted_to_the_item_type(
    broker: InMemoryBroker,
) -> None:
    received: list[list[Row]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[Row], table: str) -> int:
        received.append(rows)
        return len(rows)

    tasks = [await save.kiq(Row(id=i, name=f"r{i}"), "t") for i in range(3)]
    await within(flush_all(broker))
    assert received == [
        [Row(id=0, name="r0"), Row(id=1, name="r1"), Row(id=2, name="r2")]
    ]
    assert [(await t.get_result()).return_value for t in tasks] == [3, 3, 3]


async def test_an_invalid_item_fails_alone_naming_task_parameter_and_problem(
    broker: InMemoryBroker,
) -> None:
    received: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5, task_name="demo:ingest")
    async def ingest(values: list[int]) -> int:
        received.append(values)
        return len(values)

    good1 = await ingest.kiq(1)
    bad = await ingest.kiq("seven")  # type: ignore[arg-type]  # the bad item is the point
    good2 = await ingest.kiq("2")  # type: ignore[arg-type]  # lax conversion, as taskiq does
    await within(flush_all(broker))

    assert received == [[1, 2]]
    assert (await good1.get_result()).return_value == 2
    assert (await good2.get_result()).return_value == 2
    error = (await bad.get_result()).error
    assert isinstance(error, ItemValidationError)
    message = str(error)
    assert "batch task 'demo:ingest'" in message
    assert "parameter 'values'" in message
    assert "'seven'" in message
    assert "valid integer" in message


async def test_a_bad_model_item_reports_the_field(broker: InMemoryBroker) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[Row]) -> None: ...

    bad = await save.kiq({"id": "x", "name": "n"})  # type: ignore[arg-type]  # the bad item is the point
    await within(flush_all(broker))
    error = (await bad.get_result()).error
    assert isinstance(error, ItemValidationError)
    assert "id: Input should be a valid integer" in str(error)


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ((), {}, "missing the item: pass one rows element as the first argument"),
        ((1,), {}, "missing required argument 'table'"),
        (
            (1, "t", "extra"),
            {},
            "takes 1 extra positional argument(s) after the item but 2 were given",
        ),
        ((1, "t"), {"colour": "red"}, "got an unexpected keyword argument 'colour'"),
        ((1, "t"), {"table": "u"}, "got multiple values for argument 'table'"),
    ],
)
async def test_bad_arguments_fail_at_kiq_on_the_producer(
    broker: InMemoryBroker,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    problem: str,
) -> None:
    called = False

    @batch_task(broker, batch_size=10, batch_timeout=5, task_name="demo:save")
    async def save(rows: list[int], table: str) -> None:
        nonlocal called
        called = True

    with pytest.raises(BatchArgumentError) as raised:
        await save.kicker().kiq(*args, **kwargs)  # type: ignore[arg-type]
    assert str(raised.value) == f"batch task 'demo:save': {problem}"
    if args:
        with pytest.raises(BatchArgumentError):
            await save.kiq(*args, **kwargs)  # type: ignore[arg-type]
    await within(flush_all(broker))
    assert not called


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ([], {}, "missing the item"),
        ([1, "t"], {"colour": "red"}, "unexpected keyword argument 'colour'"),
    ],
)
async def test_a_malformed_message_fails_alone_on_the_worker(
    broker: InMemoryBroker, args: list[object], kwargs: dict[str, object], problem: str
) -> None:
    received: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[int], table: str) -> None:
        received.append(rows)

    raw = AsyncKicker(task_name=save.task_name, broker=broker, labels={})
    bad = await raw.kiq(*args, **kwargs)
    good = await save.kiq(5, "t")
    await within(flush_all(broker))

    error = (await bad.get_result()).error
    assert isinstance(error, BatchArgumentError)
    assert problem in str(error)
    assert received == [[5]]
    assert not (await good.get_result()).is_err


async def test_the_item_may_be_passed_by_its_parameter_name(
    broker: InMemoryBroker,
) -> None:
    received: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[int], table: str) -> None:
        received.append(rows)

    raw = AsyncKicker(task_name=save.task_name, broker=broker, labels={})
    await raw.kiq(rows=4, table="t")
    await save.kiq(5, "t")
    await within(flush_all(broker))
    assert received == [[4, 5]]


async def test_passing_an_injected_parameter_at_kiq_is_rejected(
    broker: InMemoryBroker,
) -> None:
    from taskiq import Context, TaskiqDepends

    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[int], context: Context = TaskiqDepends()) -> None: ...

    with pytest.raises(BatchArgumentError, match="'context' is injected by taskiq"):
        await save.kiq(1, context=None)  # type: ignore[arg-type]


async def test_unserializable_extra_arguments_fail_at_kiq_on_the_producer(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=5)
    async def save(rows: list[int], meta: object) -> None: ...

    with pytest.raises(SendTaskError) as raised:
        await save.kiq(1, object())
    assert "Unable to serialize unknown type: <class 'object'>" in str(
        raised.value.__cause__
    )
