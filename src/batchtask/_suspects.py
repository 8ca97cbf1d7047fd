"""Items whose call may have ended its worker: run in ever smaller calls, alone.

A worker process that dies in a call (``os._exit``, a segfault, the kernel's
OOM killer) acknowledges nothing, so the broker hands its messages out again;
if one of them kills every call it is in, each worker that takes the batch
dies in turn. On the batch-native path a message delivered again without a
stored result is a *suspect*:

- its call size is capped: half the size of the last call it was in that
  never finished, read from a *marker* batchtask writes to the result backend
  (under the task id plus `MARKER_SUFFIX`) just before every suspect call;
  half the task's ``batch_size`` when there is no marker (it was in a batch
  of the normal path, or only buffered);
- a suspect call runs alone in the worker process (`Gate`): no other call
  runs beside it, so a death in it is its own items' doing;
- a suspect whose marker says it was alone (size 1) killed that call by
  itself: it ends with `PoisonItemError`, stored and acknowledged.

With one poison item in a batch of ``n``, the workers die at most
``1 + ceil(log2 n)`` times (sizes ``n``, ``n/2``, ..., 1) and every other item
completes. Needs a result backend that keeps results (not taskiq's dummy).
"""

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any, cast

from taskiq import AsyncResultBackend, TaskiqResult

logger = logging.getLogger("batchtask")

MARKER_SUFFIX = ":batchtask-call"
"""Appended to a task id: the key of its marker in the result backend."""

POISON = 0
"""`cap` of an item that killed a call by itself."""


async def cap(backend: AsyncResultBackend[Any], task_id: str, batch_size: int) -> int:
    """The largest call a suspect may be in next; `POISON` if none."""
    size = batch_size
    try:
        if await backend.is_result_ready(task_id + MARKER_SUFFIX):
            marker = await backend.get_result(task_id + MARKER_SUFFIX)
            value: object = marker.return_value
            if isinstance(value, dict):
                found: object = cast("dict[str, object]", value).get("size")
                if isinstance(found, int):
                    size = found
    except Exception:
        logger.warning(
            "batchtask: could not read the call marker of message %s",
            task_id,
            exc_info=True,
        )
    if size <= 1:
        return POISON
    return math.ceil(size / 2)


def marker(size: int) -> TaskiqResult[Any]:
    """What `mark` stores: the size of the call about to run."""
    return TaskiqResult(
        is_err=False,
        log=None,
        return_value={"size": size},
        execution_time=0.0,
    )


async def mark(
    backend: AsyncResultBackend[Any], task_ids: Sequence[str], size: int
) -> None:
    """Note, before a suspect call of `size` items, that these are in it."""
    from batchtask._grouping import store_many

    errors = await store_many(
        backend, [(task_id + MARKER_SUFFIX, marker(size)) for task_id in task_ids]
    )
    failed = [error for error in errors if error is not None]
    if failed:
        logger.warning(
            "batchtask: could not mark %d of %d suspect item(s) before their call",
            len(failed),
            len(task_ids),
            exc_info=failed[0],
        )


class Gate:
    """Calls of a worker process: many side by side, or one suspect call alone.

    A suspect call waits for the calls running to end, and no call starts
    while one waits or runs (so it cannot wait forever behind new ones).
    """

    def __init__(self) -> None:
        """No call running."""
        self.shared = 0
        self.exclusive = False
        self.exclusive_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def enter(self) -> None:
        """Start a call beside others (waits while a suspect call waits or runs)."""
        while self.exclusive or self.exclusive_waiting:
            await self._wait()
        self.shared += 1

    def leave(self) -> None:
        """A call started by `enter` ended."""
        self.shared -= 1
        if not self.shared:
            self._wake()

    async def enter_alone(self) -> None:
        """Start a suspect call once no other call runs."""
        self.exclusive_waiting += 1
        try:
            while self.exclusive or self.shared:
                await self._wait()
        finally:
            self.exclusive_waiting -= 1
            self._wake()
        self.exclusive = True

    def leave_alone(self) -> None:
        """A call started by `enter_alone` ended."""
        self.exclusive = False
        self._wake()

    async def _wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        await future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
