"""Prometheus metrics of batch tasks (batchtask.metrics)."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from taskiq import InMemoryBroker

from batchtask import PartialFailure, batch_task, flush_all
from batchtask.metrics import BatchMetricsMiddleware
from tests.conftest import within


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_flushes_sizes_waits_failures_and_buffered_items() -> None:
    registry = CollectorRegistry()
    broker = InMemoryBroker().with_middlewares(BatchMetricsMiddleware(registry))
    await broker.startup()

    @batch_task(broker, batch_size=10, batch_timeout=60, task_name="m:save")
    async def save(values: list[int]) -> None:
        if 24 in values:
            raise PartialFailure({values.index(24): ValueError("bad 24")})

    tasks = await asyncio.gather(*(save.kiq(v) for v in range(25)))
    await asyncio.sleep(0.05)
    buffered_before_flush = sample(registry, "batch_items_buffered", task_name="m:save")
    await within(flush_all(broker))
    results = [await within(t.wait_result(timeout=10)) for t in tasks]
    await broker.shutdown()

    task = {"task_name": "m:save"}
    assert buffered_before_flush == 5, "two full batches ran, five wait"
    assert sample(registry, "batch_items_buffered", **task) == 0
    assert sample(registry, "batch_flushes_total", reason="size", **task) == 2
    assert sample(registry, "batch_flushes_total", reason="manual", **task) == 1
    assert sample(registry, "batch_size_count", **task) == 3
    assert sample(registry, "batch_size_sum", **task) == 25
    assert sample(registry, "batch_size_bucket", le="5.0", **task) == 1
    assert sample(registry, "batch_item_wait_count", **task) == 25
    assert sample(registry, "batch_items_failed_total", **task) == 1
    assert [r.is_err for r in results] == [False] * 24 + [True]


def test_metrics_need_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_prometheus(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("prometheus_client"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(ImportError, match=r"batchtask\[metrics\]"):
        BatchMetricsMiddleware(CollectorRegistry())
