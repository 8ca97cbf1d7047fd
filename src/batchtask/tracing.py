"""OpenTelemetry spans for batch calls, next to taskiq's per-message spans.

taskiq's ``OpenTelemetryMiddleware`` (``taskiq[opentelemetry]``) makes a span
per message. Add `BatchTracingMiddleware` next to it and each call of a batch
function is a span of its own::

    from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware
    from batchtask.tracing import BatchTracingMiddleware

    broker = broker.with_middlewares(
        OpenTelemetryMiddleware(), BatchTracingMiddleware()
    )

The span of a call (each bisect attempt is a call) is named
``batch/<task name>``, of kind ``CONSUMER``, and starts a trace of its own:
a call serves many messages, so it is no one message's child. It links to
the span of every message passed to it (the OpenTelemetry messaging
conventions' way of showing batch processing): the message's span from
taskiq's middleware, or, without that middleware, the producer's span the
message carries. Spans the function makes are children of the call's. Its
attributes:

- ``messaging.operation.type``: ``process``;
- ``messaging.batch.message_count``: items passed to this call;
- ``batchtask.task_name``, ``batchtask.group_key`` (the extra arguments as a
  call shows them, ``'events', upsert=True``, at most 256 characters),
  ``batchtask.flush_reason`` (as in `batchtask.FlushReason`), and with
  ``group_by`` ``batchtask.group`` (the key's ``repr``, at most 64
  characters);
- ``batchtask.wait``: seconds from the batch's first item entering its
  buffer to this call's start;
- ``batchtask.batch_size``: items of the batch's first call, and
  ``batchtask.attempt``: 1 for it, then counting on while bisecting.

A call that raises has the exception recorded on its span and the span's
status set to error. Each link carries the message's ``messaging.message.id``
(its taskiq task id). Expired items and folded duplicates are not passed to
the function, so they are not linked.

Needs ``opentelemetry-api`` (``pip install 'batchtask[otel]'``, which brings
``taskiq[opentelemetry]`` too).
"""

import contextvars
from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple

from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware

from batchtask import _spans

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagate import extract
    from opentelemetry.trace import Link, SpanContext, SpanKind, Tracer
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "batchtask.tracing needs opentelemetry-api: pip install 'batchtask[otel]'"
    ) from exc

from batchtask import __version__

_message: contextvars.ContextVar[tuple[str, SpanContext | None]] = (
    contextvars.ContextVar("batchtask_traced_message")
)
"""In a message's own context: its task id and its producer's span context."""


class _Noted(NamedTuple):
    """What a call links to for one message (a `Link` is made once, per call)."""

    target: SpanContext
    task_id: str


class BatchTracingMiddleware(TaskiqMiddleware):
    """Makes a span of each batch call, linked to the spans of its messages."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """Trace with `tracer`, else with one of `tracer_provider` (or the global)."""
        super().__init__()
        self.tracer = tracer or trace.get_tracer(
            "batchtask.tracing", __version__, tracer_provider
        )

    def set_broker(self, broker: AsyncBroker) -> None:
        """Called by taskiq when the middleware is added: trace `broker`'s batches."""
        super().set_broker(broker)
        _spans.trace(broker, self)

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Note which message runs in this context, and its producer's span."""
        producer = trace.get_current_span(extract(message.labels)).get_span_context()
        _message.set((message.task_id, producer if producer.is_valid else None))
        return message

    def note(self) -> object:
        """In a message's context: the link to its span (`batchtask._spans`)."""
        noted = _message.get(None)
        if noted is None:
            return None
        task_id, producer = noted
        current = trace.get_current_span().get_span_context()
        target = current if current.is_valid else producer
        if target is None:
            return None
        return _Noted(target, task_id)

    def call(
        self, info: _spans.CallInfo, notes: Sequence[object]
    ) -> AbstractContextManager[object]:
        """The span one call of a batch function runs in (`batchtask._spans`)."""
        links = [
            Link(note.target, {"messaging.message.id": note.task_id})
            for note in notes
            if isinstance(note, _Noted)
        ]
        return self._span(info, links)

    @contextmanager
    def _span(self, info: _spans.CallInfo, links: list[Link]) -> Generator[Any]:
        attributes: dict[str, Any] = {
            "messaging.operation.type": "process",
            "messaging.batch.message_count": info.size,
            "batchtask.task_name": info.task_name,
            "batchtask.group_key": info.key,
            **({} if info.group is None else {"batchtask.group": info.group}),
            "batchtask.wait": info.waited,
            "batchtask.batch_size": info.batch_size,
            "batchtask.attempt": info.attempt,
        }
        if info.reason is not None:
            attributes["batchtask.flush_reason"] = info.reason.value
        with self.tracer.start_as_current_span(
            f"batch/{info.task_name}",
            context=otel_context.Context(),  # a trace of its own
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        ) as span:
            yield span
