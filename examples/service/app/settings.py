"""The service's settings, read from the environment once, at import."""

import os
import re
from dataclasses import dataclass

_PREFIX = re.compile(r"[a-z0-9_]{0,24}")


@dataclass(frozen=True)
class Settings:
    """Where the service connects and how it batches."""

    redis_url: str
    """The Redis server of the stream and the results (``REDIS_URL``)."""
    database_url: str
    """The PostgreSQL database the events go to (``DATABASE_URL``)."""
    stream: str
    """The Redis stream, its consumer group and the results' key prefix."""
    table_prefix: str
    """Put before every table name the service creates (``SERVICE_TABLE_PREFIX``)."""
    batch_size: int
    """The most events one ``COPY`` writes (``SERVICE_BATCH_SIZE``)."""
    batch_timeout: float
    """Seconds an event waits for its batch at most (``SERVICE_BATCH_TIMEOUT``)."""
    result_ttl: int
    """Seconds each task's result is kept in Redis (``SERVICE_RESULT_TTL``)."""
    pool_size: int
    """PostgreSQL connections per worker process (``SERVICE_POOL_SIZE``)."""


def from_env() -> Settings:
    """The settings from the environment, with defaults for the local servers."""
    env = os.environ
    prefix = env.get("SERVICE_TABLE_PREFIX", "")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"SERVICE_TABLE_PREFIX={prefix!r}: use at most 24 of a-z, 0-9 and _"
        )
    return Settings(
        redis_url=env.get("REDIS_URL", "redis://127.0.0.1:6379"),
        database_url=env.get(
            "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        stream=env.get("SERVICE_STREAM", "service-events"),
        table_prefix=prefix,
        batch_size=int(env.get("SERVICE_BATCH_SIZE", "500")),
        batch_timeout=float(env.get("SERVICE_BATCH_TIMEOUT", "1.0")),
        result_ttl=int(env.get("SERVICE_RESULT_TTL", "3600")),
        pool_size=int(env.get("SERVICE_POOL_SIZE", "4")),
    )


settings = from_env()
