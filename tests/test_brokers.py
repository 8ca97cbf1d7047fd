"""At-least-once on real brokers, with real `taskiq worker` processes.

Brokers: Redis list (ListQueueBroker, no acks), Redis stream
(RedisStreamBroker), RabbitMQ (taskiq-aio-pika) and NATS JetStream
(taskiq-nats, pull consumer). Each test prints what it measured; the README's
"Guarantees" table quotes these tests.
"""

import asyncio
import signal
import time
import uuid
from typing import Any

import pytest
from taskiq import AsyncTaskiqTask, BrokerMessage, TaskiqMessage
from taskiq.exceptions import SendTaskError

from batchtask import BatchArgumentError, BatchCallError, ItemValidationError
from tests.workers import (
    CLAIM_FLAGS,
    RECEIVER,
    STREAM_KINDS,
    app_env,
    kill,
    new_queue,
    processed,
    producer,
    received,
    recorded_calls,
    require_broker,
    serving,
    start_worker,
    stream_client,
    until,
    wait_exit,
    wait_listening,
    worker_log,
)

pytestmark = pytest.mark.workers
"""Real workers waiting on timers: ./scripts/test runs these in parallel."""

KINDS = ["list", "stream", "rabbitmq", "nats"]
EXTRA = ["cluster", "sentinel"]
"""Redis Cluster and Sentinel stream brokers: they never claim a dead
consumer's entries themselves, so their crash test runs under BatchReceiver."""
RECEIVERS = ("stock", "batchtask")
ACKING = {"stream", "rabbitmq", "nats", *EXTRA}

# Seconds before the broker hands an unacknowledged message to another
# consumer: Redis stream idle_timeout, NATS ack_wait (RabbitMQ requeues when
# the connection drops). Longer than any batch here is buffered while its
# worker lives, so a healthy worker never sees its own messages redelivered.
REDELIVER_AFTER = {"stream": "5", "nats": "10", "cluster": "5", "sentinel": "5"}


async def kick_all(
    app: Any, values: range, tag: str = "t"
) -> list[AsyncTaskiqTask[Any]]:
    tasks: list[AsyncTaskiqTask[Any]] = []
    for start in range(values.start, values.stop, 500):
        chunk = range(start, min(start + 500, values.stop))
        tasks.extend(await asyncio.gather(*(app.double.kiq(v, tag) for v in chunk)))
    return tasks


@pytest.mark.parametrize(
    ("kind", "how", "receiver"),
    [
        *((kind, how, "stock") for kind in KINDS for how in ("TERM", "INT")),
        *((kind, "TERM", "batchtask") for kind in ("stream", "rabbitmq", "nats")),
        *((kind, "TERM", receiver) for kind in EXTRA for receiver in RECEIVERS),
    ],
)
async def test_graceful_shutdown_runs_partial_batches_at_once(
    kind: str, how: str, receiver: str
) -> None:
    require_broker(kind)
    queue = new_queue()
    signum = signal.Signals[f"SIG{how}"]
    async with serving(
        queue,
        *(RECEIVER if receiver != "stock" else ()),
        BATCHTASK_BROKER=kind,
        BATCHTASK_BATCH_SIZE="100",
        BATCHTASK_BATCH_TIMEOUT="600",
    ) as (worker, app):
        tasks = await kick_all(app, range(30))
        await until(lambda: _at_least(received(queue), 30), 60, "30 received")
        await asyncio.sleep(0.3)
        buffered_calls = await recorded_calls(queue)
        signalled = time.monotonic()
        worker.send_signal(signum)
        code = await wait_exit(worker)
        stopped = time.monotonic() - signalled
        results = [await t.wait_result(timeout=30) for t in tasks]
        calls = await recorded_calls(queue)

    print(
        f"shutdown[{kind}, SIG{how}, {receiver} receiver]: exit {code} "
        f"after {stopped:.2f} s"
    )
    assert buffered_calls == [], "buffered, not called before the signal"
    assert code == 0, f"worker exited with {code}"
    assert stopped < 600 / 10, "the buffer ran at once, not after batch_timeout"
    assert [r.return_value for r in results] == [2 * i for i in range(30)]
    assert [sorted(call) for _, call in calls] == [list(range(30))]


@pytest.mark.parametrize(
    ("kind", "receiver"),
    [(kind, "stock") for kind in KINDS]
    + [(kind, "batchtask") for kind in ["stream", "rabbitmq", "nats", *EXTRA]],
)
async def test_a_killed_worker_loses_no_buffered_item_on_acking_brokers(
    kind: str, receiver: str
) -> None:
    """SIGKILL a worker holding items in a batch; a new worker finishes the rest.

    On the brokers with acknowledgements every item is processed at least
    once, so nothing was acknowledged before its batch ran; the Redis list
    broker acknowledges on receipt, so the items the killed worker held are
    lost: the test measures how many. With ``BatchReceiver`` (grouped acks
    and results, buffered items without a task slot) the first worker holds
    150 items without a slot plus 100 with one.
    """
    require_broker(kind)
    queue = new_queue()
    count, held_at_most = 2000, 250
    redeliver = REDELIVER_AFTER.get(kind, "600")
    first_settings = {
        "BATCHTASK_BROKER": kind,
        "BATCHTASK_BATCH_SIZE": "1000",
        "BATCHTASK_BATCH_TIMEOUT": "600",
        "BATCHTASK_REDELIVER_AFTER": redeliver,
    }
    with app_env(queue, **first_settings) as env:
        if receiver == "stock":
            limits: tuple[str, ...] = ("--max-async-tasks", str(held_at_most))
        else:
            limits = (
                *RECEIVER,
                "--receiver_arg",
                "max_buffered=150",
                *CLAIM_FLAGS.get(kind, ()),
            )
        first = start_worker(env, "--workers", "1", *limits)
    try:
        first_log = await wait_listening(first)
        with app_env(queue, **first_settings):
            async with producer(queue) as app:
                tasks = await kick_all(app, range(count))
                await until(
                    lambda: _at_least(received(queue), held_at_most),
                    60,
                    f"{held_at_most} items buffered by the first worker",
                )
                await asyncio.sleep(0.5)
                held = await received(queue)
                called_before_kill = await recorded_calls(queue)
                kill(first)

                second_settings = {
                    **first_settings,
                    "BATCHTASK_BATCH_SIZE": "100",
                    "BATCHTASK_BATCH_TIMEOUT": "0.5",
                }
                with app_env(queue, **second_settings) as env:
                    second = start_worker(
                        env,
                        "--workers",
                        "1",
                        *(
                            (*RECEIVER, *CLAIM_FLAGS.get(kind, ()))
                            if receiver != "stock"
                            else ()
                        ),
                    )
                try:
                    await wait_listening(second)
                    expected = count if kind in ACKING else count - held

                    async def nudge() -> None:
                        # taskiq-redis's own listen() claims a dead consumer's
                        # messages only after reading new ones; BatchReceiver
                        # claims on a timer, without new traffic.
                        await app.nudge.kiq()

                    await until(
                        lambda: _at_least(_len(processed(queue)), expected),
                        240,
                        f"{expected} items processed after the restart",
                        every=0.3,
                        meanwhile=nudge if receiver == "stock" else None,
                    )
                    await asyncio.sleep(1.0)  # anything late would show now
                    counts = await processed(queue)
                    results = (
                        [await t.wait_result(timeout=60) for t in tasks]
                        if kind in ACKING
                        else []
                    )
                finally:
                    kill(second)
    finally:
        kill(first)

    lost = count - len(counts)
    duplicated = sum(counts.values()) - len(counts)
    print(
        f"crash[{kind}, {receiver} receiver]: kicked {count}, "
        f"held by the killed worker {held}, "
        f"processed {len(counts)}, duplicated {duplicated}, lost {lost}"
    )
    assert called_before_kill == [], "no batch ran before the kill"
    if kind in REDELIVER_AFTER:  # batch_timeout 600 s > the redelivery time
        assert "so items would run twice: app:double (batch_timeout=600)" in first_log
    assert held >= held_at_most, "items were buffered when the worker died"
    assert set(counts) <= set(range(count))
    if kind in ACKING:
        assert lost == 0, f"{lost} items lost"
        assert [r.return_value for r in results] == [2 * i for i in range(count)]
    else:
        assert lost >= held, "the list broker loses what the dead worker held"
        assert duplicated == 0


async def test_bad_input_fails_alone_and_the_worker_keeps_serving() -> None:
    """Bad items, malformed messages and a call raising CancelledError each
    fail on their own, with a clear error, and later items still succeed."""
    require_broker("stream")
    queue = new_queue()
    async with serving(
        queue,
        BATCHTASK_BROKER="stream",
        BATCHTASK_BATCH_SIZE="10",
        BATCHTASK_BATCH_TIMEOUT="0.3",
    ) as (worker, app):
        with pytest.raises(SendTaskError):  # not serializable: producer
            await app.double.kiq(1, object())
        invalid = await app.double.kiq("not a number", "t")
        no_item = await _raw(app, args=[], kwargs={"tag": "t"})
        unknown = await _raw(app, args=[1, "t"], kwargs={"colour": "red"})
        cancelled = await app.double.kiq(7, "cancel")
        good = await kick_all(app, range(20))
        bad_results = {
            name: await task.wait_result(timeout=60)
            for name, task in {
                "invalid": invalid,
                "no_item": no_item,
                "unknown": unknown,
                "cancelled": cancelled,
            }.items()
        }
        good_results = [await t.wait_result(timeout=60) for t in good]
        alive = worker.poll() is None

    # Each error comes back through the Redis result backend with its class.
    errors = {name: result.error for name, result in bad_results.items()}
    print("bad input errors:", *errors.items(), sep="\n  ")
    assert isinstance(errors["invalid"], ItemValidationError)
    assert "is not a valid int" in str(errors["invalid"])
    assert isinstance(errors["no_item"], BatchArgumentError)
    assert "missing the item" in str(errors["no_item"])
    assert isinstance(errors["unknown"], BatchArgumentError)
    assert "unexpected keyword argument 'colour'" in str(errors["unknown"])
    assert isinstance(errors["cancelled"], BatchCallError)
    assert "raised CancelledError" in str(errors["cancelled"])
    assert [r.return_value for r in good_results] == [2 * i for i in range(20)]
    assert alive, "the worker kept serving"


async def test_a_worker_takes_50k_items_with_bounded_memory() -> None:
    """One worker takes a continuous stream of 50,000 items through a Redis
    stream: each processed exactly once, nothing left buffered at the end,
    and memory after 50k items close to memory after the first 10k."""
    require_broker("stream")
    queue = new_queue()
    count = 50_000
    async with serving(
        queue,
        "--max-async-tasks",
        "500",
        BATCHTASK_BROKER="stream",
        BATCHTASK_BATCH_SIZE="100",
        BATCHTASK_BATCH_TIMEOUT="0.2",
    ) as (_, app):
        started = time.monotonic()
        sample: list[AsyncTaskiqTask[Any]] = []
        early: dict[str, Any] = {}
        for start in range(0, count, 10_000):
            tasks = await kick_all(app, range(start, start + 10_000))
            sample.append(tasks[0])
            if start == 10_000:  # the first 10k are being processed
                await until(
                    lambda: _at_least(_len(processed(queue)), 10_000),
                    120,
                    "the first 10k processed",
                )
                early = await _stats(app)
        await until(
            lambda: _at_least(_len(processed(queue)), count),
            600,
            f"{count} items processed",
            every=0.5,
        )
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
        end = await _stats(app)
        counts = await processed(queue)
        sampled = [await t.wait_result(timeout=60) for t in sample]

    print(
        f"load: {count} items in {elapsed:.1f} s ({count / elapsed:.0f} items/s), "
        f"peak RSS {early['max_rss_kib'] / 1024:.1f} MiB after 10k, "
        f"{end['max_rss_kib'] / 1024:.1f} MiB after {count}; "
        f"buffered at the end: {end['buffered']}"
    )
    assert len(counts) == count, "every item processed"
    assert set(counts.values()) == {1}, "each exactly once"
    assert [r.return_value for r in sampled] == [2 * i for i in range(0, count, 10_000)]
    assert end["buffered"] == 0, "nothing left in the buffers"
    assert end["pid"] == early["pid"], "one worker process served the stream"
    growth_kib = end["max_rss_kib"] - early["max_rss_kib"]
    assert growth_kib < 64 * 1024, f"memory grew by {growth_kib} KiB over 40k items"


async def _stats(app: Any) -> dict[str, Any]:
    result = await (await app.stats.kiq()).wait_result(timeout=60)
    assert not result.is_err, result.error
    return result.return_value


async def _raw(
    app: Any, *, args: list[Any], kwargs: dict[str, Any]
) -> AsyncTaskiqTask[Any]:
    """Send a message for the batch task as is, without the producer's check."""
    task_id = uuid.uuid4().hex
    message = TaskiqMessage(
        task_id=task_id, task_name="app:double", labels={}, args=args, kwargs=kwargs
    )
    await app.broker.kick(app.broker.formatter.dumps(message))
    return AsyncTaskiqTask(task_id, app.broker.result_backend)


async def _at_least(value: Any, minimum: int) -> bool:
    return await value >= minimum


async def _len(mapping: Any) -> int:
    return len(await mapping)


async def test_rabbitmq_prefetch_below_batch_size_caps_batches_and_warns() -> None:
    """AioPikaBroker's qos bounds what one worker holds, so a batch never
    grows past it; the worker says so at start, naming the setting."""
    require_broker("rabbitmq")
    queue = new_queue()
    async with serving(
        queue,
        BATCHTASK_BROKER="rabbitmq",
        BATCHTASK_QOS="10",
        BATCHTASK_BATCH_SIZE="50",
        BATCHTASK_BATCH_TIMEOUT="0.3",
    ) as (worker, app):
        log = worker_log(worker)
        tasks = await kick_all(app, range(100))
        results = [await t.wait_result(timeout=60) for t in tasks]
        calls = await recorded_calls(queue)

    sizes = [len(call) for _, call in calls]
    print(f"qos=10, batch_size=50: call sizes {sizes}")
    assert "AioPikaBroker(qos=10) lets this worker hold at most 10" in log
    assert "app:double (batch_size=50)" in log
    assert [r.return_value for r in results] == [2 * i for i in range(100)]
    assert max(sizes) <= 10


@pytest.mark.parametrize("kind", sorted(ACKING))
async def test_malformed_deliveries_are_logged_acked_and_never_stop_reading(
    kind: str,
) -> None:
    """Under BatchReceiver: a body that is not JSON, JSON without the task
    fields, a task no worker knows, a batch task's message whose arguments
    do not bind, and one over ``max_message_bytes`` each end on their own
    (logged, acknowledged; the batch task's error stored under its task id),
    and the worker goes on serving."""
    require_broker(kind)
    queue = new_queue()
    async with serving(
        queue,
        *RECEIVER,
        "--receiver_arg",
        "max_message_bytes=100000",
        BATCHTASK_BROKER=kind,
        BATCHTASK_BATCH_SIZE="10",
        BATCHTASK_BATCH_TIMEOUT="0.3",
    ) as (worker, app):
        for body in (b"not json at all", b'{"hello": 1}'):
            await app.broker.kick(
                BrokerMessage(task_id="x", task_name="x", message=body, labels={})
            )
        unknown = TaskiqMessage(
            task_id=uuid.uuid4().hex,
            task_name="app:nobody",
            labels={},
            args=[1],
            kwargs={},
        )
        await app.broker.kick(app.broker.formatter.dumps(unknown))
        unbound = await _raw(app, args=[], kwargs={"colour": "red"})
        oversized = await _raw(app, args=[1, "t"], kwargs={"pad": "x" * 200_000})
        good = await kick_all(app, range(20))
        unbound_result = await unbound.wait_result(timeout=60)
        oversized_result = await oversized.wait_result(timeout=60)
        results = [await t.wait_result(timeout=60) for t in good]
        await asyncio.sleep(1.0)
        log = worker_log(worker)
        if kind in STREAM_KINDS:
            client = stream_client(kind)
            pending = (await client.xpending(queue, queue))["pending"]
            await client.aclose()
            assert pending == 0, "every bad delivery was acknowledged"
    assert [r.return_value for r in results] == [2 * i for i in range(20)]
    assert unbound_result.is_err
    assert oversized_result.is_err
    assert "max_message_bytes=100000" in str(oversized_result.error)
    assert log.count("is over max_message_bytes=100000") == 1
    assert log.count("Cannot parse message") == 2, "each bad body logged once"
    assert log.count('task "app:nobody" is not found') == 1
    assert "is dead" not in log, "the worker process never died"
