"""A lean consumer of a taskiq-redis stream: the floor a worker can approach.

    .venv/bin/python bench/lean.py QUEUE [--workers 2] [--redis URL]
        [--result-ex 900] [--flush-every 0.01]

Started by ``drain.py --modes lean``; redis-py only (no taskiq, no batchtask).
It does, per process, what a batched taskiq worker on ``RedisStreamBroker``
must do for no-op tasks and no more: ``XREADGROUP`` 100 messages from stream
QUEUE in consumer group QUEUE (the names ``drain.py`` gives the broker), parse
each body with ``json.loads``, store each task's result as
``RedisAsyncResultBackend.set_result`` would (key: the task id, no prefix;
value: its default ``PickleSerializer`` dumping ``TaskiqResult.model_dump(
mode="json")``, built here by hand; ``EX`` as the benchmark's backend) in one
pipeline, then one ``XACK`` for the batch. Not done: taskiq-redis's
``XAUTOCLAIM`` of idle pending messages after each read, a log line per task.

Completions are counted as ``drain.py``'s worker side counts them: in the
process, added to the hash ``QUEUE:done`` every ``--flush-every`` seconds.
Each process logs "Listening started." once its consumer group exists. The
parent only starts ``--workers`` processes (forked, so in its process group)
and exits when one of them does.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import pickle
import sys
import uuid
from multiprocessing.connection import wait

import redis.asyncio as redis
from redis.exceptions import ResponseError

READ_COUNT = 100
READ_BLOCK_MS = 2000  # taskiq-redis's xread_block default

logger = logging.getLogger("bench.lean")


class Completions:
    """Items and calls done in this process, added to a Redis hash periodically."""

    def __init__(self, client: redis.Redis, key: str, every: float) -> None:
        """Count into the hash `key` through `client`, flushing every `every` s."""
        self.client, self.key, self.every = client, key, every
        self.items = 0
        self.calls = 0

    def add(self, items: int) -> None:
        """Record one batch of `items` items (no I/O)."""
        self.items += items
        self.calls += 1

    async def flush_forever(self) -> None:
        """The same three HINCRBYs as drain.py's flusher, when anything was done."""
        while True:
            await asyncio.sleep(self.every)
            if self.calls:
                items, calls = self.items, self.calls
                self.items, self.calls = 0, 0
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.hincrby(self.key, "items", items)
                    pipe.hincrby(self.key, "calls", calls)
                    pipe.hincrbyfloat(self.key, "lock_s", 0.0)
                    await pipe.execute()


def result_value(labels: dict[str, object]) -> bytes:
    """A no-op task's stored result, byte for byte as taskiq-redis stores it."""
    # TaskiqResult's field order; execution_time a float, as the model holds it.
    return pickle.dumps(
        {
            "is_err": False,
            "log": None,
            "return_value": None,
            "execution_time": 0.0,
            "labels": labels,
            "error": None,
        }
    )


async def consume(args: argparse.Namespace) -> None:
    """Drain the stream in batches until killed."""
    client = redis.Redis.from_url(args.redis)
    # Its own connection, as drain.py's flusher has.
    counter = redis.Redis.from_url(args.redis)
    done = Completions(counter, f"{args.queue}:done", args.flush_every)
    group, consumer = args.queue, str(uuid.uuid4())
    with contextlib.suppress(ResponseError):  # BUSYGROUP: the producer made it
        await client.xgroup_create(args.queue, group, id="0", mkstream=True)
    flusher = asyncio.create_task(done.flush_forever())
    logger.info("Listening started.")
    while not flusher.done():
        fetched = await client.xreadgroup(
            group, consumer, {args.queue: ">"}, count=READ_COUNT, block=READ_BLOCK_MS
        )
        for stream, entries in fetched or []:
            ids = []
            async with client.pipeline(transaction=False) as pipe:
                for entry_id, fields in entries:
                    message = json.loads(fields[b"data"])
                    value = result_value(message["labels"])
                    pipe.set(message["task_id"], value, ex=args.result_ex)
                    ids.append(entry_id)
                await pipe.execute()
            await client.xack(stream, group, *ids)
            done.add(len(ids))
    flusher.result()  # the counter's connection failed: say why


def run_process(args: argparse.Namespace) -> None:
    """One consumer process."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(consume(args))


def main() -> int:
    """Start the consumer processes; return when the first one ends."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--result-ex", type=int, default=900)
    parser.add_argument("--flush-every", type=float, default=0.01)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s][%(name)s][%(levelname)-7s][%(processName)s] %(message)s",
    )
    # fork: the children stay in this process group (drain.py kills the group
    # and sums its CPU) and skip re-importing redis-py.
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=run_process, args=(args,), name=f"worker-{n}")
        for n in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    with contextlib.suppress(KeyboardInterrupt):
        wait([worker.sentinel for worker in workers])
    for worker in workers:
        worker.terminate()
        worker.join()
    # A consumer never ends on its own, so any end is a failure.
    return 1


if __name__ == "__main__":
    sys.exit(main())
