"""Settings changes that reach every worker process: `batchtask._notices`."""

import asyncio
import os
import subprocess
import sys
import time

import pytest
from taskiq import AsyncBroker
from taskiq_redis import RedisStreamBroker

from batchtask import batch_task
from batchtask._notices import _follow
from tests.conftest import within
from tests.workers import (
    RECEIVER,
    app_env,
    kill,
    new_queue,
    require_broker,
    start_worker,
    wait_listening,
    worker_log,
)


def notice_broker(kind: str, queue: str) -> AsyncBroker:
    """A broker of `kind` on `queue`, as tests.worker_app.app makes it."""
    if kind == "rabbitmq":
        from taskiq_aio_pika import AioPikaBroker

        return AioPikaBroker("amqp://guest:guest@127.0.0.1:5672/", queue_name=queue)
    if kind == "nats":
        from nats.js.api import StreamConfig
        from taskiq_nats import PullBasedJetStreamBroker

        return PullBasedJetStreamBroker(
            "nats://127.0.0.1:4222",
            subject=queue,
            stream_name=queue,
            durable=queue,
            stream_config=StreamConfig(name=queue, subjects=[queue]),
        )
    return RedisStreamBroker("redis://127.0.0.1:6379", queue_name=queue)


@pytest.mark.parametrize("kind", ["stream", "rabbitmq", "nats"])
async def test_reconfigure_fleet_reaches_a_following_process_within_a_second(
    kind: str,
) -> None:
    """Redis: ``PUBLISH``; RabbitMQ: a fanout exchange; NATS: a subject.

    The sender's broker is not started (as in a shell); the follower's is, as
    in a worker."""
    require_broker(kind)
    queue = new_queue()
    here, there = notice_broker(kind, queue), notice_broker(kind, queue)

    def declare(broker: AsyncBroker) -> object:
        @batch_task(broker, batch_size=10, batch_timeout=1.0, task_name="n:save")
        async def save(rows: list[int]) -> None:
            return None

        return save

    sender, follower = declare(here), declare(there)
    await within(there.startup(), 30)
    following = asyncio.create_task(_follow(there))
    try:
        await asyncio.sleep(0.5)  # subscribed
        sent = time.monotonic()
        sending = asyncio.create_task(sender.reconfigure_fleet(batch_size=3))  # type: ignore[attr-defined]
        while follower.config.batch_size != 3:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
            assert time.monotonic() - sent < 5, "not applied (a hang)"
        took = time.monotonic() - sent
        listening = await within(sending, 10)  # it counts answers for a while
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        if kind != "nats":  # taskiq-nats cannot shut down a broker never started
            await here.shutdown()
        await there.shutdown()
    print(f"reconfigure_fleet[{kind}]: applied after {took * 1000:.0f} ms")
    assert listening == 1
    assert sender.config.batch_size == 3  # type: ignore[attr-defined]
    assert took < 1.0


async def test_a_function_cannot_travel_and_a_bad_value_sends_nothing() -> None:
    require_broker("stream")
    broker = RedisStreamBroker("redis://127.0.0.1:6379", queue_name=new_queue())

    @batch_task(broker, batch_size=10, batch_timeout=1.0, task_name="n:other")
    async def save(rows: list[int]) -> None:
        return None

    with pytest.raises(TypeError, match="cannot be sent"):
        await within(save.reconfigure_fleet(weight=len), 10)
    with pytest.raises(Exception, match="batch_size=0"):
        await within(save.reconfigure_fleet(batch_size=0), 10)
    assert save.config.batch_size == 10
    await broker.shutdown()


def reconfigure(env: dict[str, str], *changes: str) -> subprocess.CompletedProcess[str]:
    """``python -m batchtask reconfigure`` of ``app:double`` on the test app."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "batchtask",
            "reconfigure",
            "tests.worker_app.app:broker",
            "app:double",
            *changes,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_the_command_line_sends_a_change() -> None:
    require_broker("stream")
    env = {**os.environ, "BATCHTASK_BROKER": "stream", "BATCHTASK_QUEUE": new_queue()}

    done = reconfigure(env, "batch_size=7", "debounce=null")
    assert done.returncode == 0, done.stderr
    assert "sent app:double: {'batch_size': 7, 'debounce': None}" in done.stdout
    bad = reconfigure(env, "batch_size=0")
    assert bad.returncode == 2
    assert "batch_size=0" in bad.stderr


@pytest.mark.workers
@pytest.mark.parametrize("kind", ["stream", "rabbitmq", "nats"])
async def test_the_command_line_reaches_every_worker_process(kind: str) -> None:
    """Goal 4 of the fleets issue: ``python -m batchtask reconfigure`` from a
    shell reaches both processes of a ``taskiq worker --workers 2`` command,
    which each apply it and say so."""
    require_broker(kind)
    queue = new_queue()
    with app_env(queue, BATCHTASK_BROKER=kind) as env:
        worker = start_worker(env, "--workers", "2", *RECEIVER)
    try:
        await wait_listening(worker)
        sent = ""
        for _ in range(60):  # until both processes follow (they start apart)
            done = await asyncio.to_thread(reconfigure, env, "batch_size=7")
            assert done.returncode == 0, done.stderr
            sent = done.stdout
            if "to 2 listening" in sent:
                break
            await asyncio.sleep(0.5)
        assert "to 2 listening worker process(es)" in sent, sent
        applied: set[str] = set()
        for _ in range(100):
            applied = {
                line.split("][")[3]
                for line in worker_log(worker).splitlines()
                if "app:double reconfigured across the fleet: {'batch_size': 7}" in line
            }
            if len(applied) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        kill(worker)
    assert len(applied) == 2, worker_log(worker)
