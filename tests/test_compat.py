"""taskiq's private names batchtask relies on: present, and a safe fallback if not."""

import logging

import pytest
from taskiq import InMemoryBroker
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from batchtask import BatchReceiver, _compat, batch_task
from batchtask.brokers.redis_stream import RedisStream
from tests.conftest import results_through
from tests.test_differential import AckingBroker, Log, RecordingBackend


def test_every_private_name_of_taskiq_the_receiver_uses_is_there() -> None:
    receiver = Receiver(InMemoryBroker(), run_startup=False)
    assert _compat.receiver_changes(receiver) == [], (
        "taskiq's receiver changed; see batchtask._compat.PRIVATE_NAMES"
    )
    assert _compat.END_OF_DELIVERIES is not None
    delivery = _compat.delivery(b"x", owns_delivery_slot=True)
    assert (delivery.data, delivery.owns_delivery_slot) == (b"x", True)


def test_every_private_name_of_taskiq_redis_is_there() -> None:
    assert RedisStream(RedisStreamBroker("redis://127.0.0.1:6379")).changes() == []


def test_a_changed_receiver_is_named() -> None:
    class Changed:
        sem = None

    changed = _compat.receiver_changes(Changed())
    assert "Receiver.sem_prefetch" in changed
    assert "Receiver.dependency_graphs" in changed
    assert "Receiver.sem" not in changed


async def test_on_a_changed_taskiq_batches_run_on_taskiqs_own_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compat, "receiver_changes", lambda _: ["Receiver.runner"])
    log: Log = {}
    broker = AckingBroker(log)
    broker.with_result_backend(RecordingBackend(log))
    calls: list[list[int]] = []

    @batch_task(broker, batch_size=5, batch_timeout=0.05, results="per_item")
    async def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * item for item in items]

    await broker.startup()
    tasks = [await double.kiq(i) for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="batchtask"):
        receiver = BatchReceiver(broker, max_async_tasks=100, run_startup=False)
    assert receiver.native is None
    assert "Receiver.runner" in caplog.text
    assert "taskiq's own path" in caplog.text
    results = await results_through(receiver, tasks, 10)
    assert [r.return_value for r in results] == [2 * i for i in range(10)]
    assert sorted(v for call in calls for v in call) == list(range(10))
    assert all(("ack",) in events for events in log.values()), "every message acked"


def test_a_successful_result_is_built_as_pydantic_builds_it() -> None:
    from batchtask import _native

    assert _native._success is _native._set_success, "the direct build is in use"
    direct = _native._set_success([1], 0.25, {"a": "1"})
    built = _native._constructed_success([1], 0.25, {"a": "1"})
    assert direct == built
    assert direct.model_dump() == built.model_dump()
    assert direct.model_fields_set == built.model_fields_set
    assert direct.model_dump_json() == built.model_dump_json()
