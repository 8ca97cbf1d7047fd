"""OpenTelemetry: a span per batch call, linked to its messages' spans.

Each test runs taskiq's ``OpenTelemetryMiddleware`` and `BatchTracingMiddleware`
with the SDK's in-memory exporter, on taskiq's own receiver (batch tasks ride
the entry point) and on `BatchReceiver` (the batch-native path).
"""

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware
from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware
from taskiq.receiver import Receiver

from batchtask import BatchReceiver, batch_task
from batchtask.tracing import BatchTracingMiddleware
from tests.conftest import within
from tests.test_differential import (
    AckingBroker,
    Log,
    RecordingBackend,
    bisect,
    failing,
    grouped,
    shared,
)

RECEIVERS = [Receiver, BatchReceiver]


def _name(receiver: type[Receiver]) -> str:
    return "batch-native" if receiver is BatchReceiver else "taskiq"


async def run(
    define: Callable[[AsyncBroker], Any],
    items: list[Any],
    receiver_class: type[Receiver],
    *,
    propagate: bool = True,
    middlewares: Callable[[TracerProvider], list[TaskiqMiddleware]] | None = None,
) -> list[ReadableSpan]:
    """Kick `items` as m0, m1, ... and receive them; the spans it made.

    With `propagate`, the producer is traced too (its messages carry its
    span); without, messages are sent bare.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    log: Log = {}
    broker = AckingBroker(log)
    broker.with_result_backend(RecordingBackend(log))
    if middlewares is None:
        broker.add_middlewares(
            OpenTelemetryMiddleware(tracer_provider=provider),
            BatchTracingMiddleware(tracer_provider=provider),
        )
    else:
        broker.add_middlewares(*middlewares(provider))
    task = define(broker)
    await broker.startup()
    for index, item in enumerate(items):
        kicker = task.kicker().with_task_id(f"m{index}")
        if propagate:
            await kicker.kiq(item)
        else:
            await broker.kick(
                broker.formatter.dumps(
                    TaskiqMessage(
                        task_id=f"m{index}",
                        task_name=task.task_name,
                        labels={},
                        args=[item],
                        kwargs={},
                    )
                )
            )
    receiver = receiver_class(broker, max_async_tasks=100, run_startup=False)
    finish = asyncio.Event()
    listener = asyncio.create_task(receiver.listen(finish))

    async def stored_all() -> None:
        while sum(1 for e in log.values() for x in e if x[0] == "stored") < len(items):
            await asyncio.sleep(0.01)

    await within(stored_all(), 30)
    await asyncio.sleep(0.05)
    finish.set()
    await within(listener, 30)
    await broker.shutdown()
    return list(exporter.get_finished_spans())


def _sends(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {
        str(span.attributes["messaging.message.id"]): span
        for span in spans
        if span.name == "send/t" and span.attributes
    }


def _calls(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    calls = [span for span in spans if span.name == "batch/t"]
    return sorted(calls, key=lambda span: span.start_time or 0)


def _linked(call: ReadableSpan) -> list[tuple[int, str]]:
    """The span ids and message ids `call` links to."""
    return [
        (link.context.span_id, str((link.attributes or {})["messaging.message.id"]))
        for link in call.links
    ]


def _execute_spans_by_sender(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    sends = {span.context.span_id: task_id for task_id, span in _sends(spans).items()}
    found: dict[str, ReadableSpan] = {}
    for span in spans:
        if span.name == "execute/t":
            assert span.parent is not None, "a message's span is its producer's child"
            found[sends[span.parent.span_id]] = span
    return found


@pytest.mark.parametrize("receiver_class", RECEIVERS, ids=_name)
async def test_each_call_is_one_span_linked_to_the_spans_of_its_messages(
    receiver_class: type[Receiver],
) -> None:
    spans = await run(shared, list(range(8)), receiver_class)
    executes = _execute_spans_by_sender(spans)
    assert sorted(executes) == [f"m{i}" for i in range(8)]
    calls = _calls(spans)
    assert len(calls) == 2
    linked: list[str] = []
    for call in calls:
        assert call.kind is SpanKind.CONSUMER
        assert call.parent is None, "a call starts a trace of its own"
        assert call.status.status_code is StatusCode.UNSET
        attributes = dict(call.attributes or {})
        wait = attributes.pop("batchtask.wait")
        assert isinstance(wait, float)
        assert 0 <= wait < 5
        assert attributes == {
            "messaging.operation.type": "process",
            "messaging.batch.message_count": 4,
            "batchtask.task_name": "t",
            "batchtask.group_key": "'events'",
            "batchtask.flush_reason": "size",
            "batchtask.batch_size": 4,
            "batchtask.attempt": 1,
        }
        for span_id, task_id in _linked(call):
            assert span_id == executes[task_id].context.span_id
            linked.append(task_id)
    assert sorted(linked) == sorted(executes), "every message linked once"


@pytest.mark.parametrize("receiver_class", RECEIVERS, ids=_name)
async def test_a_call_of_a_group_by_key_names_it(
    receiver_class: type[Receiver],
) -> None:
    spans = await run(grouped, list(range(6)), receiver_class)
    shown = sorted(
        (str((call.attributes or {})["batchtask.group"]), call.attributes)
        for call in _calls(spans)
    )
    assert [group for group, _ in shown] == ["0", "1"]
    for _, attributes in shown:
        assert (attributes or {})["messaging.batch.message_count"] == 3


@pytest.mark.parametrize("receiver_class", RECEIVERS, ids=_name)
async def test_bisect_makes_one_span_per_attempt(
    receiver_class: type[Receiver],
) -> None:
    spans = await run(bisect, [4, 5, 6, 7], receiver_class)
    calls = _calls(spans)
    executes = _execute_spans_by_sender(spans)
    seen = [
        (
            (call.attributes or {})["batchtask.attempt"],
            (call.attributes or {})["messaging.batch.message_count"],
            (call.attributes or {})["batchtask.batch_size"],
            sorted(task_id for _, task_id in _linked(call)),
            call.status.status_code,
        )
        for call in calls
    ]
    error, unset = StatusCode.ERROR, StatusCode.UNSET
    assert seen == [  # item 7 (m3) fails its calls
        (1, 4, 4, ["m0", "m1", "m2", "m3"], error),
        (2, 2, 4, ["m0", "m1"], unset),
        (3, 2, 4, ["m2", "m3"], error),
        (4, 1, 4, ["m2"], unset),
        (5, 1, 4, ["m3"], error),
    ]
    for call in calls:
        if call.status.status_code is StatusCode.ERROR:
            (event,) = [e for e in call.events if e.name == "exception"]
            assert (event.attributes or {})["exception.type"] == "KeyError"
    assert executes["m3"].status.status_code is StatusCode.ERROR
    assert executes["m0"].status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("receiver_class", RECEIVERS, ids=_name)
async def test_a_failing_call_records_its_exception(
    receiver_class: type[Receiver],
) -> None:
    spans = await run(failing, [1, 2, 3], receiver_class)
    (call,) = _calls(spans)
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description is not None
    assert "no table" in call.status.description
    (event,) = [e for e in call.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "LookupError"
    assert len(call.links) == 3
    for span in _execute_spans_by_sender(spans).values():
        assert span.status.status_code is StatusCode.ERROR


def _shape(spans: list[ReadableSpan]) -> dict[str, tuple[Any, ...]]:
    """What taskiq's middleware made for each message, ids left out."""
    sends = {span.context.span_id: task_id for task_id, span in _sends(spans).items()}
    shapes: dict[str, tuple[Any, ...]] = {}
    executes = [span for span in spans if span.name == "execute/t"]
    for number, span in enumerate(sorted(executes, key=lambda s: s.start_time or 0)):
        parent = None if span.parent is None else span.parent.span_id
        attributes = dict(span.attributes or {})
        task_id = sends.get(parent) if parent is not None else None
        key = task_id or f"unsent#{number}"
        shapes[key] = (
            span.kind,
            "producer" if task_id else ("none" if parent is None else "another"),
            span.status.status_code,
            sorted(attributes),
            [event.name for event in span.events],
        )
    return shapes


@pytest.mark.parametrize("propagate", [True, False], ids=["traced", "bare"])
@pytest.mark.parametrize("define", [shared, bisect, failing], ids=lambda d: d.__name__)
async def test_message_spans_are_the_same_on_both_paths(
    define: Callable[[AsyncBroker], Any],
    propagate: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """taskiq's per-message spans, with and without BatchTracingMiddleware,
    are what taskiq's own receiver makes: each message's span the child of
    its producer's (or of nothing when the message came bare, never of
    another message's), with the same status and attributes; and no context
    is detached in a context it was not attached in."""
    items = list(range(4, 10))
    caplog.set_level(logging.ERROR)

    def only_taskiq(provider: TracerProvider) -> list[TaskiqMiddleware]:
        return [OpenTelemetryMiddleware(tracer_provider=provider)]

    for middlewares in (None, only_taskiq):
        stock = await run(
            define, items, Receiver, propagate=propagate, middlewares=middlewares
        )
        native = await run(
            define, items, BatchReceiver, propagate=propagate, middlewares=middlewares
        )
        assert _shape(native) == _shape(stock)
        assert len(_shape(stock)) == len(items)
        if not propagate:
            assert {shape[1] for shape in _shape(stock).values()} == {"none"}
    detached = [r for r in caplog.records if "detach" in r.getMessage().lower()]
    assert detached == []


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


class SetsAVariable(TaskiqMiddleware):
    """Sets a context variable per message; notes what post_execute sees."""

    def __init__(self, seen: dict[str, str]) -> None:
        super().__init__()
        self.seen = seen

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        VAR.set(message.task_id)
        return message

    def post_execute(self, message: TaskiqMessage, result: Any) -> None:
        self.seen[message.task_id] = VAR.get()


@pytest.mark.parametrize("receiver_class", RECEIVERS, ids=_name)
async def test_each_message_hooks_run_in_a_context_of_its_own(
    receiver_class: type[Receiver],
) -> None:
    """What a message's pre_execute sets in its context is what its
    post_execute sees, as on taskiq's path."""
    seen: dict[str, str] = {}

    def define(broker: AsyncBroker) -> Any:
        @batch_task(
            broker, batch_size=3, batch_timeout=0.3, results="per_item", task_name="t"
        )
        async def echo(items: list[int]) -> list[str]:
            return [VAR.get()] * len(items)

        return echo

    await run(
        define,
        list(range(6)),
        receiver_class,
        middlewares=lambda provider: [SetsAVariable(seen)],
    )
    assert seen == {f"m{i}": f"m{i}" for i in range(6)}
