"""The pieces the fault tests rely on, without servers: what counts as a
transient fault, bounded retries, the suspect-call gate and call sizes."""

import asyncio
import logging
from collections.abc import Sequence

import pytest
import redis.exceptions
from aiormq.exceptions import ChannelInvalidStateError
from nats.errors import ConnectionClosedError
from taskiq import AckableMessage
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq_aio_pika import AioPikaBroker
from taskiq_redis import RedisStreamBroker

from batchtask import _faults
from batchtask._faults import retried, transient
from batchtask._suspects import MARKER_SUFFIX, POISON, Gate, cap, mark
from batchtask.brokers import adapter_for
from tests.conftest import within


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.TimeoutError(),
        ChannelInvalidStateError("closed"),
        ConnectionClosedError(),
        ConnectionResetError(),
        TimeoutError(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_connection_faults_are_transient(error: BaseException) -> None:
    assert transient(error)


@pytest.mark.parametrize(
    "error",
    [ValueError("bad"), TypeError("not serializable"), KeyError("x")],
    ids=lambda error: type(error).__name__,
)
def test_other_errors_are_not_retried(error: BaseException) -> None:
    assert not transient(error)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> tuple[float, ...]:
    delays = (0.0, 0.0, 0.0)
    monkeypatch.setattr(_faults, "RETRY_DELAYS", delays)
    return delays


async def test_retries_send_again_only_what_failed_transiently(
    quick_retries: tuple[float, ...],
) -> None:
    sent: list[list[str]] = []
    failures = {"a": 2, "b": 0, "c": 1}

    async def send(items: Sequence[str]) -> list[BaseException | None]:
        sent.append(list(items))
        errors: list[BaseException | None] = []
        for item in items:
            if failures[item]:
                failures[item] -= 1
                errors.append(redis.exceptions.ConnectionError("dropped"))
            else:
                errors.append(None)
        return errors

    errors = await retried("storing results", ["a", "b", "c"], send, str)
    assert errors == [None, None, None]
    assert sent == [["a", "b", "c"], ["a", "c"], ["a"]]


async def test_retries_give_up_after_the_last_delay_and_say_so(
    quick_retries: tuple[float, ...], caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def send(items: Sequence[str]) -> list[BaseException | None]:
        nonlocal calls
        calls += 1
        return [ConnectionResetError("down") for _ in items]

    with caplog.at_level(logging.WARNING, logger="batchtask"):
        errors = await retried("acknowledging", ["m1", "m2"], send, str)
    assert calls == 1 + len(quick_retries)
    assert all(isinstance(error, ConnectionResetError) for error in errors)
    assert "acknowledging failed for 2 message(s), given up: m1, m2" in caplog.text
    assert caplog.text.count("retry ") == len(quick_retries)


async def test_a_non_transient_error_is_not_sent_again(
    quick_retries: tuple[float, ...],
) -> None:
    calls = 0

    async def send(items: Sequence[str]) -> list[BaseException | None]:
        nonlocal calls
        calls += 1
        return [TypeError("not serializable")]

    (error,) = await retried("storing results", ["m"], send, str)
    assert isinstance(error, TypeError)
    assert calls == 1


async def test_a_suspect_call_waits_for_running_calls_and_runs_alone() -> None:
    gate = Gate()
    order: list[str] = []

    async def call(name: str, alone: bool, seconds: float) -> None:
        await (gate.enter_alone() if alone else gate.enter())
        order.append(f"{name} in")
        await asyncio.sleep(seconds)
        order.append(f"{name} out")
        gate.leave_alone() if alone else gate.leave()

    first = asyncio.ensure_future(call("a", False, 0.05))
    await asyncio.sleep(0)
    suspect = asyncio.ensure_future(call("s", True, 0.05))
    await asyncio.sleep(0)
    later = asyncio.ensure_future(call("b", False, 0.01))  # arrives while s waits
    await within(asyncio.gather(first, suspect, later), 10)
    assert order == ["a in", "a out", "s in", "s out", "b in", "b out"]


async def test_calls_run_side_by_side_without_suspects() -> None:
    gate = Gate()
    running: list[int] = []

    async def call() -> None:
        await gate.enter()
        running.append(gate.shared)
        await asyncio.sleep(0.01)
        gate.leave()

    await within(asyncio.gather(*(call() for _ in range(5))), 10)
    assert max(running) == 5


async def test_a_suspects_call_size_halves_down_to_the_poison() -> None:
    backend: InmemoryResultBackend[object] = InmemoryResultBackend()
    assert await cap(backend, "m", 100) == 50, "no marker: half a batch"
    await mark(backend, ["m"], 50)
    assert await backend.is_result_ready("m" + MARKER_SUFFIX)
    assert not await backend.is_result_ready("m"), "its result key is untouched"
    assert await cap(backend, "m", 100) == 25
    # A fresh suspect, dying in every call: the sizes of its calls.
    sizes: list[int] = []
    while (size := await cap(backend, "n", 100)) != POISON:
        sizes.append(size)
        await mark(backend, ["n"], size)
    assert sizes == [50, 25, 13, 7, 4, 2, 1], "1 + 7 deaths for a batch of 100"


def test_redelivery_is_read_from_what_the_client_shows() -> None:
    broker = RedisStreamBroker("redis://127.0.0.1:6379", idle_timeout=60_000)
    fresh = AckableMessage(
        data=b"{}", ack=broker._ack_generator(id="99999999999999-0", queue_name="q")
    )
    old = AckableMessage(
        data=b"{}", ack=broker._ack_generator(id="1000-0", queue_name="q")
    )
    looks_redelivered = adapter_for(broker).redelivered
    assert looks_redelivered(fresh) is False
    assert looks_redelivered(old) is None, "old enough: XPENDING tells"
    assert looks_redelivered(b"{}") is False

    class Delivery:  # what aio-pika's IncomingMessage shows
        def __init__(self, redelivered: bool) -> None:
            self.redelivered = redelivered

        async def ack(self) -> None: ...

    Delivery.__module__ = "aio_pika.message"
    for flag in (True, False):
        message = AckableMessage(data=b"{}", ack=Delivery(flag).ack)
        assert adapter_for(AioPikaBroker()).redelivered(message) is flag
