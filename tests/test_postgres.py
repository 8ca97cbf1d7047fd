"""At-least-once on taskiq-postgres's AsyncpgBroker under `BatchReceiver`.

Real ``taskiq worker`` processes on the local PostgreSQL (the broker's table
and ``LISTEN`` channel) with results in Redis, as in tests/test_brokers.py and
tests/test_faults.py. taskiq-postgres alone never hands out again a row whose
worker died, a row kicked while no worker listened, or a notification its
``LISTEN`` connection missed; `batchtask._postgres` does, and these tests
measure it: each prints kicked, processed, duplicated and lost.
"""

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from taskiq import AckableMessage, BrokerMessage
from taskiq_pg.asyncpg import AsyncpgBroker

from batchtask.brokers.postgres import PostgresRedelivery
from tests import test_faults
from tests.conftest import require_server
from tests.test_faults import COUNT, _at_least, _handled, kick, rig, settle
from tests.workers import (
    RECEIVER,
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
    until,
    wait_exit,
    wait_listening,
    worker_log,
)

pytestmark = pytest.mark.workers
"""Real workers waiting on timers: ./scripts/test runs these in parallel."""

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
KIND = {"BATCHTASK_BROKER": "postgres"}
LISTENING_AGAIN = "LISTEN connection was lost; listening on a new one"
LEASE_AGAIN = "PostgreSQL lease connected again"
HANDED_OUT = "of workers that are gone"


async def statuses(queue: str) -> dict[str, int]:
    """The batch task's rows in the broker table by status (every
    ``processing:<worker>`` tag counted as ``tagged``)."""
    connection = await asyncpg.connect(PG_URL)
    try:
        rows = await connection.fetch(
            "SELECT CASE WHEN status LIKE 'processing:%' THEN 'tagged' "
            f"ELSE status END AS status, count(*) FROM {queue.replace('-', '_')} "
            "WHERE task_name = 'app:double' GROUP BY 1"
        )
    finally:
        await connection.close()
    return {str(row["status"]): int(row["count"]) for row in rows}


async def test_graceful_shutdown_runs_the_partial_batch_at_once() -> None:
    """SIGTERM with 30 items in a batch of 100 (batch_timeout 600 s): the
    worker calls the batch at once, stores every result, acks every row (the
    table is left empty) and exits 0."""
    require_broker("postgres")
    queue = new_queue()
    async with serving(
        queue,
        *RECEIVER,
        **KIND,
        BATCHTASK_BATCH_SIZE="100",
        BATCHTASK_BATCH_TIMEOUT="600",
    ) as (worker, app):
        tasks = [await app.double.kiq(v, "t") for v in range(30)]
        await until(lambda: _at_least(received(queue), 30), 30, "30 received")
        await asyncio.sleep(0.3)
        buffered_calls = await recorded_calls(queue)
        tagged = await statuses(queue)
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = await wait_exit(worker, 30)
        stopped = time.monotonic() - signalled
        results = [await t.wait_result(timeout=30) for t in tasks]
        calls = await recorded_calls(queue)
        left = await statuses(queue)

    print(
        f"shutdown[postgres, SIGTERM, batchtask receiver]: exit {code} after "
        f"{stopped:.2f} s; rows before {tagged}, after {left}"
    )
    assert buffered_calls == [], "buffered, not called before the signal"
    assert tagged == {"tagged": 30}, "each claim is tagged with its worker"
    assert code == 0
    assert stopped < 60, "the buffer ran at once, not after batch_timeout"
    assert [r.return_value for r in results] == [2 * i for i in range(30)]
    assert [sorted(call) for _, call in calls] == [list(range(30))]
    assert left == {}, "every row acked"


async def test_a_killed_workers_claimed_rows_go_to_the_next_worker() -> None:
    """SIGKILL a worker holding 250 claimed rows (150 buffered without a
    slot, 100 with one) and 1750 more notified to it only: a second worker
    takes up the pending rows at start and, once the first worker's session
    is gone, its claimed rows: every item processed, none lost."""
    require_broker("postgres")
    queue = new_queue()
    count, held_at_most = 2000, 250
    first_settings = {
        **KIND,
        "BATCHTASK_BATCH_SIZE": "1000",
        "BATCHTASK_BATCH_TIMEOUT": "600",
    }
    with app_env(queue, **first_settings) as env:
        first = start_worker(
            env, "--workers", "1", *RECEIVER, "--receiver_arg", "max_buffered=150"
        )
    try:
        await wait_listening(first)
        with app_env(queue, **first_settings):
            async with producer(queue) as app:
                tasks = []
                for start in range(0, count, 500):
                    chunk = range(start, start + 500)
                    tasks += await asyncio.gather(
                        *(app.double.kiq(v, "t") for v in chunk)
                    )
                await until(
                    lambda: _at_least(received(queue), held_at_most),
                    30,
                    f"{held_at_most} items held by the first worker",
                )
                await asyncio.sleep(0.5)
                held = await received(queue)
                before_kill = await statuses(queue)
                called_before_kill = await recorded_calls(queue)
                kill(first)
                killed_at = time.monotonic()

                second_settings = {
                    **first_settings,
                    "BATCHTASK_BATCH_SIZE": "100",
                    "BATCHTASK_BATCH_TIMEOUT": "0.5",
                }
                with app_env(queue, **second_settings) as env:
                    second = start_worker(env, "--workers", "1", *RECEIVER)
                try:
                    await wait_listening(second)
                    await until(
                        lambda: _at_least(_len(processed(queue)), count),
                        40,
                        f"{count} items processed after the kill",
                        every=0.2,
                    )
                    recovered = time.monotonic() - killed_at
                    tally = await settle(app, queue, second, tasks, quiet=3)
                    left = await statuses(queue)
                    second_log = worker_log(second)
                finally:
                    kill(second)
    finally:
        kill(first)

    print(
        f"crash[postgres, batchtask receiver]: kicked {count}, held by the killed "
        f"worker {held} (rows {before_kill}), processed {tally.processed}, "
        f"duplicated {tally.duplicated}, lost {tally.lost}, results "
        f"{tally.results}; all done {recovered:.1f} s after the kill"
    )
    assert called_before_kill == [], "no batch ran before the kill"
    assert held >= held_at_most
    assert before_kill.get("tagged", 0) >= held_at_most, "the held rows were tagged"
    assert tally.lost == 0
    assert tally.duplicated == 0
    assert tally.results == count
    assert HANDED_OUT in second_log
    assert left == {}, "every row acked"


async def _len(mapping: Any) -> int:
    return len(await mapping)


async def test_items_kicked_while_no_worker_listens_run_once_one_starts() -> None:
    """200 items kicked before any worker runs (their NOTIFYs reached nobody)
    are processed, each once, by a worker started afterwards."""
    require_broker("postgres")
    queue = new_queue()
    count = 200
    settings = {**KIND, "BATCHTASK_BATCH_SIZE": "50", "BATCHTASK_BATCH_TIMEOUT": "0.5"}
    with app_env(queue, **settings) as env:
        async with producer(queue) as app:
            tasks = [await app.double.kiq(v, "t") for v in range(count)]
            waiting = await statuses(queue)
            worker = start_worker(env, "--workers", "1", *RECEIVER)
            try:
                await wait_listening(worker)
                tally = await settle(app, queue, worker, tasks, quiet=2.5)
                left = await statuses(queue)
            finally:
                kill(worker)

    print(
        f"kicked before listening[postgres]: kicked {count} (rows {waiting}), "
        f"processed {tally.processed}, duplicated {tally.duplicated}, "
        f"lost {tally.lost}, results {tally.results}"
    )
    assert waiting == {"pending": count}
    assert tally.lost == 0
    assert tally.duplicated == 0
    assert tally.results == count
    assert left == {}


@pytest.fixture
def rig_knows_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Teach tests/test_faults.py's `rig` the postgres kind: the worker's DSN
    through the proxy names no database, so PGDATABASE (which asyncpg reads)
    gives it; the producer connects directly."""
    monkeypatch.setitem(test_faults.PORTS, "postgres", 5432)
    monkeypatch.setitem(test_faults.SCHEMES, "postgres", "postgresql")
    monkeypatch.setitem(test_faults.AUTH, "postgres", "postgres@")


@pytest.mark.usefixtures("rig_knows_postgres")
@pytest.mark.parametrize("moment", ["buffered", "running"])
async def test_dropped_connections_lose_nothing_and_run_nothing_twice(
    moment: str,
) -> None:
    """Every connection of the worker to PostgreSQL (its LISTEN connection,
    write pool and lease) and to its Redis result backend is dropped while 300
    items wait in a batch, or while their batch's call runs; then 300 more
    are kicked, notified while the worker has no LISTEN connection. Nothing
    is lost, nothing runs twice, the worker process keeps serving."""
    if moment == "buffered":
        settings = {"BATCHTASK_BATCH_SIZE": "1000", "BATCHTASK_BATCH_TIMEOUT": "10"}
        tag = "x"
    else:
        settings = {"BATCHTASK_BATCH_SIZE": str(COUNT), "BATCHTASK_BATCH_TIMEOUT": "60"}
        tag = "sleep:2"
    async with rig("postgres", PGDATABASE="test", **settings) as r:
        tasks = await kick(r.app, tag)
        await until(lambda: _at_least(received(r.queue), COUNT), 30, "all received")
        await asyncio.sleep(0.5)
        assert await processed(r.queue) == {}, f"still {moment} at the fault"
        dropped = r.broker_proxy.drop() + r.results_proxy.drop()
        tasks += [await r.app.double.kiq(v, tag) for v in range(COUNT, 2 * COUNT)]
        tally = await settle(r.app, r.queue, r.worker, tasks, quiet=5)
        left = await statuses(r.queue)
        log = worker_log(r.worker)
    print(tally.line(f"every connection dropped while {moment}", "postgres"))
    done = [
        *_handled(log),
        f"listened again x{log.count(LISTENING_AGAIN)}",
        f"lease again x{log.count(LEASE_AGAIN)}",
    ]
    print("  what the worker did:", ", ".join(done))
    assert dropped >= 3, "the LISTEN connection, a pool connection, the lease"
    assert tally.lost == 0
    assert tally.results == 2 * COUNT
    assert tally.duplicated == 0, log[-4000:]
    assert tally.restarts == 0, "the worker process kept serving"
    assert LISTENING_AGAIN in log
    assert LEASE_AGAIN in log
    assert left == {}, "every row acked"


async def test_the_sweeper_hands_out_dead_claims_and_lost_notifications() -> None:
    """In-process, with short periods: a delivery's row is tagged with the
    worker's session; a row tagged by a session that is gone, an untagged
    claim seen for `reclaim_after` seconds, and a pending row due for
    `renotify_after` seconds go (back) to the broker's listen(); a row
    tagged by a live session and a row whose ``delay`` has not passed stay;
    a held row found untagged is tagged; an acked row's id is dropped from
    `held`."""
    require_server("PostgreSQL", 5432)
    table = new_queue().replace("-", "_")
    broker = AsyncpgBroker(dsn=PG_URL, channel_name=table, table_name=table)
    await broker.startup()
    direct = await asyncpg.connect(PG_URL)
    redelivery = PostgresRedelivery(
        broker, sweep_every=0.2, reclaim_after=1.0, renotify_after=1.0
    )

    async def row(status: str, age: float = 0.0, labels: str = "{}") -> int:
        return int(
            await direct.fetchval(
                f"INSERT INTO {table} (task_id, task_name, message, labels, status, "
                "created_at) VALUES ('t', 'n', 'm', $1::jsonb, $2, "
                "now() - make_interval(secs => $3)) RETURNING id",
                labels,
                status,
                age,
            )
        )

    async def status(row_id: int) -> str | None:
        value = await direct.fetchval(
            f"SELECT status FROM {table} WHERE id = $1", row_id
        )
        return None if value is None else str(value)

    def queued() -> set[int]:
        waiting = getattr(broker._queue, "_queue", ())  # what listen() reads next
        return {int(payload) for payload in list(waiting)}

    try:
        live_tag = str(
            await direct.fetchval(
                "SELECT 'processing:' || pid || ':' || (extract(epoch FROM "
                "backend_start) * 1000000)::bigint FROM pg_stat_activity "
                "WHERE pid = pg_backend_pid()"
            )
        )
        await broker.kick(
            BrokerMessage(task_id="k", task_name="n", message=b"kicked", labels={})
        )
        deliveries = broker.listen()
        delivery = await anext(deliveries)
        redelivery.start()
        redelivery.noted(delivery)
        (kicked,) = redelivery.held
        dead = await row("processing:1:1")
        untagged = await row("processing")
        alive = await row(live_tag)
        delayed = await row("pending", age=60, labels='{"delay": "3600"}')
        await until(lambda: _is(status(kicked), redelivery.tag), 5, "the claim tagged")
        lost = await row("pending", age=60)
        await until(lambda: _is(status(untagged), "pending"), 5, "untagged handed out")
        await until(lambda: _true(lost in queued()), 5, "the lost row taken up")
        seen = queued()
        # A tag that did not land (its UPDATE failed) is made at the next sweep.
        await direct.execute(
            f"UPDATE {table} SET status = 'processing' WHERE id = $1", kicked
        )
        await until(lambda: _is(status(kicked), redelivery.tag), 5, "tagged again")
        after = {"dead": await status(dead), "alive": await status(alive)}
        await delivery.ack()
        await until(lambda: _true(not redelivery.held), 5, "the acked id dropped")
        kept = await status(delayed)
    finally:
        await redelivery.stop()
        await broker.shutdown()
        await direct.execute(f"DROP TABLE IF EXISTS {table}")
        await direct.close()

    print(
        f"sweeper[postgres]: dead tag -> {after['dead']}, live tag kept, untagged "
        "claim handed out after 1 s, lost notification taken up, delayed row kept"
    )
    assert after == {"dead": "pending", "alive": live_tag}
    assert {dead, untagged, lost} <= seen
    assert delayed not in seen
    assert kept == "pending"
    assert str(redelivery.tag).startswith("processing:")


async def _is(value: Any, expected: object) -> bool:
    return await value == expected


async def _true(value: bool) -> bool:
    return value


async def _broker(table: str) -> AsyncpgBroker:
    broker = AsyncpgBroker(dsn=PG_URL, channel_name=table, table_name=table)
    await broker.startup()
    return broker


async def _status_of(connection: Any, table: str, row_id: int) -> str | None:
    value = await connection.fetchval(
        f"SELECT status FROM {table} WHERE id = $1", row_id
    )
    return None if value is None else str(value)


MESSAGES = [b"plain", "unicode \u00e9\u4e2d \U0001f600".encode(), b'{"json": [1, 2]}']


async def test_listen_yields_what_the_brokers_own_listen_yields() -> None:
    """The same messages kicked into two tables: taskiq-postgres's own
    ``listen()`` on one, `PostgresRedelivery.listen` on the other. Each yields
    every message once, with the same bytes, in the same order, a duplicate
    notification included; each ack deletes its row. Only the second's rows
    carry the worker's tag from the claim on."""
    require_server("PostgreSQL", 5432)
    tables = [new_queue().replace("-", "_") for _ in range(2)]
    brokers = [await _broker(table) for table in tables]
    direct = await asyncpg.connect(PG_URL)
    redelivery = PostgresRedelivery(brokers[1])
    seen: list[list[tuple[bytes, str | None]]] = [[], []]
    try:
        redelivery.start()
        streams = [aiter(brokers[0].listen()), aiter(redelivery.listen())]
        for broker in brokers:
            for index, body in enumerate(MESSAGES):
                await broker.kick(
                    BrokerMessage(
                        task_id=f"t{index}", task_name="n", message=body, labels={}
                    )
                )
            # A second notification of the first row: claimed once all the same.
            first = await direct.fetchval(f"SELECT min(id) FROM {broker.table_name}")
            await direct.execute(
                f"SELECT pg_notify('{broker.channel_name}', '{first}')"
            )
        for side, (table, stream) in enumerate(zip(tables, streams, strict=True)):
            for _ in MESSAGES:
                delivery = await asyncio.wait_for(anext(stream), 10)
                assert isinstance(delivery, AckableMessage)
                row_id = await direct.fetchval(
                    f"SELECT id FROM {table} WHERE message = $1", delivery.data.decode()
                )
                seen[side].append(
                    (delivery.data, await _status_of(direct, table, row_id))
                )
                await delivery.ack()
            with pytest.raises(TimeoutError):  # the duplicate notification
                await asyncio.wait_for(anext(stream), 0.5)
        left = [
            await direct.fetchval(f"SELECT count(*) FROM {table}") for table in tables
        ]
    finally:
        await redelivery.stop()
        for broker, table in zip(brokers, tables, strict=True):
            await broker.shutdown()
            await direct.execute(f"DROP TABLE IF EXISTS {table}")
        await direct.close()
    print(f"listen[postgres]: stock {seen[0]}; tagged {seen[1]}")
    assert [data for data, _ in seen[0]] == MESSAGES
    assert [data for data, _ in seen[1]] == MESSAGES
    assert {status for _, status in seen[0]} == {"processing"}
    assert {status for _, status in seen[1]} == {redelivery.tag}
    assert left == [0, 0]


async def test_a_worker_gone_right_after_its_claim_leaves_its_row_to_others() -> None:
    """A claim made by `PostgresRedelivery.listen` is tagged in the claim
    itself: a worker whose session ends before it takes another step (SIGKILL
    right after the claim; here its lease closed and nothing noted) leaves a
    row that another worker's next sweep hands out, not one untagged for
    `reclaim_after` (10 minutes)."""
    require_server("PostgreSQL", 5432)
    table = new_queue().replace("-", "_")
    gone, other = await _broker(table), await _broker(table)
    direct = await asyncpg.connect(PG_URL)
    dying = PostgresRedelivery(gone)
    sweeper = PostgresRedelivery(other, sweep_every=0.2)
    try:
        dying.start()
        stream = aiter(dying.listen())
        await gone.kick(
            BrokerMessage(task_id="t", task_name="n", message=b"m", labels={})
        )
        delivery = await asyncio.wait_for(anext(stream), 10)
        row_id = int(await direct.fetchval(f"SELECT id FROM {table}"))
        claimed_as = await _status_of(direct, table, row_id)
        await dying.stop()  # its session ends: the worker is gone
        sweeper.start()
        await until(
            lambda: _is(_status_of(direct, table, row_id), "pending"),
            10,
            "the claim of the worker that is gone handed out",
        )
    finally:
        await sweeper.stop()
        for broker in (gone, other):
            await broker.shutdown()
        await direct.execute(f"DROP TABLE IF EXISTS {table}")
        await direct.close()
    assert delivery.data == b"m"
    assert claimed_as == dying.tag


class _LostReply:
    """A write pool whose connections run each claim, then drop its reply."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.dropped = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn:
            yield self._Conn(conn, self)

    class _Conn:
        def __init__(self, conn: Any, owner: "_LostReply") -> None:
            self.conn, self.owner = conn, owner

        async def fetchval(self, sql: str, *args: object) -> object:
            value = await self.conn.fetchval(sql, *args)
            if self.owner.dropped == 0:
                self.owner.dropped += 1
                raise ConnectionResetError("the reply was lost")
            return value

        async def execute(self, sql: str, *args: object) -> object:
            return await self.conn.execute(sql, *args)


async def test_a_claim_whose_reply_was_lost_is_taken_on_the_next_listen() -> None:
    """The claim's ``UPDATE`` lands but its reply is lost (the connection
    drops): `listen` raises the connection error (the receiver listens again
    after a delay) and the next `listen` takes the row, now this worker's,
    once; not left claimed by nobody."""
    require_server("PostgreSQL", 5432)
    table = new_queue().replace("-", "_")
    broker = await _broker(table)
    direct = await asyncpg.connect(PG_URL)
    redelivery = PostgresRedelivery(broker)
    real_pool = broker._write_pool
    lossy = _LostReply(real_pool)
    try:
        redelivery.start()
        await broker.kick(
            BrokerMessage(task_id="t", task_name="n", message=b"m", labels={})
        )
        broker._write_pool = lossy
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(anext(aiter(redelivery.listen())), 10)
        row_id = int(await direct.fetchval(f"SELECT id FROM {table}"))
        after_loss = await _status_of(direct, table, row_id)
        stream = aiter(redelivery.listen())
        delivery = await asyncio.wait_for(anext(stream), 10)
        await delivery.ack()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.5)
        left = await direct.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        broker._write_pool = real_pool
        await redelivery.stop()
        await broker.shutdown()
        await direct.execute(f"DROP TABLE IF EXISTS {table}")
        await direct.close()
    assert lossy.dropped == 1
    assert after_loss == redelivery.tag, "the lost claim landed"
    assert delivery.data == b"m"
    assert left == 0
