"""Settings changes that reach every worker process of a broker: ``reconfigure``.

`BatchTask.reconfigure_fleet` and ``python -m batchtask reconfigure`` publish
one notice (JSON: the task's name and its changes) on the broker's notice
channel, where the broker's adapter has one (the Redis stream families:
``PUBLISH`` on the stream's server; RabbitMQ: a fanout exchange of the
queue; NATS: a subject of the stream). Each worker process follows the channel
from its start to its shutdown and applies each notice to its batch task with
``reconfigure``, exactly as a call in that process would (checked the same
way; a bad change is logged and changes nothing there). A worker whose
subscription drops subscribes again, and logs a warning: notices sent
meanwhile do not reach it (a notice is not stored).
"""

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from taskiq import AsyncBroker

from batchtask.brokers import adapter_for

logger = logging.getLogger("batchtask")

Reconfigure = Callable[..., None]
"""A batch task's ``reconfigure``."""

RESUBSCRIBE_AFTER = 1.0
"""Seconds before a dropped subscription is made again."""

_Held = dict[str, "weakref.WeakMethod[Reconfigure]"]
_tasks: "weakref.WeakKeyDictionary[AsyncBroker, _Held]" = weakref.WeakKeyDictionary()
"""Each broker's batch tasks' ``reconfigure``, held weakly: a strong one would
keep the task, and through it the broker (this dict's key), alive forever."""
_followers: "weakref.WeakKeyDictionary[AsyncBroker, asyncio.Task[None]]" = (
    weakref.WeakKeyDictionary()
)


def register(broker: AsyncBroker, task_name: str, reconfigure: Reconfigure) -> None:
    """Apply the notices for `task_name` on `broker` with `reconfigure`."""
    _tasks.setdefault(broker, {})[task_name] = weakref.WeakMethod(reconfigure)


def encode(task_name: str, changes: Mapping[str, object]) -> bytes:
    """One notice: plain values only (a function cannot travel).

    :raises TypeError: naming a change that is not a JSON value.
    """
    for name, value in changes.items():
        if callable(value):
            raise TypeError(
                f"reconfigure across the fleet: {name}={value!r} is a function, "
                "which cannot be sent to other processes; change it in the code, "
                "or with reconfigure() in each process"
            )
    try:
        return json.dumps({"task": task_name, "changes": dict(changes)}).encode()
    except TypeError as exc:
        raise TypeError(
            f"reconfigure across the fleet: the changes {dict(changes)!r} are not "
            "plain values (numbers, booleans, strings, None)"
        ) from exc


async def publish(broker: AsyncBroker, notice: bytes) -> int:
    """Send `notice` to every worker process of `broker`; how many listened.

    :raises RuntimeError: if the broker's family has no notice channel.
    """
    channel = adapter_for(broker).notices()
    if channel is None:
        raise RuntimeError(
            f"{type(broker).__name__} has no channel batchtask can send settings "
            "changes on (the Redis stream brokers, RabbitMQ and NATS have one); "
            "call reconfigure() "
            "in each worker process instead (docs/shaping.md)"
        )
    return await channel.publish(notice)


def start(broker: AsyncBroker) -> None:
    """A worker process starts: follow the broker's notices (if it has a channel)."""
    if broker in _followers or adapter_for(broker).notices() is None:
        return
    if not _tasks.get(broker):
        return
    _followers[broker] = asyncio.get_running_loop().create_task(_follow(broker))


async def stop(broker: AsyncBroker) -> None:
    """The worker process stops: stop following."""
    follower = _followers.pop(broker, None)
    if follower is not None:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def _follow(broker: AsyncBroker) -> None:
    channel = adapter_for(broker).notices()
    assert channel is not None
    dropped = False
    while True:
        try:
            async for notice in channel.subscribe():
                if dropped:
                    logger.info("batchtask: following settings changes again")
                    dropped = False
                apply(broker, notice)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not dropped:
                logger.warning(
                    "batchtask: following settings changes failed (%r); "
                    "subscribing again (changes sent meanwhile are missed)",
                    exc,
                )
            dropped = True
        await asyncio.sleep(RESUBSCRIBE_AFTER)


def apply(broker: AsyncBroker, notice: bytes) -> None:
    """Apply one notice to this process's batch task (logged either way)."""
    try:
        parsed: Any = json.loads(notice)
        task_name = str(parsed["task"])
        changes = dict(parsed["changes"])
    except (ValueError, KeyError, TypeError):
        logger.warning("batchtask: ignoring a malformed settings notice %r", notice)
        return
    held = _tasks.get(broker, {}).get(task_name)
    reconfigure = None if held is None else held()
    if reconfigure is None:
        return  # a task this process does not serve
    try:
        reconfigure(**changes)
    except Exception:
        logger.exception(
            "batchtask: a settings change for %s was refused here: %r",
            task_name,
            changes,
        )
        return
    logger.info("batchtask: %s reconfigured across the fleet: %r", task_name, changes)
