"""The batch-native path: a batch task's messages buffered and finished per batch.

`BatchReceiver` hands each delivery of a batch task here instead of starting
a task for it. What taskiq's receiver does for one message happens here for
each message too, in the same order, but without a task, a coroutine or a
future of its own while the item waits:

- on arrival (`NativePath.take`, synchronous): parse, ``pre_execute``
  middlewares (an async one gets a short-lived task for its message), the ack
  type, ``when_received`` acks (one round trip for the arrivals of a loop
  turn), argument parsing, binding and item validation; then the item joins
  its batch. A message that fails here ends alone, as on taskiq's path.
  With middleware hooks or a tracer, each message gets its own copy of the
  listener's context, where all its hooks run (as taskiq runs them in the
  message's own task);
- per call (`NativePath.run`): dependencies resolved once, with a taskiq
  ``Context`` and a `BatchContext` for the whole call; the function called
  once (`batchtask._outcomes.settle`: shared, per-item, partial, bisect);
- per batch (`NativePath.finish`): each message's ``on_error``,
  ``when_executed`` ack, ``post_execute``, result write, ``post_save`` and
  ``when_saved`` ack, in taskiq's order for every message, each step sent for
  the whole batch at once (one command for the results, one ``XACK`` on a Redis
  stream).

Faults (`batchtask._faults`): a batch's result writes and acks that fail on a
dropped connection are retried, a bounded number of times, over a new one; a
result that could not be written is not acknowledged ``when_saved`` (the
message is redelivered rather than left without its result); a redelivered
copy of a message held here hands its ack over to the held one, and a copy of
one that already finished is acked without a second call. A message
delivered again without a result is a suspect (`batchtask._suspects`): it
runs in ever smaller calls, each alone in the process, until the item that
ends its worker is found and fails.

A middleware hook that raises for one message ends that message there (no
result, no ack: it is redelivered), as the raising callback task does on
taskiq's path; the batch's other messages go on. The ``timeout`` label bounds
an item's wait plus its call, as on taskiq's path: an item whose time runs out
ends with ``TimeoutError`` at once; a call whose items all ran out is
cancelled.
"""

import asyncio
import contextvars
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskiq import (
    AckableMessage,
    AsyncBroker,
    Context,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqState,
)
from taskiq.acks import AckController, AcknowledgeType, parse_acknowledge_type
from taskiq.exceptions import NoResultError
from taskiq.formatters.json_formatter import JSONFormatter
from taskiq.formatters.proxy_formatter import ProxyFormatter
from taskiq.receiver.params_parser import parse_params
from taskiq.serializers import JSONSerializer

from batchtask import _compat, _lifecycle, _spans
from batchtask._batcher import Batch, Batcher, Entry
from batchtask._context import BatchContext
from batchtask._errors import PoisonItemError
from batchtask._faults import FaultObserver, Redeliveries, fault_observer, retried
from batchtask._fleet import FleetLimits, LeaseUnavailable, Router, route_key
from batchtask._grouping import store_many
from batchtask._outcomes import Outcome
from batchtask._retries import hand_back, hold_limit, not_before, settle_retries
from batchtask._shaping import (
    PLAIN,
    CallPlan,
    Measured,
    SendTimeMiddleware,
    measure,
    plan,
    sent_at,
)
from batchtask._suspects import POISON, Gate, cap, mark
from batchtask._task import BatchTask, batch_task_of, report
from batchtask.brokers import BrokerAdapter, serve_in_process
from batchtask.brokers._base import MemberGone, RawAck

if TYPE_CHECKING:
    from taskiq.receiver import Receiver

logger = logging.getLogger("batchtask")

SUSPECT_WAIT = 1.0
"""Seconds a suspect call waits to fill (its items come back together)."""

Finished = list[tuple["NativeItem", TaskiqResult[Any]]]
_Result = TaskiqResult[Any]
"""Subscripted once: pydantic looks the generic up on every subscript."""

_RESULT_FIELDS = frozenset(_Result.model_fields)


def _constructed_success(value: Any, execution_time: float, labels: Any) -> Any:
    """A successful result as ``model_construct`` builds it (no validation).

    What validation would build: nothing to convert without an error
    (taskiq's error validator is most of validation's cost).
    """
    return _Result.model_construct(
        is_err=False,
        log=None,
        return_value=value,
        execution_time=execution_time,
        labels=labels,
        error=None,
    )


def _set_success(value: Any, execution_time: float, labels: Any) -> Any:
    """The same as `_constructed_success`, set directly: a third of its cost.

    ``model_construct`` goes through every field's aliases and defaults;
    this sets what it would set. Used only where it builds an equal result
    (`_success_builder`).
    """
    result = _new_result(_Result)
    _set_attribute(
        result,
        "__dict__",
        {
            "is_err": False,
            "log": None,
            "return_value": value,
            "execution_time": execution_time,
            "labels": labels,
            "error": None,
        },
    )
    _set_attribute(result, "__pydantic_fields_set__", set(_RESULT_FIELDS))
    _set_attribute(result, "__pydantic_extra__", None)
    _set_attribute(result, "__pydantic_private__", None)
    return result


_new_result = object.__new__
_set_attribute = object.__setattr__


def _success_builder() -> Callable[[Any, float, Any], Any]:
    """`_set_success` if, on this pydantic, it builds what ``model_construct`` does."""
    names = ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__")
    try:
        direct = _set_success(1, 0.5, {"a": 1})
        built = _constructed_success(1, 0.5, {"a": 1})
        same = (
            type(direct) is type(built)
            and all(getattr(direct, n) == getattr(built, n) for n in names)
            and direct.__pydantic_private__ == built.__pydantic_private__
            and not _Result.__pydantic_post_init__
            and direct == built
        )
    except Exception:
        same = False
    return _set_success if same else _constructed_success


_success = _success_builder()
"""Builds a successful ``TaskiqResult`` for a finished message."""


@dataclass(eq=False, slots=True)
class NativeItem:
    """One message of a batch task on the native path."""

    message: TaskiqMessage
    ack: RawAck | None
    """The broker's own ack of this message."""
    acks: AckController
    ack_time: AcknowledgeType
    started: float
    """``time.time()`` on arrival: a result's ``execution_time`` counts from it."""
    holds_slot: bool
    """Whether it holds a delivery slot, given back when it ends."""
    unslotted: bool = False
    """Whether it counts among the items waiting without a slot."""
    bound: Any = None
    measured: Measured = PLAIN
    received: "asyncio.Future[None] | None" = None
    """The ``when_received`` ack round trip this message waits for."""
    ack_error: BaseException | None = None
    expiry: asyncio.TimerHandle | None = None
    done: bool = False
    raw: bytes = b""
    """The delivery as received: a redelivered copy matches it byte for byte."""
    cap: int = 0
    """A suspect's largest call (`batchtask._suspects`); 0: not a suspect."""
    context: contextvars.Context | None = None
    """Its own context, where its middleware hooks run (None: no hook to run)."""
    note: object = None
    """What a tracer noted for it (`batchtask._spans`)."""


class NativePath:
    """Batch tasks' messages of one `BatchReceiver`, handled as batches."""

    def __init__(
        self,
        receiver: "Receiver",
        *,
        max_buffered: int,
        adapter: BrokerAdapter,
        with_dependencies: bool = True,
    ) -> None:
        """Serve `receiver`'s broker; up to `max_buffered` items wait slot-free.

        What a delivery is, and how a batch's acks go (one ``XACK`` on a Redis
        stream, ``multiple=True`` on AMQP, one buffer flush on NATS), is the
        broker `adapter`'s to say; a batch's results go together wherever the
        broker's result backend is a `GroupedResultBackend`. Without
        `with_dependencies`, a batch task with injected dependencies is left
        to taskiq (which resolves them per message; this path once per call).
        """
        self.receiver = receiver
        self.broker: AsyncBroker = receiver.broker
        self.max_buffered = max_buffered
        self.with_dependencies = with_dependencies
        self.unslotted = 0
        """Items waiting now whose delivery slot went back at once."""
        self.taken = 0
        """Deliveries taken so far."""
        self._batchers: dict[tuple[str, int], Batcher[NativeItem, Any]] = {}
        self._received: list[NativeItem] = []
        self._intakes: set[asyncio.Task[None]] = set()
        self.adapter = adapter
        self._names: tuple[bytes, ...] | None = None
        self._pre_execute: list[TaskiqMiddleware] = []
        self._on_error: list[TaskiqMiddleware] = []
        self._post_execute: list[TaskiqMiddleware] = []
        self._post_save: list[TaskiqMiddleware] = []
        self.redeliveries = Redeliveries(self.broker.result_backend)
        self.gate = Gate()
        self._tracer: _spans.CallTracer | None = None
        self.faults: FaultObserver | None = None
        """Where fault events are counted (`batchtask.metrics`), if anywhere."""
        self._own_contexts = False
        """Whether each message gets its own context (`_intake`)."""
        self._checks_results = self.redeliveries.checks_results
        """The result backend's `Redeliveries.checks_results`, read at `start`."""
        self._held: dict[
            int,
            tuple[asyncio.TimerHandle, BatchTask[Any, ..., ..., Any, Any], NativeItem],
        ] = {}
        """Retried items waiting for their time, outside every batch (`_hold`)."""
        self._hold_limit = hold_limit(adapter)
        self._keeper: asyncio.Task[None] | None = None
        """Tells the broker which held deliveries are still worked on (`start`)."""
        server = adapter.lease_server()
        self.fleet: FleetLimits | None = None if server is None else FleetLimits(server)
        """Where calls of limited tasks take their leases (`batchtask._fleet`)."""
        routes = adapter.route_server()
        self.router: Router | None = None if routes is None else Router(routes)
        """Where deliveries go to the process that batches their key."""
        self.ended: Callable[[str], None] | None = None
        """Told the task id of each taken message as it ends (an in-process
        broker's ``wait_all`` waits for its kicks so: `batchtask.brokers`)."""

    def start(self) -> None:
        """Read the broker's tasks and middlewares as they are when listening starts."""
        self._names = _name_filter(self.broker)
        middlewares = self.broker.middlewares
        self._pre_execute = _overriding(middlewares, "pre_execute")
        self._on_error = _overriding(reversed(middlewares), "on_error")
        self._post_execute = _overriding(reversed(middlewares), "post_execute")
        self._post_save = _overriding(reversed(middlewares), "post_save")
        self._tracer = _spans.tracer_of(self.broker)
        self.faults = fault_observer(_lifecycle.observer_of(self.broker))
        self._own_contexts = self._tracer is not None or any(
            (self._pre_execute, self._on_error, self._post_execute, self._post_save)
        )
        self.redeliveries.backend = self.broker.result_backend
        self._checks_results = self.redeliveries.checks_results
        if self.router is not None:
            self.router.start()
        window = self.adapter.redelivery_window()
        if window is not None and self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep_alive(window[0])
            )

    # -- arrival ---------------------------------------------------------

    def take(self, data: bytes | AckableMessage, owns_delivery_slot: bool) -> bool:
        """Take one delivery if it is a batch task's; False leaves it to taskiq.

        A taken message keeps its delivery slot while an async
        ``pre_execute`` runs for it (so the slots bound how many do), then
        gives it back as it joins its batch while fewer than `max_buffered`
        items wait that way; beyond that it keeps the slot until it ends, so
        the broker stops delivering (memory stays bounded).
        """
        raw = data.data if isinstance(data, AckableMessage) else data
        names = self._names
        if names is not None:
            for name in names:
                if name in raw:
                    break
            else:
                return False  # not a batch task's message: taskiq parses it
        try:
            message = self.broker.formatter.loads(message=raw)
            message.parse_labels()
        except Exception:
            return False  # taskiq's path reports and acks it
        return self._take_parsed(message, data, owns_delivery_slot)

    def take_sent(self, message: TaskiqMessage) -> bool:
        """Take a batch task's message kicked in this process; False: not taken.

        `message` is what taskiq's receiver would parse from the message's
        wire form (an in-process broker's adapter makes it without the wire:
        `batchtask.brokers.inmemory.wire_copy`); it is the receiver's own from
        here on, labels parsed here, as `take` parses them.
        """
        try:
            message.parse_labels()
        except Exception:
            return False
        return self._take_parsed(message, b"", False)

    def _take_parsed(
        self,
        message: TaskiqMessage,
        data: bytes | AckableMessage,
        owns_delivery_slot: bool,
    ) -> bool:
        found = self.broker.find_task(message.task_name)
        task = None if found is None else batch_task_of(found.original_func)
        if task is None or (task.signature.injected and not self.with_dependencies):
            return False
        assert found is not None
        _compat.prepare_task(self.receiver, message.task_name, found.original_func)
        self.taken += 1
        router = self.router
        if router is not None and router.members and router.server.forwardable(data):
            config = task.config
            key = route_key(message.task_name, message.args, message.kwargs)
            cost = None if config.dedup_key else task.call_seconds
            owner = router.route(key, config.batch_size, config.batch_timeout, cost)
            if owner is not None:
                self._spawn(
                    self._forward(task, message, data, key, owner, owns_delivery_slot)
                )
                return True
        self._take_here(task, message, data, owns_delivery_slot)
        return True

    async def _forward(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        message: TaskiqMessage,
        data: bytes | AckableMessage,
        key: str,
        owner: str,
        owns_delivery_slot: bool,
    ) -> None:
        """Move `data` to the inbox of `owner`, which owns route `key`.

        Refused because `owner` is no member any more: to the route's next
        owner (once). If it cannot move, it is batched here.
        """
        router = self.router
        assert router is not None
        if router.hot(key):
            # The rest of its loop turn made the route hot here (a read that
            # brought a whole batch of it): batched here, with the others.
            self._take_here(task, message, data, owns_delivery_slot)
            return
        for _ in range(2):
            try:
                # Bounded: a server that stalls must not hold the delivery (if
                # the move lands after all, the owner runs it too: at least once).
                await asyncio.wait_for(router.server.forward(owner, data), router.ttl)
            except MemberGone:
                router.gone(owner)
                next_owner = router.owner(key)
                if next_owner is not None and next_owner != owner:
                    owner = next_owner
                    continue
                self._take_here(task, message, data, owns_delivery_slot)
                return
            except Exception as exc:
                router.move_failed(exc)
                self._take_here(task, message, data, owns_delivery_slot)
                return
            break
        else:
            self._take_here(task, message, data, owns_delivery_slot)
            return
        router.forwarded += 1
        if owns_delivery_slot:
            self.receiver.sem_prefetch.release()
        if self.ended is not None:
            self.ended(message.task_id)

    def _take_here(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        message: TaskiqMessage,
        data: bytes | AckableMessage,
        owns_delivery_slot: bool,
    ) -> None:
        """Take one delivery of `task` into this process's batches."""
        raw = data.data if isinstance(data, AckableMessage) else data
        ack = data.ack if isinstance(data, AckableMessage) else None
        item = NativeItem(
            message,
            ack,
            AckController(ack),
            AcknowledgeType.WHEN_SAVED,
            time.time(),
            owns_delivery_slot,
            raw=raw,
        )
        redeliveries = self.redeliveries
        held = redeliveries.held.get(message.task_id)
        if held is not None and held.raw == raw:
            self._adopt(held, item)
            return
        if redeliveries.owed(message.task_id):
            self._spawn(self._skip(item))
            return
        redeliveries.held.setdefault(message.task_id, item)
        if self._checks_results:
            again = self.adapter.redelivered(data)
            if again is not False:
                ask = data if again is None else None
                self._spawn(self._take_redelivered(task, item, ask))
                return
        self._intake(task, item)

    def _adopt(self, held: NativeItem, copy: NativeItem) -> None:
        """A redelivered `copy` of `held`: its ack is the one that works now."""
        if held.acks.is_acked or held.done:
            self._spawn(self._skip(copy))  # acked, or ending: ack the copy too
            return
        held.ack, held.acks = copy.ack, copy.acks
        copy.done = True
        if copy.holds_slot:
            self.receiver.sem_prefetch.release()
        self._count("redelivered_joined")
        logger.info(
            "batchtask: message %s was delivered again while held here; its "
            "new delivery's ack replaces the old one",
            held.message.task_id,
        )

    async def _take_redelivered(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        item: NativeItem,
        ask: bytes | AckableMessage | None,
    ) -> None:
        """A delivery that may be a second one: run it only if it has not run.

        One that has not run is a suspect: capped, or failed as the poison.
        """
        redeliveries = self.redeliveries
        task_id = item.message.task_id
        if ask is not None and not await self.adapter.delivered_before(ask):
            self._intake(task, item)
            return
        async with redeliveries.lookups:
            ran = await redeliveries.finished(task_id)
            if not ran:
                item.cap = await cap(
                    self.broker.result_backend, task_id, task.config.batch_size
                )
        if ran:
            await self._skip(item)
            return
        if item.cap == POISON:
            self._count("poison")
            logger.error(
                "batchtask: message %s of task %s was alone in a call that ended "
                "its worker process; it fails and is not run again",
                task_id,
                task.task_name,
            )
            error = PoisonItemError(
                message=f"batch task {task.task_name!r}: message {task_id} was "
                "alone in a call that ended its worker process; not run again"
            )
            await self._end_alone(item, error)
            return
        self._intake(task, item)

    async def _skip(self, item: NativeItem) -> None:
        """Ack a redelivered copy of a message that already ran, without a call."""
        self.redeliveries.skipped += 1
        self._count("redelivered_acked_unrun")
        logger.info(
            "batchtask: message %s was delivered again after its call finished; "
            "acked without running it again",
            item.message.task_id,
        )
        try:
            if item.acks.is_ackable:
                await self._ack_logged([item])
        finally:
            self._release(item)

    def _intake(
        self, task: BatchTask[Any, ..., ..., Any, Any], item: NativeItem
    ) -> None:
        """``pre_execute`` middlewares, then into the batch.

        With middleware hooks or a tracer, in the message's own copy of this
        context, where its later hooks run too: as taskiq runs a message's
        hooks and function in one asyncio task of its own, so what a hook
        sets there (an OpenTelemetry span, a context variable) is the
        message's alone, and the batch's call sees its first message's.
        """
        if self._own_contexts:
            item.context = contextvars.copy_context()
            item.context.run(self._intake_here, task, item)
        else:
            self._intake_here(task, item)

    def _intake_here(
        self, task: BatchTask[Any, ..., ..., Any, Any], item: NativeItem
    ) -> None:
        for index, middleware in enumerate(self._pre_execute):
            returned = middleware.pre_execute(item.message)
            if inspect.isawaitable(returned):
                intake = asyncio.get_running_loop().create_task(
                    self._take_later(task, item, returned, index + 1),
                    context=item.context,
                )
                self._intakes.add(intake)
                intake.add_done_callback(self._intakes.discard)
                return
            item.message = returned
        self._enter(task, item)

    async def _take_later(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        item: NativeItem,
        pending: Awaitable[TaskiqMessage],
        index: int,
    ) -> None:
        """Finish `take` for a message whose ``pre_execute`` is async."""
        try:
            item.message = await pending
            for middleware in self._pre_execute[index:]:
                returned = middleware.pre_execute(item.message)
                if inspect.isawaitable(returned):
                    returned = await returned
                item.message = returned
        except Exception:
            logger.exception("batchtask: a pre_execute middleware raised")
            self._release(item)
            return
        self._enter(task, item)

    def _enter(
        self, task: BatchTask[Any, ..., ..., Any, Any], item: NativeItem
    ) -> None:
        """Ack type, ``when_received`` ack, arguments; then into the batch."""
        receiver = self.receiver
        if self.unslotted < self.max_buffered:
            if item.holds_slot:
                receiver.sem_prefetch.release()
                item.holds_slot = False
            self.unslotted += 1
            item.unslotted = True
        message = item.message
        label = message.labels.get("ack_type")
        try:
            if label is not None:
                item.ack_time = parse_acknowledge_type(label)
            else:
                item.ack_time = receiver.ack_time
        except ValueError:
            logger.exception(
                "batchtask: invalid ack_type label %r for task %s",
                label,
                message.task_name,
            )
            self._release(item)
            return
        if item.ack_time is AcknowledgeType.WHEN_RECEIVED and item.acks.is_ackable:
            self._ack_received(item)
        name = message.task_name
        if receiver.validate_params:
            parse_params(
                receiver.task_signatures.get(name),
                receiver.task_hints.get(name) or {},
                message,
            )
        try:
            item.bound = task.signature.bind(tuple(message.args), message.kwargs)
            item.measured = measure(task.config, task.task_name, item.bound.item)
        except Exception as exc:
            self._spawn(self._end_alone(item, exc))
            return
        if self._tracer is not None:
            item.note = self._tracer.note()
        wait = not_before(message.labels) - time.time()
        if wait > 0:
            self._hold(task, item, wait)
            return
        self._submit(task, item)

    def _submit(
        self, task: BatchTask[Any, ..., ..., Any, Any], item: NativeItem
    ) -> None:
        """Into the batch of its key (its ``timeout`` label counts from here)."""
        message = item.message
        batcher = self._batcher_of(task, item.cap)
        entry = batcher.submit(
            item.measured.key(item.bound.key), item, weight=item.measured.weight
        )
        timeout = message.labels.get("timeout")
        if timeout is not None:
            loop = asyncio.get_running_loop()
            item.expiry = loop.call_later(float(timeout), self._expire, batcher, entry)

    # -- held retries ----------------------------------------------------

    def _hold(
        self, task: BatchTask[Any, ..., ..., Any, Any], item: NativeItem, wait: float
    ) -> None:
        """Keep a retried item out of every batch until its time (no task, no slot).

        Held for at most half the broker's redelivery window; then, or when
        the worker closes, it is handed back (`_hand_back`).
        """
        span = wait if self._hold_limit is None else min(wait, self._hold_limit)
        loop = asyncio.get_running_loop()
        self._held[id(item)] = (
            loop.call_later(span, self._unhold, task, item, span < wait),
            task,
            item,
        )

    def _unhold(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        item: NativeItem,
        hand_back: bool,
    ) -> None:
        self._held.pop(id(item), None)
        if item.done:
            return
        if hand_back:
            self._spawn(self._hand_back(task, [item]))
        else:
            self._submit(task, item)

    async def _hand_back(
        self, task: BatchTask[Any, ..., ..., Any, Any], items: list[NativeItem]
    ) -> None:
        """Send held items again as they are, then end them without a result.

        If they cannot be sent they run now, early, rather than be lost.
        """
        if await hand_back(self.broker, [item.message for item in items]):
            await self.finish([(item, Outcome(NoResultError())) for item in items])
        else:
            for item in items:
                if not item.done:
                    self._submit(task, item)

    def _ack_received(self, item: NativeItem) -> None:
        """Ack on arrival, with the arrivals of this loop turn in one round trip."""
        if not self._received:
            asyncio.get_running_loop().call_soon(self._send_received)
        self._received.append(item)
        item.received = asyncio.get_running_loop().create_future()

    def _send_received(self) -> None:
        items, self._received = self._received, []
        self._spawn(self._ack_now(items))

    async def _ack_now(self, items: list[NativeItem]) -> None:
        errors = await retried(
            "acknowledging on receipt",
            items,
            self.ack_many,
            _id,
            observer=self.faults,
            event="ack",
        )
        for item, error in zip(items, errors, strict=True):
            item.ack_error = error
            if item.received is not None and not item.received.done():
                item.received.set_result(None)

    def _batcher_of(
        self, task: BatchTask[Any, ..., ..., Any, Any], suspects: int = 0
    ) -> Batcher[NativeItem, Any]:
        """The task's batcher; with `suspects`, the one for calls of that many."""
        batcher = self._batchers.get((task.task_name, suspects))
        if batcher is not None:
            return batcher
        gate = self.gate
        if not suspects:

            async def run(batch: Batch[NativeItem, Any]) -> None:
                await gate.enter()
                try:
                    await self.run(task, batch)
                finally:
                    gate.leave()

            batcher = task.new_batcher(run)
        else:

            async def run(batch: Batch[NativeItem, Any]) -> None:
                await gate.enter_alone()
                try:
                    await self.run(task, batch, suspect=True)
                finally:
                    gate.leave_alone()

            limits = dataclasses.replace(
                task.config.limits(),
                batch_size=suspects,
                batch_timeout=min(task.config.batch_timeout, SUSPECT_WAIT),
                debounce=None,
                adaptive=False,
                max_calls=1,
                max_calls_per_key=None,
            )
            batcher = _lifecycle.new_batcher(
                self.broker, run, name=task.task_name, limits=limits
            )
        self._batchers[task.task_name, suspects] = batcher
        return batcher

    def _expire(
        self, batcher: Batcher[NativeItem, Any], entry: Entry[NativeItem, Any]
    ) -> None:
        """The ``timeout`` label ran out: the item ends with ``TimeoutError``."""
        item = entry.value
        item.expiry = None
        if entry.future.done() or item.done:
            return
        entry.future.cancel()
        batcher.withdraw(entry)
        self._spawn(self._end_alone(item, TimeoutError()))

    # -- the call --------------------------------------------------------

    async def run(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        batch: Batch[NativeItem, Any],
        *,
        suspect: bool = False,
    ) -> None:
        """Call the function once for `batch`, then finish every message.

        However the run ends, every message it did not finish ends here
        without a result or an ack (the broker redelivers it), and every
        entry's future is resolved: nothing waits on them, nothing leaks.
        """
        try:
            await self._run(task, batch, suspect)
        finally:
            for entry in batch.entries:
                if entry.future.done():
                    continue  # its time ran out: it ends on its own
                entry.future.set_result(None)
                if not entry.value.done:
                    self._release(entry.value)

    async def _run(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        batch: Batch[NativeItem, Any],
        suspect: bool,
    ) -> None:
        live = [entry for entry in batch.entries if not entry.future.done()]
        received = {e.value.received for e in live if e.value.received is not None}
        if received:
            await asyncio.wait(received)
        for entry in live:
            if entry.value.ack_error is not None:  # as taskiq: not run, not stored
                logger.error(
                    "batchtask: acknowledging message %s failed",
                    entry.value.message.task_id,
                    exc_info=entry.value.ack_error,
                )
                self._release(entry.value)
        live = [entry for entry in live if not entry.value.done]
        if not live:
            return
        every = [entry.value for entry in live]
        call = plan(
            task.config,
            task.task_name,
            [item.measured for item in every],
            lambda: [sent_at(item.message.labels, item.started) for item in every],
        )
        if suspect and call.passed:
            self._count("suspect", len(call.passed))
            logger.warning(
                "batchtask: %d item(s) of task %s delivered again without a "
                "result (their call may have ended a worker) run in a call alone",
                len(call.passed),
                task.task_name,
            )
            await mark(
                self.broker.result_backend,
                [every[index].message.task_id for index in call.passed],
                len(call.passed),
            )
        try:
            outcomes = await self._call(task, batch, every, call)
        except LeaseUnavailable:
            # Not called, or called while its lease lapsed (LeaseLost: another
            # process may have run them): back to the broker, unacknowledged,
            # for a worker that holds the lease (see batchtask._fleet).
            for item in every:
                self._release(item)
            return
        if not call.trivial:
            await self._ack_left_out(every, call)
        outcomes = call.spread(len(every), outcomes)
        report(task, call, outcomes, every[0].measured.shown_group)
        await self.finish(
            [
                (entry.value, outcome)
                for entry, outcome in zip(live, outcomes, strict=True)
                if not entry.future.done()  # else its time ran out meanwhile
            ]
        )

    async def _call(
        self,
        task: BatchTask[Any, ..., ..., Any, Any],
        batch: Batch[NativeItem, Any],
        every: list[NativeItem],
        call: CallPlan,
    ) -> list[Outcome]:
        """The outcomes of the items `call` passes, in call order."""
        if not call.passed:
            return []
        items = [every[index] for index in call.passed]
        broker = self.broker
        # Only an injected Context or BatchContext lets the function see it.
        context = self._context(items, every, call) if task.signature.injected else None
        outcomes: list[Outcome]
        resolver = None
        try:
            injected: dict[str, Any] = {}
            if context is not None:
                graph = self.receiver.dependency_graphs[task.task_name]
                resolver = graph.async_ctx(
                    {
                        **broker.custom_dependency_context,
                        Context: context.call_context(items[0].message),
                        BatchContext: context,
                        TaskiqState: broker.state,
                    },
                    broker.dependency_overrides or None,
                )
                injected = await resolver.resolve_kwargs()
            leader = items[0].bound._replace(injected=injected)
            scope = _spans.scope(
                self._tracer,
                task.task_name,
                batch,
                leader,
                [i.note for i in items],
                items[0].measured.shown_group,
            )
            config = task.config
            if self.fleet is None or (
                config.max_concurrent_calls is None
                and config.max_concurrent_calls_per_key is None
            ):
                outcomes = await task.outcomes(
                    [item.bound.item for item in items], leader, scope
                )
            else:  # the limits hold across the fleet: the call holds leases
                async with self.fleet.calls(
                    task.task_name,
                    batch.key,
                    config.max_concurrent_calls,
                    config.max_concurrent_calls_per_key,
                ):
                    outcomes = await task.outcomes(
                        [item.bound.item for item in items], leader, scope
                    )
        except LeaseUnavailable:  # no call without its leases: `_run` gives back
            if resolver is not None:
                await resolver.close(None, None, None)
            raise
        except Exception as exc:  # resolving a dependency failed: every item fails
            outcomes = [Outcome(exc)] * len(items)
        except BaseException:  # cancelled: every item's time ran out
            if resolver is not None:
                await asyncio.shield(resolver.close(None, None, None))
            raise
        if context is not None:
            outcomes = [
                Outcome(override) if (override := context.override(index)) else outcome
                for index, outcome in enumerate(outcomes)
            ]
        outcomes = await settle_retries(
            task.config,
            task.task_name,
            broker,
            [item.message for item in items],
            outcomes,
            _lifecycle.observer_of(broker),
        )
        failed = [outcome.error for outcome in outcomes if outcome.error is not None]
        if resolver is not None:
            # Generator dependencies see the call's first error, as taskiq
            # passes a task's error to them.
            error = failed[0] if failed and self.receiver.propagate_exceptions else None
            if error is None:
                await resolver.close(None, None, None)
            else:
                await resolver.close(type(error), error, error.__traceback__)
        if failed and not isinstance(failed[0], NoResultError):
            logger.error(
                "batch task %s: %d of %d item(s) failed",
                task.task_name,
                len(failed),
                len(items),
                exc_info=failed[0],
            )
        return outcomes

    def _context(
        self, items: list[NativeItem], every: list[NativeItem], call: CallPlan
    ) -> BatchContext:
        """The `BatchContext` of a call of `items` (its acks cover duplicates)."""
        groups = [[every[i] for i in group] for group in call.groups()]

        async def ack_indexes(
            indexes: Sequence[int],
        ) -> Sequence[BaseException | None]:
            # A passed item's ack covers its duplicates too.
            errors = await self.ack_many([i for j in indexes for i in groups[j]])
            at = 0
            firsts: list[BaseException | None] = []
            for j in indexes:
                group = errors[at : at + len(groups[j])]
                firsts.append(next((e for e in group if e is not None), None))
                at += len(groups[j])
            return firsts

        return BatchContext.of(
            [item.message for item in items],
            [
                _group_ack(group) if all(i.acks.is_ackable for i in group) else None
                for group in groups
            ],
            self.broker,
            ack_indexes,
        )

    async def _ack_left_out(self, every: list[NativeItem], call: CallPlan) -> None:
        """Under manual acks: ack expired items, and duplicates of acked ones.

        Nobody else would: the function never saw them.
        """
        due = [
            every[index]
            for index in call.expired
            if every[index].ack_time is AcknowledgeType.MANUAL
        ]
        due += [
            every[index]
            for index, original in call.copies.items()
            if every[index].ack_time is AcknowledgeType.MANUAL
            and every[original].acks.is_acked
        ]
        due = [item for item in due if item.acks.is_ackable and not item.acks.is_acked]
        if due:
            await self._ack_logged(due)

    # -- results and acks ------------------------------------------------

    async def _end_alone(self, item: NativeItem, error: BaseException) -> None:
        """One message that ends before (or without) its batch's call."""
        if item.received is not None:
            await item.received
            if item.ack_error is not None:
                self._release(item)
                return
        if not isinstance(error, TimeoutError):
            logger.error(
                "batch task %s: message %s failed",
                item.message.task_name,
                item.message.task_id,
                exc_info=error,
            )
        await self.finish([(item, Outcome(error))])

    async def finish(self, pairs: Sequence[tuple[NativeItem, Outcome]]) -> None:
        """What taskiq's receiver does after a task ran, for many messages at once."""
        now = time.time()
        results: list[tuple[NativeItem, TaskiqResult[Any]]] = []
        for item, outcome in pairs:
            if item.done:
                continue
            if item.expiry is not None:
                item.expiry.cancel()
                item.expiry = None
            error = outcome.error
            execution_time = round(now - item.started, 2)
            if error is None:
                result = _success(
                    outcome.value, execution_time, dict(item.message.labels)
                )
            else:
                result = TaskiqResult(
                    is_err=True,
                    log=None,
                    return_value=None,
                    execution_time=execution_time,
                    error=error,
                    labels=item.message.labels,
                )
            results.append((item, result))
        everyone = [item for item, _ in results]
        try:
            failed = [(i, r) for i, r in results if r.error is not None]
            for middleware in self._on_error:
                failed = await _each(failed, functools.partial(_on_error, middleware))
            kept = {id(item) for item, _ in failed}
            results = [(i, r) for i, r in results if r.error is None or id(i) in kept]
            await self._ack_at(results, AcknowledgeType.WHEN_EXECUTED)
            for middleware in self._post_execute:
                results = await _each(
                    results, functools.partial(_post_execute, middleware)
                )
            to_store = [
                (i, r) for i, r in results if not isinstance(r.error, NoResultError)
            ]
            unsaved: set[int] = set()
            if to_store:
                errors = await retried(
                    "storing results",
                    to_store,
                    self._store,
                    _id_of_pair,
                    observer=self.faults,
                    event="write",
                )
                stored: Finished = []
                for pair, write_error in zip(to_store, errors, strict=True):
                    if write_error is None:
                        stored.append(pair)
                    else:
                        unsaved.add(id(pair[0]))
                        logger.error(
                            "Can't set result in result backend.",
                            exc_info=write_error,
                        )
                for middleware in self._post_save:
                    stored = await _each(
                        stored, functools.partial(_post_save, middleware)
                    )
            # Unlike taskiq: no ``when_saved`` ack without the result; the
            # message comes back and runs again rather than lose its result.
            await self._ack_at(
                [(i, r) for i, r in results if id(i) not in unsaved],
                AcknowledgeType.WHEN_SAVED,
            )
        finally:
            for item in everyone:
                self._release(item)

    async def _ack_at(
        self,
        results: list[tuple[NativeItem, TaskiqResult[Any]]],
        when: AcknowledgeType,
    ) -> None:
        due = [
            item
            for item, _ in results
            if item.ack_time is when and item.acks.is_ackable
        ]
        if due:
            await self._ack_logged(due)

    async def _store(
        self, pairs: Sequence[tuple[NativeItem, TaskiqResult[Any]]]
    ) -> list[BaseException | None]:
        return await store_many(
            self.broker.result_backend,
            [(item.message.task_id, result) for item, result in pairs],
        )

    async def _ack_logged(self, due: Sequence[NativeItem]) -> None:
        """Ack `due`, retrying over faults; remember what never got through."""
        errors = await retried(
            "acknowledging", due, self.ack_many, _id, observer=self.faults, event="ack"
        )
        for item, error in zip(due, errors, strict=True):
            if error is not None:
                self.redeliveries.owe(item.message.task_id)

    async def ack_many(self, items: Sequence[NativeItem]) -> list[BaseException | None]:
        """Ack the messages of `items` not acked yet; one round trip where known."""
        return await self.adapter.ack_many([(item.acks, item.ack) for item in items])

    def _release(self, item: NativeItem) -> None:
        """The message ended: give its slot back (once)."""
        if item.done:
            return
        item.done = True
        if self.ended is not None:
            self.ended(item.message.task_id)
        held = self.redeliveries.held
        if held.get(item.message.task_id) is item:
            del held[item.message.task_id]
        if item.expiry is not None:
            item.expiry.cancel()
            item.expiry = None
        if item.holds_slot:
            self.receiver.sem_prefetch.release()
        if item.unslotted:
            self.unslotted -= 1

    # -- life ------------------------------------------------------------

    def _count(self, event: str, count: int = 1) -> None:
        """Count a fault event (`batchtask._faults.FAULT_EVENTS`) where counted."""
        if self.faults is not None:
            self.faults.fault(event, count)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._intakes.add(task)
        task.add_done_callback(self._intakes.discard)

    async def _keep_alive(self, window: float) -> None:
        """Keep the deliveries held here from counting as idle on the broker.

        Every third of the redelivery window, the ones older than that are
        named to the broker as still worked on.
        """
        period = max(window / 3, 0.2)
        while True:
            await asyncio.sleep(period)
            old = time.time() - period
            acks = [
                item.ack
                for item in self.redeliveries.held.values()
                if not item.done and item.started < old and not item.acks.is_acked
            ]
            if not acks:
                continue
            try:
                await asyncio.wait_for(self.adapter.keep(acks), period)
            except Exception:  # the broker is away: it may redeliver them
                logger.debug("batchtask: keeping %d deliveries failed", len(acks))

    def close(self) -> None:
        """Run every buffered batch now, hand held items back: no more will arrive."""
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        for batcher in self._batchers.values():
            batcher.close()
        held, self._held = self._held, {}
        by_task: dict[str, tuple[BatchTask[Any, ..., ..., Any, Any], list[NativeItem]]]
        by_task = {}
        for timer, task, item in held.values():
            timer.cancel()
            by_task.setdefault(task.task_name, (task, []))[1].append(item)
        for task, items in by_task.values():
            self._spawn(self._hand_back(task, items))

    async def leave(self) -> None:
        """Leave the fleet (after `drain`): its inbox goes back to the queue."""
        if self.router is not None:
            await self.router.stop()

    async def wait_idle(self) -> None:
        """Wait until no taken message is still arriving or in a running batch."""
        await self._settle(drain=False)

    async def drain(self) -> None:
        """Wait until every taken message has ended (after `close`)."""
        await self._settle(drain=True)

    async def _settle(self, *, drain: bool) -> None:
        # A message still arriving may open a batch; draining runs it too.
        while self._intakes or any(
            b.running or (drain and b.buffered) for b in self._batchers.values()
        ):
            if self._intakes:
                await asyncio.wait(set(self._intakes))
            for batcher in self._batchers.values():
                await (batcher.drain() if drain else batcher.wait_idle())


def _id(item: NativeItem) -> str:
    return item.message.task_id


def _id_of_pair(pair: tuple[NativeItem, TaskiqResult[Any]]) -> str:
    return pair[0].message.task_id


def _group_ack(group: list[NativeItem]) -> Callable[[], Awaitable[None]]:
    """One passed item's ack: its message's, and its duplicates'."""
    if len(group) == 1:
        return group[0].acks.ack

    async def ack() -> None:
        for item in group:
            await item.acks.ack()

    return ack


async def _each(
    results: Finished, hook: Callable[[NativeItem, TaskiqResult[Any]], Any]
) -> Finished:
    """Run one middleware hook for each message; drop those where it raised."""
    kept: Finished = []
    waiting: list[tuple[int, Awaitable[Any]]] = []
    for index, (item, result) in enumerate(results):
        context = item.context
        try:
            if context is None:
                returned = hook(item, result)
            else:  # where its pre_execute ran (`NativePath._intake`)
                returned = context.run(hook, item, result)
                if inspect.iscoroutine(returned):
                    returned = asyncio.get_running_loop().create_task(
                        returned, context=context
                    )
        except Exception:
            logger.exception(
                "batchtask: a middleware raised for %s", item.message.task_id
            )
            continue
        if inspect.isawaitable(returned):
            waiting.append((index, returned))
        else:
            kept.append((item, result))
    if not waiting:
        return kept
    replies = await asyncio.gather(*(w for _, w in waiting), return_exceptions=True)
    passed = {id(item) for item, _ in kept}
    for (index, _), reply in zip(waiting, replies, strict=True):
        item = results[index][0]
        if isinstance(reply, BaseException):
            logger.error(
                "batchtask: a middleware raised for %s",
                item.message.task_id,
                exc_info=reply,
            )
        else:
            passed.add(id(item))
    return [(item, result) for item, result in results if id(item) in passed]


def _on_error(
    middleware: TaskiqMiddleware, item: NativeItem, result: TaskiqResult[Any]
) -> Any:
    error = result.error
    assert error is not None  # only failed results reach on_error
    return middleware.on_error(item.message, result, error)


def _post_execute(
    middleware: TaskiqMiddleware, item: NativeItem, result: TaskiqResult[Any]
) -> Any:
    return middleware.post_execute(item.message, result)


def _post_save(
    middleware: TaskiqMiddleware, item: NativeItem, result: TaskiqResult[Any]
) -> Any:
    return middleware.post_save(item.message, result)


def _overriding(
    middlewares: Iterable[TaskiqMiddleware], hook: str
) -> list[TaskiqMiddleware]:
    """The middlewares that define `hook`, in the order given."""
    base = getattr(TaskiqMiddleware, hook)
    return [
        m
        for m in middlewares
        if getattr(type(m), hook) is not base
        # It notes labels for taskiq's path; this path reads them itself.
        and not isinstance(m, SendTimeMiddleware)
    ]


def _name_filter(broker: AsyncBroker) -> tuple[bytes, ...] | None:
    """Byte strings one of which a batch task's message must contain.

    Only for JSON messages (taskiq's JSON formatter, or its default formatter
    with the JSON serializer), which hold each task name quoted as it is, for
    names without characters JSON escapes: a message without any of them is
    not a batch task's and goes to taskiq unparsed. None: parse every one.
    """
    formatter = broker.formatter
    json_messages = type(formatter) is JSONFormatter or (
        type(formatter) is ProxyFormatter and type(broker.serializer) is JSONSerializer
    )
    if not json_messages:
        return None
    names: list[bytes] = []
    for task in broker.get_all_tasks().values():
        if batch_task_of(task.original_func) is None:
            continue
        name = task.task_name
        if not (name.isascii() and name.isprintable()) or any(
            c in name for c in '"\\/'
        ):
            return None
        names.append(f'"{name}"'.encode())
    return tuple(names)


def in_process_path(receiver: "Receiver", adapter: BrokerAdapter) -> NativePath:
    """The batch-native path of an in-process broker's own receiver.

    Its messages are kicked, not read: none holds a delivery slot, so nothing
    caps how many wait (as nothing caps the tasks taskiq's path starts there).
    A batch task with injected dependencies stays on taskiq's path, where
    tests written against an in-process broker see them resolved per message.
    """
    return NativePath(
        receiver, max_buffered=1 << 62, adapter=adapter, with_dependencies=False
    )


serve_in_process(in_process_path)
