"""The in-process path: batch tasks kicked on an InMemoryBroker, batch-native.

The differential half runs the scenarios of ``tests/test_differential.py`` on
an ``InMemoryBroker`` twice: once with batchtask's routing of its kicks (the
batch-native path, `batchtask.brokers.inmemory.Kicks`) and once on a
subclass with a ``kick`` of its own, which keeps every message on taskiq's
path (the entry point under the broker's receiver). Each message must see
the same: its middleware hooks with the message each saw, its result or
error under its task id. The rest checks what users rely on around it:
``wait_all``, ``flush_all``, ``await_inplace``, shutdown, plain tasks, and
the cases that stay on taskiq's path.
"""

import asyncio
import dataclasses
import datetime
import decimal
import enum
import logging
import math
import pathlib
import uuid
from typing import Annotated, Any

import pytest
from pydantic import BaseModel
from taskiq import (
    BrokerMessage,
    Context,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
)
from taskiq.exceptions import SendTaskError
from taskiq.formatters.proxy_formatter import ProxyFormatter

from batchtask import _compat, batch_task, flush_all
from batchtask.brokers.inmemory import Kicks, wire_copy
from tests.conftest import within
from tests.test_differential import (
    SCENARIOS,
    Log,
    Recorder,
    Scenario,
    kick_items,
    stored,
    validated,
)


class StockInMemoryBroker(InMemoryBroker):
    """An InMemoryBroker with a kick of its own: batchtask leaves its kicks alone."""

    async def kick(self, message: BrokerMessage) -> None:
        await super().kick(message)


def taken(broker: InMemoryBroker) -> int:
    """Messages this loop's native path took so far (0 without one)."""
    kicks = Kicks.of(broker)
    if kicks is None:
        return 0
    local = kicks._local()
    path: Any = None if local is None else local.path
    return 0 if path is None else int(path.taken)


def sent(broker: InMemoryBroker) -> int:
    """Messages this loop's native path took without their wire form so far."""
    kicks = Kicks.of(broker)
    local = None if kicks is None else kicks._local()
    return 0 if local is None else local.sent


async def run_in_memory(scenario: Scenario, broker: InMemoryBroker) -> Log:
    log: Log = {}
    broker.with_result_backend(scenario.backend(log))
    broker.add_middlewares(*scenario.middlewares(), Recorder(log))
    task = scenario.define(broker)
    await broker.startup()
    await kick_items(broker, task, scenario)
    if scenario.shutdown:
        await asyncio.sleep(0.1)  # every item buffered, its batch far from due
        await within(broker.shutdown(), 30)
        return log
    expected = scenario.expect_stored or len(scenario.items)

    async def stored_all() -> None:
        while stored(log) < expected:
            await asyncio.sleep(0.01)

    await within(stored_all(), 30)
    await asyncio.sleep(scenario.settle + 0.05)
    await within(broker.wait_all(), 30)
    if Kicks.of(broker) is not None and not task.signature.injected:
        # Retried and requeued copies are kicked while their first copy is
        # held, and go to taskiq's path; every first copy was taken natively.
        assert taken(broker) >= len(scenario.items), "the native path took all"
        if scenario.define is not validated:  # which kicks its own bytes
            assert sent(broker) >= len(scenario.items), "all without the wire"
    await broker.shutdown()
    return log


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_each_message_sees_the_same_with_and_without_the_in_process_path(
    scenario: Scenario,
) -> None:
    stock = await run_in_memory(scenario, StockInMemoryBroker())
    native = await run_in_memory(scenario, InMemoryBroker())
    assert stock, "the scenario recorded something"
    for task_id in sorted(set(stock) | set(native)):
        assert native.get(task_id) == stock.get(task_id), (
            f"{scenario.name}: message {task_id}\n"
            f"  taskiq:    {stock.get(task_id)}\n  in-process: {native.get(task_id)}"
        )


async def test_a_turns_kicks_are_one_task_not_one_per_message(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=60, results="per_item")
    async def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * item for item in items]

    tasks = await asyncio.gather(*(double.kiq(i) for i in range(250)))
    assert taken(broker) == 250
    assert len(broker._running_tasks) == 1, "one task for the turn's 250 kicks"
    await within(flush_all(broker))
    assert sorted(len(call) for call in calls) == [50, 100, 100]
    results = [await task.wait_result(timeout=1) for task in tasks]
    assert [r.return_value for r in results] == [2 * i for i in range(250)]
    assert not broker._running_tasks


async def test_wait_all_waits_for_buffered_items_until_their_batch_ran(
    broker: InMemoryBroker,
) -> None:
    loop = asyncio.get_running_loop()
    called: list[float] = []

    @batch_task(broker, batch_size=100, batch_timeout=0.3)
    async def save(items: list[int]) -> int:
        await asyncio.sleep(0.05)
        called.append(loop.time())
        return len(items)

    first = loop.time()
    tasks = [await save.kiq(i) for i in range(3)]
    await asyncio.sleep(0)  # the next turn's kick is a burst of its own
    tasks.append(await save.kiq(3))
    await within(broker.wait_all())

    assert len(called) == 1
    assert called[0] - first >= 0.3, "called by its timer, not by wait_all"
    for task in tasks:
        assert await broker.result_backend.is_result_ready(task.task_id)
        assert (await task.wait_result(timeout=1)).return_value == 4


async def test_flush_all_runs_buffered_items_and_waits_for_their_results(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600)
    async def save(items: list[int]) -> int:
        calls.append(items)
        return sum(items)

    tasks = [await save.kiq(i) for i in range(4)]
    await within(flush_all(broker), 10)

    assert calls == [[0, 1, 2, 3]]
    for task in tasks:
        assert await broker.result_backend.is_result_ready(task.task_id)


async def test_shutdown_runs_what_is_buffered_and_stores_its_results() -> None:
    broker = InMemoryBroker()
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=100, batch_timeout=3600, results="per_item")
    async def save(items: list[int]) -> list[int]:
        calls.append(items)
        return items

    await broker.startup()
    tasks = [await save.kiq(i) for i in range(5)]
    await within(broker.shutdown(), 10)

    assert calls == [[0, 1, 2, 3, 4]]
    results = [await task.wait_result(timeout=1) for task in tasks]
    assert [r.return_value for r in results] == list(range(5))


async def test_await_inplace_kicks_stay_on_taskiqs_path() -> None:
    broker = InMemoryBroker(await_inplace=True)

    @batch_task(broker, batch_size=100, batch_timeout=3600, results="per_item")
    async def double(items: list[int]) -> list[int]:
        return [2 * item for item in items]

    task = await double.kiq(21)
    assert await broker.result_backend.is_result_ready(task.task_id)
    assert (await task.wait_result(timeout=1)).return_value == 42
    assert taken(broker) == 0


async def test_plain_tasks_keep_the_brokers_own_kick(broker: InMemoryBroker) -> None:
    @batch_task(broker, batch_size=10, batch_timeout=0.05)
    async def save(items: list[int]) -> int:
        return len(items)

    @broker.task
    async def plain(x: int) -> int:
        await asyncio.sleep(0.01)
        return x + 1

    tasks = [await plain.kiq(i) for i in range(3)]
    assert len(broker._running_tasks) == 3, "taskiq's task per message"
    await within(broker.wait_all())
    assert [(await t.wait_result(timeout=1)).return_value for t in tasks] == [1, 2, 3]
    assert taken(broker) == 0


async def test_a_subclass_with_a_kick_of_its_own_keeps_it() -> None:
    broker = StockInMemoryBroker()

    @batch_task(broker, batch_size=2, batch_timeout=0.05, results="per_item")
    async def double(items: list[int]) -> list[int]:
        return [2 * item for item in items]

    await broker.startup()
    tasks = [await double.kiq(i) for i in range(3)]
    await within(broker.wait_all())
    assert Kicks.of(broker) is None
    assert [(await t.wait_result(timeout=1)).return_value for t in tasks] == [0, 2, 4]
    await broker.shutdown()


async def test_on_a_changed_taskiq_kicks_stay_on_taskiqs_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compat, "receiver_changes", lambda _: ["Receiver.runner"])
    broker = InMemoryBroker()

    @batch_task(broker, batch_size=5, batch_timeout=0.05, results="per_item")
    async def double(items: list[int]) -> list[int]:
        return [2 * item for item in items]

    await broker.startup()
    with caplog.at_level(logging.WARNING, logger="batchtask"):
        tasks = [await double.kiq(i) for i in range(10)]
    assert "Receiver.runner" in caplog.text
    assert "taskiq's own path" in caplog.text
    assert len(broker._running_tasks) == 10, "taskiq's task per message"
    await within(broker.wait_all())
    results = [await t.wait_result(timeout=1) for t in tasks]
    assert [r.return_value for r in results] == [2 * i for i in range(10)]
    await broker.shutdown()


async def test_tasks_with_injected_dependencies_stay_on_taskiqs_path(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=3, batch_timeout=0.05)
    async def seen(items: list[int], context: Context = TaskiqDepends()) -> str:
        return context.message.task_name

    tasks = [await seen.kiq(i) for i in range(3)]
    await within(broker.wait_all())
    assert taken(broker) == 0
    results = [await t.wait_result(timeout=1) for t in tasks]
    assert [r.return_value for r in results] == [seen.task_name] * 3


async def test_what_is_registered_or_added_after_the_first_kick_is_seen(
    broker: InMemoryBroker,
) -> None:
    seen: list[str] = []

    class Note(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            seen.append(message.task_id)
            return message

    @batch_task(broker, batch_size=10, batch_timeout=0.05, task_name="first")
    async def first(items: list[int]) -> int:
        return len(items)

    await first.kiq(1)
    broker.add_middlewares(Note())

    @batch_task(broker, batch_size=10, batch_timeout=0.05, task_name="second")
    async def second(items: list[int]) -> int:
        return len(items)

    one = await first.kiq(2)
    two = await second.kiq(3)
    await within(broker.wait_all())
    assert taken(broker) == 3, "the later task's message was taken too"
    assert seen == [one.task_id, two.task_id], "the later middleware ran"


async def test_a_message_kicked_again_while_held_runs_again(
    broker: InMemoryBroker,
) -> None:
    """As on taskiq's path, where each kick of it is a message that runs."""
    items: list[int] = []

    @batch_task(broker, batch_size=10, batch_timeout=0.05)
    async def save(batch: list[int]) -> int:
        items.extend(batch)
        return len(batch)

    message = broker.formatter.dumps(save.kicker().message(7))
    await broker.kick(message)
    await broker.kick(message)
    await within(broker.wait_all())
    assert items == [7, 7]
    assert await broker.result_backend.is_result_ready(message.task_id)


def test_each_event_loop_gets_a_native_path_of_its_own() -> None:
    broker = InMemoryBroker()

    @batch_task(broker, batch_size=3, batch_timeout=0.05, results="per_item")
    async def double(items: list[int]) -> list[int]:
        return [2 * item for item in items]

    async def use(value: int) -> tuple[Any, int]:
        task = await double.kiq(value)
        await within(broker.wait_all())
        return (await task.wait_result(timeout=1)).return_value, taken(broker)

    assert asyncio.run(use(1)) == (2, 1)
    assert asyncio.run(use(2)) == (4, 1), "a new loop's path took its message"


async def test_invalid_items_fail_alone_on_the_in_process_path(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=10, batch_timeout=0.05, results="per_item")
    async def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * item for item in items]

    good = await double.kiq(1)
    bad = await double.kiq("not a number")  # type: ignore[arg-type]
    await within(broker.wait_all())
    assert taken(broker) == 2
    assert calls == [[1]]
    assert (await good.wait_result(timeout=1)).return_value == 2
    failed = await bad.wait_result(timeout=1)
    assert failed.is_err
    assert "not a valid int" in str(failed.error)


async def test_a_generator_dependency_is_still_per_message(
    broker: InMemoryBroker,
) -> None:
    opened: list[int] = []

    async def session() -> Any:
        opened.append(1)
        yield len(opened)

    @batch_task(broker, batch_size=3, batch_timeout=0.05)
    async def use(items: list[int], db: Annotated[int, TaskiqDepends(session)]) -> int:
        return db

    for i in range(3):
        await use.kiq(i)
    await within(broker.wait_all())
    assert len(opened) == 3, "resolved per message, as taskiq does"


# -- without the wire: the copy the native path takes ------------------------


class Level(enum.IntEnum):
    LOW = 1


class Colour(enum.StrEnum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    when: datetime.date


class Model(BaseModel):
    name: str
    at: datetime.datetime


WIRE_VALUES: dict[str, Any] = {
    "int": 7,
    "big int": 10**40,
    "float": 0.1,
    "float, integral": 2.0,
    "negative zero": -0.0,
    "huge float": 1e300,
    "nan": math.nan,
    "infinity": -math.inf,
    "bool": True,
    "none": None,
    "str": "plain",
    "unicode": "é☃ 𝄞",
    "lone surrogate": "\ud800",
    "list": [1, [2, "3"], {"4": None}],
    "tuple": (1, (2, 3)),
    "dict, int keys": {1: "a", 2: "b"},
    "dict, float keys": {1.5: 1, 2.0: 2},
    "dict, bool keys": {True: 1, False: 0},
    "dict, None key": {None: 1},
    "dict, enum keys": {Level.LOW: 1, Colour.RED: 2},
    "int enum": Level.LOW,
    "str enum": Colour.RED,
    "datetime": datetime.datetime(2026, 12, 3, 13, 0, 0, 123456),
    "aware datetime": datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC),
    "date": datetime.date(2026, 12, 3),
    "timedelta": datetime.timedelta(seconds=90.5),
    "decimal": decimal.Decimal("1.10"),
    "uuid": uuid.UUID(int=1),
    "bytes": b"\x00\xffraw",
    "set": {3, 1, 2},
    "frozenset": frozenset({"a"}),
    "model": Model(name="m", at=datetime.datetime(2026, 1, 1)),
    "dataclass": Point(1, datetime.date(2026, 1, 1)),
    "path": pathlib.PurePosixPath("/tmp/x"),
    "object": object(),
}


def _exact(message: TaskiqMessage) -> str:
    """Every value with its type: 1, 1.0 and True differ; so does key order."""
    return repr(message.model_dump())


@pytest.mark.parametrize("name", WIRE_VALUES)
def test_a_message_copied_without_the_wire_is_what_the_wire_gives(name: str) -> None:
    broker = InMemoryBroker()
    value = WIRE_VALUES[name]
    message = TaskiqMessage(
        task_id="m0",
        task_name="app:save",
        labels={"value": value, "priority": "5"},
        labels_types={"priority": 2},
        args=[value, 1],
        kwargs={"value": value},
    )
    try:
        wire: TaskiqMessage | None = broker.formatter.loads(
            broker.formatter.dumps(message).message
        )
    except Exception:
        wire = None
    copied = wire_copy(broker, message)
    if wire is None:
        assert copied is None, "what the wire refuses goes the wire's way"
        return
    if copied is None:
        # Allowed (the kick then takes the wire), but not for JSON's own values.
        assert name in {"lone surrogate", "object"}, f"{name}: no copy"
        return
    assert _exact(copied) == _exact(wire)


def test_the_copy_is_the_receivers_own() -> None:
    broker = InMemoryBroker()
    item = {"rows": [1, 2]}
    message = TaskiqMessage(
        task_id="m0", task_name="t", labels={}, args=[item], kwargs={}
    )
    copied = wire_copy(broker, message)
    assert copied is not None
    assert copied.args == [item]
    assert copied.args[0] is not item
    item["rows"].append(3)
    assert copied.args == [{"rows": [1, 2]}]


def test_other_formatters_and_serializers_take_the_wire() -> None:
    from taskiq.serializers import JSONSerializer

    message = TaskiqMessage(task_id="m0", task_name="t", labels={}, args=[1], kwargs={})
    assert wire_copy(InMemoryBroker(), message) is not None
    non_ascii = InMemoryBroker().with_serializer(JSONSerializer(ensure_ascii=False))
    assert wire_copy(non_ascii, message) is None
    custom = InMemoryBroker()

    class Formatter(ProxyFormatter):
        """taskiq's default formatter, but a class of its own."""

    custom.formatter = Formatter(custom)
    assert wire_copy(custom, message) is None


async def test_a_kick_replaced_after_the_first_batch_task_gets_every_message(
    broker: InMemoryBroker,
) -> None:
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=2, batch_timeout=60)
    async def save(items: list[int]) -> None:
        calls.append(items)

    kicked: list[BrokerMessage] = []

    async def capture(message: BrokerMessage) -> None:
        kicked.append(message)

    broker.kick = capture  # type: ignore[method-assign]
    await save.kiq(1)
    await save.kiq(2)
    assert [broker.formatter.loads(m.message).args for m in kicked] == [[1], [2]]
    assert calls == []
    assert sent(broker) == 0


async def test_a_message_refused_on_the_way_fails_the_kick_as_on_taskiqs(
    broker: InMemoryBroker,
) -> None:
    @batch_task(broker, batch_size=2, batch_timeout=60)
    async def save(items: list[Any]) -> None: ...

    with pytest.raises(SendTaskError):
        await save.kiq(object())
    assert sent(broker) == 0
