"""Each taskiq ack type on real brokers, with real `taskiq worker` processes.

Brokers: Redis stream (RedisStreamBroker, and the Cluster and Sentinel
brokers), RabbitMQ (taskiq-aio-pika) and NATS JetStream (taskiq-nats, pull
consumer); each under taskiq's stock
receiver and under ``--receiver batchtask:BatchReceiver``, which must behave
the same. The worker serves the ``app:ack_*`` batch tasks of
``tests/worker_app/app.py``, one per way of acknowledging.

How an unacknowledged message is seen on each broker:

- Redis streams: the consumer group's pending entries (``XPENDING``), read
  back with ``XRANGE`` to name each pending item;
- RabbitMQ: nothing shows a live consumer's unacked messages without the
  management plugin, so the worker is killed at the end: RabbitMQ puts its
  unacked messages back in the queue, and the test reads them from there
  (each one named);
- NATS JetStream: the durable consumer's ``num_ack_pending`` (a count only),
  before and after each ack type's items.

Each test prints one line per case: broker, receiver, ack type, kicked,
acked, pending.
"""

import asyncio
import contextlib
import functools
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import redis.asyncio as redis
from taskiq.exceptions import TaskiqResultTimeoutError

from tests.workers import (
    RECEIVER,
    REDIS_URL,
    STREAM_KINDS,
    app_env,
    kill,
    new_queue,
    producer,
    received,
    require_broker,
    serving,
    start_worker,
    stream_client,
    until,
    wait_listening,
    worker_log,
)

NATS_URL = "nats://127.0.0.1:4222"
KINDS = ["stream", "rabbitmq", "nats", "cluster", "sentinel"]
RECEIVERS: dict[str, tuple[str, ...]] = {"stock": (), "batchtask": RECEIVER}
ITEMS = range(20)
"""Each ack type's items: two full batches of 10."""


def _odd(value: int) -> bool:
    return value % 2 == 1


@dataclass(frozen=True)
class Variant:
    """One ``app:ack_*`` task: its ack type, how it acks, what stays pending."""

    task: str
    ack_type: str
    how: str
    pending: Callable[[int], bool]
    """Whether item value `v` must stay unacknowledged."""

    @property
    def label(self) -> str:
        return f"{self.ack_type}{f' ({self.how})' if self.how else ''}"


VARIANTS = [
    Variant("ack_when_received", "when_received", "", lambda v: False),
    Variant("ack_when_executed", "when_executed", "", lambda v: False),
    Variant("ack_when_saved", "when_saved", "", lambda v: False),
    Variant("ack_context", "manual", "taskiq Context.ack()", lambda v: False),
    Variant("ack_batch_context", "manual", "BatchContext.ack()", lambda v: False),
    Variant("ack_even_items", "manual", "BatchContext.ack_item(i), even values", _odd),
    Variant("ack_none", "manual", "no ack", lambda v: True),
]


# --- what each broker still holds unacknowledged --------------------------


async def stream_pending(
    app: ModuleType, queue: str, kind: str = "stream"
) -> dict[str, list[int]]:
    """The Redis stream group's pending entries: item values per task name."""
    client = stream_client(kind)
    try:
        entries = await client.xpending_range(queue, queue, "-", "+", 100_000)
        pending: dict[str, list[int]] = {}
        for entry in entries:
            msg_id = entry["message_id"]
            [(_, fields)] = await client.xrange(queue, msg_id, msg_id)
            message = app.broker.formatter.loads(fields[b"data"])
            pending.setdefault(message.task_name, []).append(message.args[0])
    finally:
        await client.aclose()
    return {name: sorted(values) for name, values in pending.items()}


async def stream_pending_count(queue: str, kind: str = "stream") -> int:
    client = stream_client(kind)
    try:
        return int((await client.xpending(queue, queue))["pending"])
    finally:
        await client.aclose()


async def stream_undelivered(queue: str) -> int:
    """Entries of the stream the group has not read yet (``XINFO GROUPS`` lag)."""
    client = redis.from_url(REDIS_URL)
    try:
        [group] = await client.xinfo_groups(queue)
    finally:
        await client.aclose()
    return int(group["lag"])


async def rabbitmq_requeued(
    app: ModuleType, queue: str, worker: subprocess.Popen[bytes]
) -> dict[str, list[int]]:
    """Kill the worker; the messages RabbitMQ puts back: values per task name."""
    import aio_pika

    kill(worker)
    connection = await aio_pika.connect(app.AMQP_URL)
    async with connection:
        channel = await connection.channel()

        async def consumer_gone() -> bool:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.consumer_count == 0

        # The dead worker's channel closes, and its unacked messages go back.
        await until(consumer_gone, 60, "RabbitMQ to drop the killed consumer")
        rabbit_queue = await channel.declare_queue(queue, passive=True)
        requeued: dict[str, list[int]] = {}
        while (message := await rabbit_queue.get(no_ack=True, fail=False)) is not None:
            taskiq_message = app.broker.formatter.loads(message.body)
            requeued.setdefault(taskiq_message.task_name, []).append(
                taskiq_message.args[0]
            )
    return {name: sorted(values) for name, values in requeued.items()}


class Nats:
    """The test queue's durable JetStream consumer, as the server counts it."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.client: Any = None

    async def __aenter__(self) -> "Nats":
        import nats

        self.client = await nats.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def info(self) -> Any:
        return await self.client.jetstream().consumer_info(self.queue, self.queue)

    async def ack_pending(self) -> int:
        """Delivered and not acknowledged yet."""
        return int((await self.info()).num_ack_pending)


async def settled(
    read: Callable[[], Awaitable[int]], expected: int, seconds: float = 15
) -> int:
    """`read()` once it equals `expected` and still does a moment later, or
    its last value after `seconds` (acks travel after the results are stored;
    the bound only turns a hang into a failure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    value = await read()
    while loop.time() < deadline:
        if value == expected:
            await asyncio.sleep(0.3)  # anything late would show now
            value = await read()
            if value == expected:
                return value
        await asyncio.sleep(0.05)
        value = await read()
    return value


async def results_of(tasks: list[Any], what: str) -> list[Any]:
    """The tasks' results; a hang becomes a failure naming `what`."""
    try:
        return await asyncio.gather(
            *(t.wait_result(timeout=60, check_interval=0.05) for t in tasks)
        )
    except TaskiqResultTimeoutError:
        raise AssertionError(f"{what}: results missing after 60 s") from None


async def ack_calls(queue: str, task: str) -> list[tuple[list[int], str, bool]]:
    """Each call of `task`: its values, ``ctx.acked`` as 0/1, ordered messages."""
    client = redis.from_url(REDIS_URL)
    try:
        raw = await client.lrange(f"{queue}:ack_calls:{task}", 0, -1)
    finally:
        await client.aclose()
    calls = []
    for entry in raw:
        _, values, *rest = entry.decode().split(":")
        acked = rest[0] if rest else ""
        calls.append(([int(v) for v in values.split(",")], acked, "ordered" in rest))
    return calls


async def drop_ack_calls(queue: str) -> None:
    client = redis.from_url(REDIS_URL)
    await client.delete(*(f"{queue}:ack_calls:{v.task}" for v in VARIANTS))
    await client.aclose()


# --- the tests -------------------------------------------------------------


@pytest.mark.parametrize("receiver", list(RECEIVERS))
@pytest.mark.parametrize("kind", KINDS)
async def test_each_ack_type_acks_what_it_promises(kind: str, receiver: str) -> None:
    """One worker serves every ``app:ack_*`` task; each gets 20 items (two
    batches of 10) in turn, and the broker must hold unacknowledged exactly:

    - ``when_received`` / ``when_executed`` / ``when_saved``: nothing, once
      the results are stored;
    - ``manual`` with taskiq's ``Context.ack()`` once per call: nothing (the
      call's every message is acked, not only one);
    - ``manual`` with ``BatchContext.ack()``: nothing; with
      ``ack_item(i)`` on the even values only: exactly the odd values;
    - ``manual`` without an ack: every message (the broker would redeliver).
    """
    require_broker(kind)
    queue = new_queue()
    failures: list[str] = []
    lines: list[str] = []
    live: dict[str, int] = {}  # per task: unacked after its items (stream, NATS)
    final: dict[str, list[int]] | None = None  # per task: the unacked values
    sizes: dict[str, list[int]] = {}
    nats = Nats(NATS_URL, queue) if kind == "nats" else None
    try:
        async with (
            serving(
                queue,
                *RECEIVERS[receiver],
                BATCHTASK_BROKER=kind,
                BATCHTASK_ACK_TASKS="1",
                BATCHTASK_BATCH_SIZE="10",
                BATCHTASK_BATCH_TIMEOUT="2",
            ) as (worker, app),
            nats or contextlib.nullcontext(),
        ):
            try:
                read: Callable[[], Awaitable[int]] | None = None
                if kind in STREAM_KINDS:
                    read = functools.partial(stream_pending_count, queue, kind)
                elif nats is not None:
                    read = nats.ack_pending
                for variant in VARIANTS:
                    before = await read() if read else 0
                    task = getattr(app, variant.task)
                    kicked = await asyncio.gather(*(task.kiq(v) for v in ITEMS))
                    results = await results_of(kicked, variant.task)
                    errors = [r.error for r in results if r.is_err]
                    if errors or [r.return_value for r in results] != [
                        2 * v for v in ITEMS
                    ]:
                        failures.append(f"{variant.task}: results wrong: {errors[:3]}")
                    calls = await ack_calls(queue, variant.task)
                    sizes[variant.task] = [len(values) for values, _, _ in calls]
                    failures.extend(_check_calls(variant, calls))
                    if read is not None:
                        expected = sum(map(variant.pending, ITEMS))
                        after = await settled(
                            functools.partial(_minus, read, before), expected
                        )
                        live[variant.task] = after
                if kind in STREAM_KINDS:
                    final = await stream_pending(app, queue, kind)
                elif kind == "rabbitmq":
                    await asyncio.sleep(0.5)  # acks written just now reach RabbitMQ
                    final = await rabbitmq_requeued(app, queue, worker)
                elif nats is not None:
                    info = await nats.info()
                    if info.num_pending:
                        failures.append(f"NATS: {info.num_pending} never delivered")
            finally:
                log = worker_log(worker)
    finally:
        await drop_ack_calls(queue)

    for variant in VARIANTS:
        expected_values = [v for v in ITEMS if variant.pending(v)]
        values = None if final is None else final.get(f"app:{variant.task}", [])
        pending = live[variant.task] if values is None else len(values)
        case = f"ack[{kind}, {receiver} receiver, {variant.label}]"
        lines.append(
            f"{case}: kicked {len(ITEMS)}, acked {len(ITEMS) - pending}, "
            f"pending {pending}"
            + (f" {_describe(values)}" if values else "")
            + f"; calls of {sizes.get(variant.task)}"
        )
        if values is not None and values != expected_values:
            failures.append(
                f"{case}: expected pending {_describe(expected_values)}, "
                f"got {_describe(values)}"
            )
        if variant.task in live and live[variant.task] != len(expected_values):
            failures.append(
                f"{case}: expected {len(expected_values)} pending right after "
                f"the results, got {live[variant.task]}"
            )
    print(*lines, sep="\n")
    assert not failures, "\n".join([*failures, f"worker log (tail):\n{log[-3000:]}"])


@pytest.mark.parametrize("receiver", list(RECEIVERS))
async def test_when_received_acks_buffered_items_so_a_crash_loses_them(
    receiver: str,
) -> None:
    """Redis stream, long ``batch_timeout``: 20 ``when_received`` and 20
    ``when_saved`` items wait in their batches. The ``when_received`` ones
    are already acknowledged, the ``when_saved`` ones are not. After SIGKILL,
    a second worker gets the 20 ``when_saved`` items again (redelivered) and
    never the ``when_received`` ones: those are lost, the documented price
    of acking on receipt."""
    require_broker("stream")
    queue = new_queue()
    first_settings = {
        "BATCHTASK_BROKER": "stream",
        "BATCHTASK_ACK_TASKS": "1",
        "BATCHTASK_BATCH_SIZE": "100",
        "BATCHTASK_BATCH_TIMEOUT": "300",
    }
    flags = RECEIVERS[receiver]
    with app_env(queue, **first_settings) as env:
        first = start_worker(env, "--workers", "1", *flags)
    try:
        await wait_listening(first)
        with app_env(queue, **first_settings):
            async with producer(queue) as app:
                on_receipt = await asyncio.gather(
                    *(app.ack_when_received.kiq(v) for v in ITEMS)
                )
                after_save = await asyncio.gather(
                    *(app.ack_when_saved.kiq(v) for v in ITEMS)
                )
                kicked = 2 * len(ITEMS)
                await until(
                    lambda: _at_least(received(queue), kicked),
                    60,
                    f"{kicked} items buffered by the first worker",
                )
                buffered_pending = await settled(
                    lambda: stream_pending_count(queue), len(ITEMS)
                )
                pending_before_kill = await stream_pending(app, queue)
                calls_before_kill = await _all_ack_calls(queue)
                kill(first)
                pending_after_kill = await stream_pending(app, queue)
                undelivered = await stream_undelivered(queue)

                # A second worker claims what the dead one left unacknowledged.
                second_settings = {
                    **first_settings,
                    "BATCHTASK_BATCH_SIZE": "10",
                    "BATCHTASK_BATCH_TIMEOUT": "0.3",
                    "BATCHTASK_REDELIVER_AFTER": "1",
                }
                with app_env(queue, **second_settings) as env:
                    second = start_worker(env, "--workers", "1", *flags)
                try:
                    await wait_listening(second)

                    async def nudge() -> None:
                        # taskiq-redis's own listen() claims idle pending
                        # entries only after reading new ones; BatchReceiver
                        # claims on a timer.
                        await app.nudge.kiq()

                    async def saved_done() -> bool:
                        return all([await t.is_ready() for t in after_save])

                    await until(
                        saved_done,
                        60,
                        "the when_saved items redelivered and processed",
                        every=0.3,
                        meanwhile=nudge if not flags else None,
                    )
                    redelivered = [await t.wait_result(timeout=10) for t in after_save]
                    lost = [not await t.is_ready() for t in on_receipt]
                    pending_at_end = await stream_pending_count(queue)
                    ran_later = await _ran(queue, "ack_when_received")
                finally:
                    kill(second)
    finally:
        kill(first)
        await drop_ack_calls(queue)

    saved_pending = pending_before_kill.get("app:ack_when_saved", [])
    received_pending = pending_before_kill.get("app:ack_when_received", [])
    print(
        f"ack[stream, {receiver} receiver, when_received] buffered "
        f"(batch_timeout=300): kicked {len(ITEMS)}, acked "
        f"{len(ITEMS) - len(received_pending)} before their batch ran, pending "
        f"{len(received_pending)}; after "
        f"SIGKILL: lost {sum(lost)} of {len(ITEMS)} (acked on receipt, never "
        f"redelivered: the documented price of when_received)"
    )
    print(
        f"ack[stream, {receiver} receiver, when_saved] buffered (batch_timeout=300): "
        f"kicked {len(ITEMS)}, acked {len(ITEMS) - len(saved_pending)}, pending "
        f"{len(saved_pending)}; after SIGKILL: redelivered and processed "
        f"{sum(not r.is_err for r in redelivered)} of {len(ITEMS)}"
    )
    assert calls_before_kill == [], "nothing ran before the kill"
    assert buffered_pending == len(ITEMS), "only the when_saved items are pending"
    assert received_pending == [], "when_received: acked while still buffered"
    assert saved_pending == list(ITEMS), "when_saved: unacked while buffered"
    assert pending_after_kill == pending_before_kill
    assert undelivered == 0, "the group had read every entry"
    assert [r.return_value for r in redelivered] == [2 * v for v in ITEMS]
    assert all(lost), "the when_received items are gone with the killed worker"
    assert ran_later == [], "no worker ever ran a when_received item"
    assert pending_at_end == 0


# --- helpers ---------------------------------------------------------------


def _check_calls(
    variant: Variant, calls: list[tuple[list[int], str, bool]]
) -> list[str]:
    """What is wrong with the calls the task recorded for `variant`."""
    failures = []
    values = sorted(v for call, _, _ in calls for v in call)
    if values != list(ITEMS):
        failures.append(f"{variant.task}: called with {values}, not each item once")
    if len(calls) >= len(ITEMS):
        failures.append(f"{variant.task}: no batching, {len(calls)} calls")
    if variant.task in {"ack_batch_context", "ack_even_items", "ack_none"}:
        for call, acked, ordered in calls:
            want = "".join("0" if variant.pending(v) else "1" for v in call)
            if acked != want:
                failures.append(
                    f"{variant.task}: BatchContext.acked {acked} for values "
                    f"{call}, expected {want}"
                )
            if not ordered:
                failures.append(
                    f"{variant.task}: ctx.messages not in item order for {call}"
                )
    return failures


def _describe(values: list[int]) -> str:
    if values and all(v % 2 for v in values) and len(values) == len(ITEMS) // 2:
        return f"(the odd values {values})"
    return f"(values {values})"


async def _minus(read: Callable[[], Awaitable[int]], base: int) -> int:
    return await read() - base


async def _at_least(value: Awaitable[int], minimum: int) -> bool:
    return await value >= minimum


async def _all_ack_calls(queue: str) -> list[tuple[list[int], str, bool]]:
    return [c for v in VARIANTS for c in await ack_calls(queue, v.task)]


async def _ran(queue: str, task: str) -> list[int]:
    return sorted(v for call, _, _ in await ack_calls(queue, task) for v in call)
