"""taskiq's ``InMemoryBroker``: messages handled in the process that kicks them.

- Its result backend keeps 100 results by default, fewer than one batch may
  store at once: the cap is lifted while it is taskiq's default (`registered`).
- A batch task's message kicked on it takes the batch-native path, as a
  `BatchReceiver` gives it on a worker: parsed, validated and buffered as it
  is kicked, without an asyncio task of its own, and finished per batch
  (`Kicks`). `registered` installs, once per broker, a ``kick`` on the broker
  instance that hands such messages to the native path of the running event
  loop (one per broker and loop, made on the first kick there, serving the
  broker's own taskiq ``Receiver``) and every other message to the broker's
  own ``kick``: plain tasks, and every message of a broker kicking in place.
- ``InMemoryBroker(await_inplace=True)`` handles a message before its kick
  returns (`runs_in_place`): its kicks stay on taskiq's path, where each
  item runs as a batch of one at once.
- ``broker.wait_all()`` waits for natively handled messages too: the
  messages taken in one turn of the event loop are one task in the broker's
  ``_running_tasks`` (what ``wait_all`` awaits), done when the last of them
  has ended, its result stored. ``flush_all`` waits for every message kicked
  (``wait_all``).
- ``broker.shutdown()`` runs what is buffered at once and waits for it, as on
  taskiq's path (the worker's shutdown drains the batchers; `Kicks` then waits
  for messages still arriving or ending alone).

The broker and its subclasses; a subclass with a ``kick`` of its own keeps it
for every message.
"""

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from taskiq import (
    AsyncBroker,
    BrokerMessage,
    InMemoryBroker,
    TaskiqEvents,
    TaskiqMessage,
)
from taskiq.formatters.proxy_formatter import ProxyFormatter
from taskiq.serializers import JSONSerializer
from taskiq.state import TaskiqState

from batchtask import _compat
from batchtask.brokers import local_path, send_here
from batchtask.brokers._base import LocalPath, PerMessage, missing_attributes

logger = logging.getLogger("batchtask")


TASKIQ_DEFAULT_STORED_RESULTS = 100
"""``InMemoryBroker(max_stored_results=...)``'s default."""


class InMemory(PerMessage):
    """taskiq's ``InMemoryBroker`` (see the module)."""

    family: ClassVar[str] = "in-memory"
    private_names: ClassVar[tuple[str, ...]] = (
        "InMemoryBroker._running_tasks: the kicked messages' tasks wait_all() awaits",
    )

    def registered(self) -> None:
        """Lift the default cap of 100 stored results; route kicks (`Kicks`).

        A batch stores up to `batch_size` results at once, so taskiq's default
        in-memory cap evicts results before anyone reads them. The cap is
        lifted only while it is taskiq's default (100); any other value is kept.
        """
        self._lift_result_cap()
        kicks = Kicks.of(self.broker)
        if kicks is not None:
            kicks.generation += 1  # a new batch task: read the tasks again
        elif type(self.broker).kick is InMemoryBroker.kick and not self.changes():
            Kicks.install(self.broker, self)

    def _lift_result_cap(self) -> None:
        backend: Any = self.broker.result_backend
        if getattr(backend, "max_stored_results", None) != (
            TASKIQ_DEFAULT_STORED_RESULTS
        ):
            return
        backend.max_stored_results = -1
        logger.info(
            "batchtask: InMemoryBroker result cap lifted (taskiq's default of "
            "%d stored results would evict batch results before they are read); "
            "pass InMemoryBroker(max_stored_results=N) with N != 100 to keep a cap",
            TASKIQ_DEFAULT_STORED_RESULTS,
        )

    def runs_in_place(self) -> bool:
        """``InMemoryBroker(await_inplace=True)``."""
        return bool(getattr(self.broker, "await_inplace", False))

    async def wait_kicked(self) -> None:
        """``InMemoryBroker.wait_all()`` (natively handled messages included)."""
        broker: Any = self.broker
        await broker.wait_all()

    def changes(self) -> list[str]:
        """``_running_tasks`` and ``receiver``, if the broker lacks them."""
        return missing_attributes(self.broker, ("_running_tasks", "receiver"))


@dataclass(eq=False, slots=True)
class _Burst:
    """The messages taken natively in one loop turn, until the last one ends."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    pending: int = 0
    sealed: bool = False
    """Whether its loop turn is over (no message joins it any more)."""

    def settle(self) -> None:
        if self.sealed and not self.pending:
            self.done.set()


class _Local:
    """One event loop's native path for one broker, and its kicks' bursts."""

    def __init__(self, kicks: "Kicks", path: LocalPath) -> None:
        self.kicks = kicks
        self.path = path
        self.loop = asyncio.get_running_loop()
        self.bursts: dict[str, _Burst] = {}
        """Each message held here: its task id to the burst it was taken in."""
        self.burst: _Burst | None = None
        """The burst of this loop turn, while it is open."""
        self.taking: str | None = None
        self.ended_in_take = False
        self.sent = 0
        """Messages taken without their wire form (`Kicks.send`)."""
        self.read: tuple[int, list[Any], Any] | None = None
        """What the path read when it started: the tasks' generation, the
        middlewares, the result backend."""
        path.ended = self._ended

    def take(self, message: BrokerMessage) -> bool:
        """Hand `message` to the native path; False leaves it to taskiq."""
        return self._take(message.task_id, message.message)

    def take_sent(self, message: TaskiqMessage) -> bool:
        """Hand a message kicked here, as parsed (`wire_copy`), to the native path."""
        taken = self._take(message.task_id, message)
        self.sent += taken
        return taken

    def _take(self, task_id: str, message: bytes | TaskiqMessage) -> bool:
        if task_id in self.bursts:
            # A message with this id is held here (kicked twice, a retry or
            # requeue of it while its call runs): taskiq runs it as it would.
            return False
        broker = self.kicks.broker
        read = self.read
        if (
            read is None
            or read[0] != self.kicks.generation
            or read[1] != broker.middlewares
            or read[2] is not broker.result_backend
        ):
            self.path.start()
            self.read = (
                self.kicks.generation,
                list(broker.middlewares),
                broker.result_backend,
            )
        self.taking = task_id
        self.ended_in_take = False
        try:
            if isinstance(message, bytes):
                taken = self.path.take(message, owns_delivery_slot=False)
            else:
                taken = self.path.take_sent(message)
        finally:
            self.taking = None
        if not taken:
            return False
        if not self.ended_in_take:
            burst = self.burst or self._open_burst()
            burst.pending += 1
            self.bursts[task_id] = burst
        return True

    def _open_burst(self) -> _Burst:
        burst = self.burst = _Burst()
        self.loop.call_soon(self._seal, burst)
        running: set[asyncio.Task[Any]] = vars(self.kicks.broker)["_running_tasks"]
        task = self.loop.create_task(burst.done.wait())
        running.add(task)
        task.add_done_callback(running.discard)
        return burst

    def _seal(self, burst: _Burst) -> None:
        if self.burst is burst:
            self.burst = None
        burst.sealed = True
        burst.settle()

    def _ended(self, task_id: str) -> None:
        burst = self.bursts.pop(task_id, None)
        if burst is not None:
            burst.pending -= 1
            burst.settle()
        elif task_id == self.taking:
            self.ended_in_take = True


class Kicks:
    """An ``InMemoryBroker``'s kicks, batch tasks' messages to the native path.

    Installed as the broker instance's ``kick`` (see the module); the
    broker's own ``kick`` handles whatever the native path does not take.
    """

    def __init__(self, broker: AsyncBroker, adapter: InMemory) -> None:
        """Route `broker`'s kicks; acks go through `adapter` (there are none)."""
        self.broker = broker
        self.adapter = adapter
        self.stock = broker.kick
        """The broker's own ``kick``."""
        self.generation = 0
        """Counts batch tasks registered: the native path reads them again."""
        self._locals: dict[asyncio.AbstractEventLoop, _Local | None] = {}
        """Each loop's native path (None: taskiq's path only)."""
        self._last: tuple[asyncio.AbstractEventLoop, _Local | None] | None = None

    @staticmethod
    def of(broker: AsyncBroker) -> "Kicks | None":
        """The `Kicks` installed on `broker`, if any."""
        kick = vars(broker).get("kick")
        owner = getattr(kick, "__self__", None)
        return owner if isinstance(owner, Kicks) else None

    @staticmethod
    def install(broker: AsyncBroker, adapter: InMemory) -> "Kicks":
        """Route `broker`'s kicks from now on."""
        kicks = Kicks(broker, adapter)
        vars(broker)["kick"] = kicks.kick
        send_here(broker, kicks.send)
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, kicks.on_shutdown)
        return kicks

    async def kick(self, message: BrokerMessage) -> None:
        """A batch task's message to the native path; any other to the broker's."""
        broker: Any = self.broker
        if not broker.await_inplace:
            local = self._local()
            if local is not None and local.take(message):
                return
        await self.stock(message)

    def send(self, message: TaskiqMessage) -> bool:
        """A batch task's message kicked here, to the native path without the wire.

        Taken only where it is certain to be what the wire would give
        (`wire_copy`), while this `kick` is still the broker's and the
        broker does not kick in place; False: kick it as usual.
        """
        broker = self.broker
        kick: Any = vars(broker).get("kick")
        if getattr(broker, "await_inplace", False) or kick != self.kick:
            return False
        local = self._local()
        if local is None:
            return False
        received = wire_copy(broker, message)
        return received is not None and local.take_sent(received)

    def _local(self) -> _Local | None:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        if loop in self._locals:
            local = self._locals[loop]
        else:
            for closed in [known for known in self._locals if known.is_closed()]:
                del self._locals[closed]
            local = self._locals[loop] = self._new_local()
        self._last = (loop, local)
        return local

    def _new_local(self) -> _Local | None:
        receiver: Any = getattr(self.broker, "receiver", None)
        changed = _compat.receiver_changes(receiver)
        if changed:
            logger.warning(
                "batchtask: this taskiq's receiver changed (%s); batch tasks "
                "kicked on InMemoryBroker run on taskiq's own path",
                "; ".join(changed),
            )
            return None
        path = local_path(receiver, self.adapter)
        return None if path is None else _Local(self, path)

    async def on_shutdown(self, _: TaskiqState) -> None:
        """The broker shuts down: what is buffered here runs now, and ends."""
        local = self._locals.get(asyncio.get_running_loop())
        if local is not None:
            local.path.close()
            await local.path.drain()


def wire_copy(broker: AsyncBroker, message: TaskiqMessage) -> TaskiqMessage | None:
    """`message` as taskiq's receiver parses it from its wire form, or None.

    What taskiq's default formatter and JSON serializer do to a message on its
    way (``model_dump(mode="json")``, ``json.dumps``, ``json.loads``,
    ``model_validate``) is pydantic's own JSON round trip of the message
    (``model_dump_json``, ``model_validate_json``), a third of the cost: the
    same JSON values both ways (tests/test_inprocess.py compares them value by
    value). Only for that formatter and serializer (``ensure_ascii``, the
    default); None for any other, and for a message pydantic cannot write as
    JSON (the wire path then reports it as it would).
    """
    formatter: Any = broker.formatter
    serializer: Any = broker.serializer
    if (
        type(formatter) is not ProxyFormatter
        or formatter.broker is not broker
        or type(serializer) is not JSONSerializer
        or not serializer.ensure_ascii
    ):
        return None
    try:
        return TaskiqMessage.model_validate_json(message.model_dump_json())
    except Exception:
        return None
