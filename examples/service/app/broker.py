"""The taskiq broker: a Redis stream, results in Redis, FastAPI wired in.

The API process kicks tasks through it (started in the API's lifespan); the
worker serves it::

    taskiq worker app.broker:broker app.tasks --receiver batchtask:BatchReceiver
"""

import taskiq_fastapi
from taskiq import SimpleRetryMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from .settings import settings

results: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
    settings.redis_url,
    result_ex_time=settings.result_ttl,
    prefix_str=settings.stream,
)
"""Each task's result under ``<stream>:<task id>``, kept `result_ttl` seconds."""

broker = (
    RedisStreamBroker(
        settings.redis_url,
        queue_name=settings.stream,
        consumer_group_name=settings.stream,
    )
    .with_result_backend(results)
    # Tasks labelled retry_on_error=True are sent again when they fail, up to
    # 3 runs in all: for a batch task, each event of a failed batch on its own.
    .with_middlewares(SimpleRetryMiddleware(default_retry_count=3))
)

# In the worker, FastAPI's lifespan runs at startup and tasks can depend on
# FastAPI's `Request` (and the app's state) through `TaskiqDepends`.
taskiq_fastapi.init(broker, "app.api:app")
