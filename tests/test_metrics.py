"""Prometheus metrics of batch tasks (batchtask.metrics)."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from taskiq import InMemoryBroker

from batchtask import DeadLetter, PartialFailure, batch_task, flush_all
from batchtask.metrics import MAX_GROUPS, BatchMetricsMiddleware
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


async def test_retries_dead_letters_and_group_keys_are_counted() -> None:
    """Retried and dead-lettered items have counters of their own (and are
    not failures until final); calls count per group_by key, bounded."""
    registry = CollectorRegistry()
    broker = InMemoryBroker().with_middlewares(BatchMetricsMiddleware(registry))
    await broker.startup()
    letters: list[DeadLetter] = []

    class Letters:
        async def kiq(self, letter: DeadLetter) -> None:
            letters.append(letter)

    @batch_task(
        broker,
        batch_size=100,
        batch_timeout=0.05,
        max_attempts=2,
        dead_letter=Letters(),
        group_by=lambda n: n % 2,
        task_name="m:retry",
    )
    async def odd_fail(values: list[int]) -> None:
        if values[0] % 2:
            raise RuntimeError("odd")

    tasks = [await odd_fail.kiq(v) for v in range(6)]
    results = [await within(t.wait_result(timeout=10)) for t in tasks]
    await within(broker.wait_all())
    await broker.shutdown()
    task = {"task_name": "m:retry"}
    assert [r.is_err for r in results] == [False, True] * 3
    assert sample(registry, "batch_items_retried_total", **task) == 3
    assert sample(registry, "batch_items_dead_lettered_total", **task) == 3
    assert sample(registry, "batch_items_failed_total", **task) == 3, "final only"
    assert sample(registry, "batch_group_calls_total", group="0", **task) == 1
    assert sample(registry, "batch_group_calls_total", group="1", **task) == 2
    assert len(letters) == 3


def test_group_labels_stop_at_max_groups() -> None:
    registry = CollectorRegistry()
    metrics = BatchMetricsMiddleware(registry)
    for key in range(MAX_GROUPS + 5):
        metrics.called_group("m:many", repr(key))
    metrics.called_group("m:many", "0")
    labels = {"task_name": "m:many"}
    assert sample(registry, "batch_group_calls_total", group="other", **labels) == 5
    assert sample(registry, "batch_group_calls_total", group="0", **labels) == 2


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


SERVED = """
import asyncio, sys, tempfile
from pathlib import Path
from taskiq import InMemoryBroker
from taskiq.middlewares.prometheus_middleware import PrometheusMiddleware
from batchtask import batch_task, flush_all
from batchtask.metrics import BatchMetricsMiddleware

broker = InMemoryBroker().with_middlewares(
    PrometheusMiddleware(metrics_path=Path(tempfile.mkdtemp())),
    BatchMetricsMiddleware(),
)

@batch_task(broker, batch_size=3, batch_timeout=60, task_name="m:count")
async def count(values: list[int]) -> int:
    return len(values)

async def main() -> None:
    await broker.startup()
    tasks = [await count.kiq(i) for i in range(4)]
    await flush_all(broker)
    print([(await t.wait_result()).return_value for t in tasks])
    await broker.shutdown()

asyncio.run(main())
# Imported only now, as a worker's metrics server does: prometheus_client
# picks its multiprocess mode when first imported.
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
sys.stdout.write(generate_latest(registry).decode())
"""


def test_metrics_reach_taskiqs_multiprocess_collector() -> None:
    """With taskiq's PrometheusMiddleware (multiprocess mode, what its server
    serves), batchtask's metrics are collected with the worker's others."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", SERVED],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = run.stdout.splitlines()
    assert lines[0] == "[3, 3, 3, 1]"
    assert 'batch_flushes_total{reason="size",task_name="m:count"} 1.0' in lines
    assert 'batch_flushes_total{reason="manual",task_name="m:count"} 1.0' in lines
    assert 'batch_size_sum{task_name="m:count"} 4.0' in lines


async def test_faults_a_receiver_survived_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Result writes and acks retried over dropped connections, and a listen()
    started again, show as counters (no server: the faults are injected)."""
    import redis.exceptions
    from taskiq import TaskiqResult
    from taskiq.brokers.inmemory_broker import InmemoryResultBackend

    from batchtask import BatchReceiver, _faults, worker
    from tests.conftest import results_through
    from tests.test_differential import AckingBroker, Log

    monkeypatch.setattr(_faults, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setattr(worker, "RELISTEN_DELAYS", (0.0,))
    dropped = redis.exceptions.ConnectionError("dropped")

    class FlakyBackend(InmemoryResultBackend[object]):
        writes_to_fail = 2

        async def set_result(self, task_id: str, result: TaskiqResult[object]) -> None:
            if FlakyBackend.writes_to_fail:
                FlakyBackend.writes_to_fail -= 1
                raise dropped
            await super().set_result(task_id, result)

    class FlakyBroker(AckingBroker):
        listens = 0

        async def listen(self):  # type: ignore[override]
            FlakyBroker.listens += 1
            if FlakyBroker.listens == 1:
                raise dropped
                yield b""  # an async generator
            async for message in super().listen():
                yield message

    log: Log = {}
    registry = CollectorRegistry()
    broker = FlakyBroker(log).with_result_backend(FlakyBackend())
    broker.add_middlewares(BatchMetricsMiddleware(registry))

    @batch_task(broker, batch_size=5, batch_timeout=0.05, task_name="m:faults")
    async def write(values: list[int]) -> None:
        pass

    await broker.startup()
    tasks = [await write.kiq(v) for v in range(5)]
    receiver = BatchReceiver(broker, max_async_tasks=100, run_startup=False)
    results = await results_through(receiver, tasks)
    await broker.shutdown()

    assert not any(r.is_err for r in results)
    assert sample(registry, "batch_retries_total", what="write") >= 1
    assert sample(registry, "batch_given_up_total", what="write") == 0
    assert sample(registry, "batch_relistens_total") == 1


def test_each_fault_event_has_its_counter() -> None:
    from batchtask._faults import FAULT_EVENTS

    registry = CollectorRegistry()
    metrics = BatchMetricsMiddleware(registry)
    for count, event in enumerate(FAULT_EVENTS, start=1):
        metrics.fault(event, count)
    expected = {
        ("batch_retries_total", (("what", "write"),)): 1,
        ("batch_given_up_total", (("what", "write"),)): 2,
        ("batch_retries_total", (("what", "ack"),)): 3,
        ("batch_given_up_total", (("what", "ack"),)): 4,
        ("batch_redelivered_total", (("outcome", "joined"),)): 5,
        ("batch_redelivered_total", (("outcome", "acked_unrun"),)): 6,
        ("batch_suspect_items_total", ()): 7,
        ("batch_poison_items_total", ()): 8,
        ("batch_relistens_total", ()): 9,
    }
    for (name, labels), value in expected.items():
        assert sample(registry, name, **dict(labels)) == value, name
