"""Settings changes that reach every worker process: `batchtask._notices`."""

import asyncio
import os
import subprocess
import sys
import time

import pytest
from taskiq_redis import RedisStreamBroker

from batchtask import batch_task
from batchtask._notices import _follow
from tests.conftest import within
from tests.workers import new_queue, require_broker


async def test_reconfigure_fleet_reaches_a_following_process_within_a_second() -> None:
    require_broker("stream")
    queue = new_queue()
    here = RedisStreamBroker("redis://127.0.0.1:6379", queue_name=queue)
    there = RedisStreamBroker("redis://127.0.0.1:6379", queue_name=queue)

    def declare(broker: RedisStreamBroker) -> object:
        @batch_task(broker, batch_size=10, batch_timeout=1.0, task_name="n:save")
        async def save(rows: list[int]) -> None:
            return None

        return save

    sender, follower = declare(here), declare(there)
    following = asyncio.create_task(_follow(there))
    try:
        await asyncio.sleep(0.3)  # subscribed
        sent = time.monotonic()
        listening = await sender.reconfigure_fleet(batch_size=3)  # type: ignore[attr-defined]
        while follower.config.batch_size != 3:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
            assert time.monotonic() - sent < 5, "not applied (a hang)"
        took = time.monotonic() - sent
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await here.shutdown()
        await there.shutdown()
    print(f"reconfigure_fleet: applied in the other process after {took * 1000:.0f} ms")
    assert listening >= 1
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


def test_the_command_line_sends_a_change() -> None:
    require_broker("stream")
    env = {**os.environ, "BATCHTASK_BROKER": "stream", "BATCHTASK_QUEUE": new_queue()}

    def reconfigure(*changes: str) -> subprocess.CompletedProcess[str]:
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

    done = reconfigure("batch_size=7", "debounce=null")
    assert done.returncode == 0, done.stderr
    assert "sent app:double: {'batch_size': 7, 'debounce': None}" in done.stdout
    bad = reconfigure("batch_size=0")
    assert bad.returncode == 2
    assert "batch_size=0" in bad.stderr
