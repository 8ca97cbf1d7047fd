"""Sending many messages at once: the broker adapter's ``kick_many``.

`kick_many` is what ``BatchTask.kiq_many`` uses after building one ordinary
message per item. A broker family that can write many messages in one round
trip does (taskiq-redis's list and stream brokers: one pipeline, doing what
their ``kick`` does per message); any other broker gets its own ``kick`` for
each message, at most `CONCURRENT_KICKS` at a time.
"""

from collections.abc import Sequence

from taskiq import AsyncBroker, BrokerMessage

from batchtask.brokers import adapter_for
from batchtask.brokers._base import CONCURRENT_KICKS

__all__ = ["CONCURRENT_KICKS", "kick_many"]


async def kick_many(broker: AsyncBroker, messages: Sequence[BrokerMessage]) -> None:
    """Send `messages` through `broker`, pipelined where it is known how."""
    if messages:
        await adapter_for(broker).kick_many(messages)
