"""Batch tasks' task ids: taskiq's default kind, from buffered ``os.urandom``."""

import uuid

import pytest
from taskiq import InMemoryBroker

from batchtask import batch_task
from batchtask._ids import IDS_PER_READ, fresh_id
from tests.conftest import run_python


def test_fresh_ids_are_random_uuids_as_taskiq_makes_them() -> None:
    ids = [fresh_id() for _ in range(5 * IDS_PER_READ + 3)]
    assert len(set(ids)) == len(ids)
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert parsed.hex == task_id
        assert len(task_id) == 32
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    script = (
        "import os, sys\n"
        "from batchtask._ids import fresh_id\n"
        "fresh_id()\n"  # the parent now holds unread bytes
        "read, write = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.write(write, ' '.join(fresh_id() for _ in range(50)).encode())\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "theirs = set(os.read(read, 1 << 16).decode().split())\n"
        "mine = {fresh_id() for _ in range(50)}\n"
        "assert len(theirs) == len(mine) == 50, (len(theirs), len(mine))\n"
        "assert not theirs & mine, theirs & mine\n"
        "print('ok')\n"
    )
    assert run_python(script, timeout=60).strip() == "ok"


async def test_a_brokers_own_generator_and_with_task_id_are_kept() -> None:
    counter = iter(range(1000))
    broker = InMemoryBroker().with_id_generator(lambda: f"id-{next(counter)}")

    @batch_task(broker, batch_size=2, batch_timeout=60)
    async def save(items: list[int]) -> None: ...

    await broker.startup()
    first = await save.kiq(1)
    chosen = await save.kicker().with_task_id("mine").kiq(2)
    kicker = save.kicker()
    again = [await kicker.kiq(3), await kicker.kiq(4)]
    await broker.wait_all()
    await broker.shutdown()
    assert first.task_id == "id-0"
    assert chosen.task_id == "mine"
    assert [task.task_id for task in again] == ["id-1", "id-2"]


async def test_a_default_broker_gets_fresh_ids_each_kick() -> None:
    broker = InMemoryBroker()

    @batch_task(broker, batch_size=3, batch_timeout=60)
    async def save(items: list[int]) -> None: ...

    await broker.startup()
    kicker = save.kicker()
    tasks = [await kicker.kiq(i) for i in range(3)]
    await broker.wait_all()
    results = [await task.wait_result(timeout=5) for task in tasks]
    await broker.shutdown()
    assert len({task.task_id for task in tasks}) == 3
    assert all(uuid.UUID(hex=task.task_id).version == 4 for task in tasks)
    assert all(not result.is_err for result in results)


def test_fresh_ids_are_the_uuid_modules_own_for_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchtask import _ids

    raw = bytes(range(256)) * (IDS_PER_READ // 16)
    monkeypatch.setattr(_ids.os, "urandom", lambda size: raw[:size])
    made = _ids._read_ids()
    expected = [
        uuid.UUID(bytes=raw[start : start + 16], version=4).hex
        for start in range(0, 16 * IDS_PER_READ, 16)
    ]
    assert made == expected
