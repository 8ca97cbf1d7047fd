"""In-process cost per item of tracing: traced batches vs taskiq's traced messages.

    .venv/bin/python bench/tracing.py [--items 20000] [--rounds 7] [--json PATH]

As bench/machinery.py (no broker, no I/O; messages handed to the receiver in
this process, 500 at a time), on brokers whose spans go to the OpenTelemetry
SDK with a `BatchSpanProcessor` and an exporter that drops them (what a
production setup pays, without the network). Measured, interleaved per round:

- ``taskiq``: a plain no-op task through taskiq's `Receiver`, without tracing;
- ``taskiq traced``: the same with taskiq's ``OpenTelemetryMiddleware`` (a span
  per message): the reference;
- ``native traced``: a no-op batch task (batch_size 100) on `BatchReceiver`'s
  batch-native path with taskiq's middleware;
- ``native + batch spans``: the same plus `BatchTracingMiddleware` (a span
  per call with a link per message).

Prints medians in µs per item and what each traced way adds, as a ratio to
taskiq's traced message.
"""

import argparse
import asyncio
import json
import statistics
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from machinery import CHUNK, encode, through_native, through_receiver
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from taskiq import AsyncBroker, InMemoryBroker, TaskiqMiddleware
from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware
from taskiq.receiver import Receiver
from taskiq.result_backends.dummy import DummyResultBackend

from batchtask import BatchReceiver, batch_task
from batchtask.tracing import BatchTracingMiddleware


class Dropped(SpanExporter):
    """Takes every span and sends it nowhere."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def traced_broker(*middlewares: TaskiqMiddleware) -> AsyncBroker:
    """A broker with a no-op plain task and a no-op batch task."""
    broker = InMemoryBroker().with_result_backend(DummyResultBackend())
    broker.add_middlewares(*middlewares)

    @batch_task(broker, batch_size=100, batch_timeout=0.5, task_name="bench:batched")
    async def batched(items: list[int]) -> None:
        return None

    @broker.task(task_name="bench:plain")
    async def plain(item: int) -> None:
        return None

    return broker


async def main() -> None:
    """Measure, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the figures")
    args = parser.parse_args()
    items = args.items - args.items % CHUNK or CHUNK

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    bare = traced_broker()
    traced = traced_broker(OpenTelemetryMiddleware(tracer_provider=provider))
    spanned = traced_broker(
        OpenTelemetryMiddleware(tracer_provider=provider),
        BatchTracingMiddleware(tracer_provider=provider),
    )
    ways: dict[str, Callable[[], Awaitable[float]]] = {}
    for broker in (bare, traced, spanned):
        await broker.startup()
    # Encoded as every InMemoryBroker encodes them (taskiq's JSON formatter).
    plain = encode("bench:plain", items)
    batched = encode("bench:batched", items)
    receiver = Receiver(bare, max_async_tasks=100)
    traced_receiver = Receiver(traced, max_async_tasks=100)
    natives = []
    for broker in (traced, spanned):
        native = BatchReceiver(broker, max_async_tasks=100, run_startup=False)
        assert native.native is not None
        native.native.start()
        natives.append(native)
    ways = {
        "taskiq": lambda: through_receiver(receiver, plain),
        "taskiq traced": lambda: through_receiver(traced_receiver, plain),
        "native traced": lambda: through_native(natives[0], batched),
        "native + batch spans": lambda: through_native(natives[1], batched),
    }
    for measure in ways.values():  # warm up
        await measure()
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        order = list(ways) if round_ % 2 == 0 else list(ways)[::-1]
        for name in order:
            runs[name].append(await ways[name]())
    for broker in (bare, traced, spanned):
        await broker.shutdown()
    provider.shutdown()

    median = {name: statistics.median(values) for name, values in runs.items()}
    reference = median["taskiq traced"]
    print(f"{items} items x {args.rounds} interleaved rounds, µs per item (median)")
    for name, values in runs.items():
        print(
            f"  {name:22} {median[name]:6.1f}  (min {min(values):.1f}, "
            f"max {max(values):.1f})  {median[name] / reference:.2f}x taskiq traced"
        )
    tracing = reference - median["taskiq"]
    spans = median["native + batch spans"] - median["native traced"]
    print(
        f"  taskiq's span per message adds {tracing:.1f} µs; batch spans add "
        f"{spans:.1f} µs per item on top ({spans / reference:.2f}x a traced message)"
    )
    if args.json is not None:
        report = {
            "items": items,
            "rounds": args.rounds,
            "us_per_item": runs,
            "median_us": median,
            "batch_spans_us_per_item": spans,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
