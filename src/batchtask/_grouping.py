"""A batch's result writes in one round trip, where the result backend allows.

When a batch's call ends, every item's receiver callback wakes in the same
turn of the event loop, and each stores its result and then acks its message.
`GroupedResultBackend` wraps a broker's result backend and writes the results
of one loop turn together where a broker family knows how
(`batchtask.brokers.writer_for`: one script call on a Redis server, one
pipeline per node on a Redis Cluster); every other backend, and every other
method, is called as before. The acks of one loop turn go together through
the broker's adapter (`batchtask.brokers`).

Each caller still waits for its own write and gets its own outcome: a result
is stored before the call returns, exactly as with one write per item; a
write that fails fails its own caller only (a lost connection fails every
caller of that round trip, as it would have failed each of them alone).
"""

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

from taskiq import AsyncBroker, AsyncResultBackend, TaskiqResult
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq.result_backends.dummy import DummyResultBackend

from batchtask.brokers import adapter_for, writer_for
from batchtask.brokers._base import Coalescer


class GroupedResultBackend(AsyncResultBackend[Any]):
    """A result backend that stores the results of one loop turn together.

    Wraps `inner`; see the module's documentation for what is grouped.
    Attributes it does not define are read from `inner`.
    """

    def __init__(self, inner: AsyncResultBackend[Any]) -> None:
        """Wrap `inner`, grouping its writes where it is known how."""
        self.inner = inner
        self.group: Coalescer[tuple[str, TaskiqResult[Any]]] | None = None
        self.round_trips = 0
        """Grouped writes sent so far (for tests and benchmarks)."""
        self._write = writer_for(inner)
        if self._write is not None:
            self.group = Coalescer(self.write)

    @property
    def groups_writes(self) -> bool:
        """Whether `write` stores many results in one round trip."""
        return self._write is not None

    async def write(
        self, requests: list[tuple[str, TaskiqResult[Any]]]
    ) -> Sequence[BaseException | None]:
        """Store many results in one round trip; return each one's error.

        :raises RuntimeError: if the wrapped backend is not one it groups.
        """
        if self._write is None:
            raise RuntimeError("this result backend's writes are not grouped")
        self.round_trips += 1
        return await self._write(requests)

    def __getattr__(self, name: str) -> Any:
        """Read what this wrapper does not define from the wrapped backend."""
        if name == "inner":  # not set yet: avoid recursing during __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def startup(self) -> None:
        """Start the wrapped backend."""
        await self.inner.startup()

    async def shutdown(self) -> None:
        """Shut the wrapped backend down."""
        await self.inner.shutdown()

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        """Store `result` under `task_id` (with this loop turn's other results)."""
        if self.group is None:
            await self.inner.set_result(task_id, result)
        else:
            await self.group.submit((task_id, result))

    async def is_result_ready(self, task_id: str) -> bool:
        """Ask the wrapped backend."""
        return await self.inner.is_result_ready(task_id)

    async def get_result(
        self, task_id: str, with_logs: bool = False
    ) -> TaskiqResult[Any]:
        """Read from the wrapped backend."""
        return await self.inner.get_result(task_id, with_logs=with_logs)

    async def set_progress(self, task_id: str, progress: Any) -> None:
        """Store progress through the wrapped backend."""
        await self.inner.set_progress(task_id, progress)

    async def get_progress(self, task_id: str) -> Any:
        """Read progress from the wrapped backend."""
        return await self.inner.get_progress(task_id)


async def store_many(
    backend: AsyncResultBackend[Any],
    requests: Sequence[tuple[str, TaskiqResult[Any]]],
) -> list[BaseException | None]:
    """Store each (task id, result); return each one's error, or None.

    One round trip where `backend` is a `GroupedResultBackend` that knows how,
    else one ``set_result`` per request, concurrently.
    """
    if isinstance(backend, GroupedResultBackend) and backend.groups_writes:
        try:
            return list(await backend.write(list(requests)))
        except Exception as exc:
            return [copy.copy(exc) for _ in requests]
    inner = backend.inner if isinstance(backend, GroupedResultBackend) else backend
    if len(requests) == 1 or type(inner) in _IN_PROCESS_BACKENDS:
        # No I/O to overlap: one after another, without a task each.
        errors: list[BaseException | None] = []
        for task_id, result in requests:
            try:
                await backend.set_result(task_id, result)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors
    replies = await asyncio.gather(
        *(backend.set_result(task_id, result) for task_id, result in requests),
        return_exceptions=True,
    )
    return [reply if isinstance(reply, BaseException) else None for reply in replies]


_IN_PROCESS_BACKENDS: tuple[type[AsyncResultBackend[Any]], ...] = (
    DummyResultBackend,
    InmemoryResultBackend,
)
"""taskiq's result backends that store in the process (no I/O)."""


def install_on_stock_worker(broker: AsyncBroker) -> None:
    """Group a worker's result writes and acks without `BatchReceiver`.

    Called when a worker with taskiq's own receiver starts: the items of a
    batch finish in the same loop turn, so their results go in one command
    (`GroupedResultBackend`, where the backend is one it groups) and their
    acks together where the broker's adapter knows how (one ``XACK`` per
    stream on Redis). Each message is still acked after its own result is
    stored, as before.
    """
    backend = broker.result_backend
    if not isinstance(backend, GroupedResultBackend):
        grouped = GroupedResultBackend(backend)
        if grouped.groups_writes:
            broker.result_backend = grouped
    adapter_for(broker).on_stock_worker()
