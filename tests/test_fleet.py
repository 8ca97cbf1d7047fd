"""`batchtask._fleet.FleetLimits` against an in-memory lease server.

The worker tests (tests/test_fleet_limits.py) run it on Redis with real
worker processes; these pin its rules down quickly: exclusion, renewal,
stopping a call whose lease cannot be kept, and giving up on a silent server;
and the Redis lease scripts on a Redis server, a Cluster and a Sentinel's
master.
"""

import asyncio
import time
import uuid
from typing import Any

import pytest

from batchtask._fleet import FleetLimits, LeaseLost, LeaseUnavailable
from batchtask.brokers import adapter_for
from tests.conftest import within
from tests.workers import require_broker


class Server:
    """Leases in memory, expiring by this process's clock (one process)."""

    def __init__(self) -> None:
        self.holders: dict[str, dict[str, float]] = {}
        self.token = 0
        self.renewals = 0
        self.failing = False
        self.silent = False
        self.forget = False

    async def _ask(self) -> None:
        if self.silent:
            await asyncio.sleep(3600)
        if self.failing:
            raise ConnectionError("down")

    def _live(self, name: str) -> dict[str, float]:
        now = time.monotonic()
        held = self.holders.setdefault(name, {})
        for holder in [h for h, until in held.items() if until <= now]:
            del held[holder]
        return held

    async def acquire(self, name: str, limit: int, holder: str, ttl_ms: int) -> int:
        await self._ask()
        held = self._live(name)
        if len(held) >= limit:
            return 0
        held[holder] = time.monotonic() + ttl_ms / 1000
        self.token += 1
        return self.token

    async def renew(self, name: str, holder: str, ttl_ms: int) -> bool:
        await self._ask()
        self.renewals += 1
        held = self._live(name)
        if self.forget or holder not in held:
            return False
        held[holder] = time.monotonic() + ttl_ms / 1000
        return True

    async def release(self, name: str, holder: str) -> None:
        await self._ask()
        self._live(name).pop(holder, None)


async def test_calls_of_one_key_never_overlap_and_renew_while_they_run() -> None:
    server = Server()
    fleet = FleetLimits(server, ttl=1.0)
    running = 0
    peak = 0

    async def call() -> None:
        nonlocal running, peak
        async with fleet.calls("t", ("k",), None, 1):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.3)
            running -= 1

    await within(asyncio.gather(*(call() for _ in range(5))), 20)
    assert peak == 1
    assert fleet.granted == 5
    assert server.renewals >= 5, "each 0.3 s call renewed (every 0.2 s)"


async def test_a_lease_that_cannot_be_renewed_stops_its_call_before_it_expires() -> (
    None
):
    server = Server()
    fleet = FleetLimits(server, ttl=1.0)
    started = time.monotonic()

    async def long_call() -> None:
        async with fleet.calls("t", ("k",), 1, None):
            server.forget = True  # the server no longer has the lease
            await asyncio.sleep(30)

    with pytest.raises(asyncio.CancelledError):
        await within(asyncio.ensure_future(long_call()), 10)
    assert time.monotonic() - started < 1.0, "stopped within the lease's ttl"
    assert fleet.lost == 1


async def test_a_silent_server_stops_the_call_before_the_lease_could_pass() -> None:
    server = Server()
    fleet = FleetLimits(server, ttl=1.0)
    started = time.monotonic()
    stopped_at = 0.0

    async def long_call() -> None:
        nonlocal stopped_at
        async with fleet.calls("t", ("k",), None, 1):
            server.silent = True
            try:
                await asyncio.sleep(30)
            finally:
                stopped_at = time.monotonic()

    with pytest.raises(asyncio.CancelledError):
        await within(asyncio.ensure_future(long_call()), 10)
    # Granted at `started`; valid here until ttl less the margin (0.3 s).
    assert stopped_at - started < 1.0 - 0.2, "stopped before the lease could pass"


async def test_a_call_whose_lease_lapsed_while_it_ran_keeps_no_outcome() -> None:
    """The process stopped mid-call (its loop held past the lease: SIGSTOP,
    here a blocking sleep), so its keeper could not renew: if the server no
    longer has the lease when the call returns, another process may have
    run the same items, and `LeaseLost` says the outcome must not be kept.
    Held past the validity here but not past the server's expiry: the one
    renewal finds the lease still held, and the call stands."""
    server = Server()
    fleet = FleetLimits(server, ttl=1.0)
    returned = []

    async def call(paused: float) -> None:
        async with fleet.calls("t", ("k",), None, 1):
            time.sleep(paused)  # noqa: ASYNC251 - the stopped process
            returned.append(paused)

    with pytest.raises(LeaseLost):
        await within(call(1.2), 10)
    assert returned == [1.2], "the call itself ran to its end"
    assert fleet.lost == 1
    await within(call(0.85), 10)  # valid here 0.7 s, on the server 1.0 s
    assert fleet.lost == 1
    assert returned == [1.2, 0.85]
    assert issubclass(LeaseLost, LeaseUnavailable), "handled as a call not made"


async def test_no_answer_for_a_leases_lifetime_means_no_call() -> None:
    server = Server()
    server.failing = True
    fleet = FleetLimits(server, ttl=0.5)
    ran = False

    async def call() -> None:
        nonlocal ran
        async with fleet.calls("t", ("k",), None, 1):
            ran = True

    with pytest.raises(LeaseUnavailable):
        await within(call(), 10)
    assert not ran


async def test_a_task_without_limits_takes_no_lease() -> None:
    server = Server()
    fleet = FleetLimits(server, ttl=1.0)
    async with fleet.calls("t", ("k",), None, None):
        pass
    assert fleet.granted == 0
    assert server.holders == {}


def _broker(kind: str) -> Any:
    from taskiq_redis import (
        RedisStreamBroker,
        RedisStreamClusterBroker,
        RedisStreamSentinelBroker,
    )

    if kind == "cluster":
        return RedisStreamClusterBroker("redis://127.0.0.1:7001")
    if kind == "sentinel":
        return RedisStreamSentinelBroker([("127.0.0.1", 26379)], "batchtask")
    return RedisStreamBroker("redis://127.0.0.1:6379")


@pytest.mark.parametrize("kind", ["stream", "cluster", "sentinel"])
async def test_redis_leases_exclude_fence_and_queue_first_come_first_served(
    kind: str,
) -> None:
    """`StreamLeases` on each Redis stream family: a full name grants nothing,
    tokens only grow, the process that asked first gets the next slot, and
    a lease that expired on the server cannot be renewed."""
    require_broker(kind)
    broker = _broker(kind)
    leases = adapter_for(broker).lease_server()
    assert leases is not None
    name = f"test:{uuid.uuid4().hex[:8]}"
    try:
        first = await leases.acquire(name, 1, "a", 5000)
        assert first > 0
        assert await leases.acquire(name, 1, "b", 5000) == 0, "full"
        assert await leases.acquire(name, 1, "c", 5000) == 0, "full, c after b"
        assert await leases.renew(name, "a", 5000)
        await leases.release(name, "a")
        assert await leases.acquire(name, 1, "c", 5000) == 0, "b asked first"
        second = await leases.acquire(name, 1, "b", 5000)
        assert second > first, "fencing tokens only grow"
        await leases.release(name, "b")
        third = await leases.acquire(name, 1, "c", 300)
        assert third > second
        await asyncio.sleep(0.5)
        assert not await leases.renew(name, "c", 300), "expired on the server"
    finally:
        await broker.shutdown()
