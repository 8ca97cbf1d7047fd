"""The `batch_task` decorator and the task object it returns.

The decorator registers an ordinary taskiq task, the *entry point*, whose
signature is ``(item, *rest, *injected)``. taskiq's own receiver runs it once
per message: it binds the arguments, validates the item, puts it in the batch
of its group key and awaits that item's outcome. The batch run calls the user
function once for the whole group and resolves every item's future. So the
receiver stores each item's result under its own task id and acknowledges the
message only after its batch ran, exactly as for any task.
"""

import asyncio
import dataclasses
import functools
import inspect
import logging
import time
import typing
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Sequence,
)
from datetime import datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    TypeVar,
    Unpack,
    overload,
)

from taskiq import (
    AsyncBroker,
    AsyncResultBackend,
    AsyncTaskiqTask,
    TaskiqMiddleware,
)
from taskiq.abc.schedule_source import ScheduleSource
from taskiq.exceptions import NoResultError, SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq.message import TaskiqMessage
from taskiq.scheduler.created_schedule import CreatedSchedule
from taskiq.utils import maybe_awaitable

from batchtask import _lifecycle, _notices, _spans
from batchtask._batcher import Batch, Batcher, RunBatch
from batchtask._bulk import kick_many
from batchtask._config import (
    BatchConfig,
    BatchSettings,
    ResultsMode,
    misspelled_setting,
)
from batchtask._context import BatchContext, merged_injections
from batchtask._errors import ItemExpiredError
from batchtask._ids import fresh_id_for
from batchtask._outcomes import Outcome, settle
from batchtask._retries import (
    DeadLetterTask,
    hand_back,
    hold_limit,
    not_before,
    settle_retries,
)
from batchtask._shaping import (
    CallPlan,
    Measured,
    current_message,
    measure,
    plan,
    sent_at,
    stamp_send_time,
)
from batchtask._signature import BatchSignature, BoundItem
from batchtask._spans import Scope
from batchtask.brokers import adapter_for, sender_of

if TYPE_CHECKING:
    from taskiq.scheduler.scheduled_task import CronSpec

    _Method = TypeVar("_Method", bound=Callable[..., Any])

    def _item_named(method: _Method) -> _Method:
        """`method` as it is (see `BatchTask.kiq`).

        mypy looks a decorated method up as an attribute, whose type its
        plugin may adjust; a plain method's signature it may not.
        """
        return method


logger = logging.getLogger("batchtask")
_taskiq_logger = logging.getLogger("taskiq")
"""Where taskiq's kicker logs each kick (at DEBUG)."""

CALL_AVERAGING = 0.2
"""The weight of the latest call in `BatchTask.call_seconds`."""

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
CallT = TypeVar("CallT")
V = TypeVar("V")
P = ParamSpec("P")
EntryP = ParamSpec("EntryP")


@dataclasses.dataclass(frozen=True, slots=True)
class StockItem:
    """A buffered item on taskiq's own path: its arguments and measurements."""

    bound: BoundItem
    measured: Measured
    message: TaskiqMessage | None
    """Its message, where taskiq's path lets it be known."""
    received: float
    """``time.time()`` on arrival."""
    note: object = None
    """What a tracer noted for its message (`batchtask._spans`)."""


async def _pre_send(broker: AsyncBroker, message: TaskiqMessage) -> TaskiqMessage:
    """`message` through `broker`'s ``pre_send`` middlewares, as taskiq's kiq does."""
    for middleware in broker.middlewares:
        if type(middleware).pre_send is not TaskiqMiddleware.pre_send:
            message = await maybe_awaitable(middleware.pre_send(message))
    return message


async def _post_send(broker: AsyncBroker, message: TaskiqMessage) -> None:
    """`broker`'s ``post_send`` middlewares for `message`, last added first."""
    for middleware in reversed(broker.middlewares):
        if type(middleware).post_send is not TaskiqMiddleware.post_send:
            await maybe_awaitable(middleware.post_send(message))


class BatchKicker(AsyncKicker[EntryP, ResultT]):
    """taskiq's kicker for one item of a batch task.

    It checks the arguments against the batch function's signature before
    anything is sent, so a missing or unknown argument fails at ``kiq`` on
    the producer, not later on the worker.
    """

    def __init__(
        self,
        task: "BatchTask[Any, ..., EntryP, ResultT, Any]",
    ) -> None:
        """Prepare a kicker for `task` with a copy of its labels."""
        super().__init__(
            task_name=task.task_name,
            broker=task.broker,
            labels=dict(task.labels),
            return_type=task.return_type,
        )
        self._signature = task.signature

    def _prepare_message(self, *args: Any, **kwargs: Any) -> TaskiqMessage:
        self._signature.check(args, kwargs)
        if self.custom_task_id is not None:
            return super()._prepare_message(*args, **kwargs)
        # taskiq's default id, without a system call per message (`_ids`).
        self.custom_task_id = fresh_id_for(self.broker)
        try:
            return super()._prepare_message(*args, **kwargs)
        finally:
            self.custom_task_id = None

    def message(self, *args: Any, **kwargs: Any) -> TaskiqMessage:
        """The message ``kiq(*args, **kwargs)`` would send, checked, not sent."""
        return self._prepare_message(*args, **kwargs)

    if not TYPE_CHECKING:
        # Typed as taskiq's kiq (its overloads); the same steps as taskiq's.

        async def kiq(self, *args: Any, **kwargs: Any) -> Any:
            """Send one item, as taskiq's ``kiq`` does.

            On a broker that handles its messages in this process (taskiq's
            ``InMemoryBroker``), the message goes to the batch-native path
            as the receiver would parse it, without its bytes
            (`batchtask.brokers.sender_of`); everything else is taskiq's:
            the message, ``pre_send``, ``post_send``, ``SendTaskError``.
            """
            broker = self.broker
            send = sender_of(broker)
            if send is None:
                return await super().kiq(*args, **kwargs)
            _taskiq_logger.debug(
                "Kicking %s with args=%s and kwargs=%s.", self.task_name, args, kwargs
            )
            message = await _pre_send(broker, self._prepare_message(*args, **kwargs))
            try:
                if not send(message):
                    await broker.kick(broker.formatter.dumps(message))
            except Exception as exc:
                raise SendTaskError from exc
            await _post_send(broker, message)
            return AsyncTaskiqTask(
                task_id=message.task_id,
                result_backend=broker.result_backend,
                return_type=self.return_type,
            )


class BatchTask(Generic[ItemT, P, EntryP, ResultT, CallT]):
    """A batch function, registered with taskiq as a task of one item.

    Its type parameters: ``ItemT`` is one item (the element type of the
    function's list), ``P`` the function's other parameters, ``EntryP`` the
    parameters of ``kiq`` (the item, then ``P``), ``ResultT`` one item's
    result and ``CallT`` what calling the function directly returns.

    - ``await task.kiq(item, *rest)`` sends one item; the worker calls the
      function once per batch of items that share equal `rest`.
    - ``await task.kiq_many(items, *rest)`` sends one message per item, in one
      pipeline where the broker allows;
    - ``task.kicker()`` gives taskiq's kicker (``with_labels``,
      ``with_task_id``, ...) for one item.
    - ``task.schedule_by_cron/interval/time(source, ..., item, *rest)``
      schedules one item.
    - ``task(items, *rest)`` calls the function directly with a list.
    """

    def __init__(
        self,
        broker: AsyncBroker,
        func: Callable[..., Any],
        config: BatchConfig,
        task_name: str | None,
        labels: dict[str, Any],
    ) -> None:
        """Register `func` with `broker`; see `batch_task`."""
        self.broker = broker
        self.original_func = func
        self.config = config
        self.signature = BatchSignature.of(func, task_name or _default_task_name(func))
        self._is_async = _is_async_callable(func)
        self.return_type = _item_return_type(func, config.results)
        self._batchers: dict[
            asyncio.AbstractEventLoop, tuple[Batcher[StockItem, Any], bool]
        ] = {}
        self._every_batcher: weakref.WeakSet[Batcher[Any, Any]] = weakref.WeakSet()
        self.call_seconds: float | None = None
        """How long a call of the function takes in this process (a moving
        average of its calls; None before the first ended): what a call
        costs, for the fleet's move rule (`batchtask._fleet.Router.route`)."""

        registered = broker.register_task(
            self._entry_point(func),
            task_name=task_name,
            **labels,
        )
        self.task_name: str = registered.task_name
        if self.signature.task_name != self.task_name:
            self.signature = dataclasses.replace(
                self.signature, task_name=self.task_name
            )
        self.labels: dict[str, Any] = registered.labels
        _lifecycle.watch(broker, self.task_name, config)
        _notices.register(broker, self.task_name, self.reconfigure)
        stamp_send_time(broker, self.task_name)
        adapter_for(broker).registered()
        functools.update_wrapper(self, func)

    def __call__(
        self, items: list[ItemT], /, *args: P.args, **kwargs: P.kwargs
    ) -> CallT:
        """Call the batch function directly with a list of items."""
        return typing.cast(CallT, self.original_func(items, *args, **kwargs))

    if TYPE_CHECKING:
        # What type checkers and editors see: the item positional-only under
        # the name "item" (Concatenate cannot name it), then the function's
        # other parameters. The runtime method below takes the arguments in
        # any form the function's signature binds, as the mypy plugin types
        # them (the item under the function's own parameter name, from
        # EntryP: batchtask_mypy._features.entry, hence the decorator).

        @_item_named
        async def kiq(
            self, item: ItemT, /, *args: P.args, **kwargs: P.kwargs
        ) -> AsyncTaskiqTask[ResultT]:
            """Send one item; the returned task resolves to that item's result."""
            ...

    else:

        async def kiq(
            self,
            *args: EntryP.args,
            **kwargs: EntryP.kwargs,
        ) -> AsyncTaskiqTask[ResultT]:
            """Send one item; the returned task resolves to that item's result."""
            return await self.kicker().kiq(*args, **kwargs)

    async def kiq_many(
        self,
        items: Iterable[ItemT],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> list[AsyncTaskiqTask[ResultT]]:
        """Send each item as its own message, like ``kiq(item, *args, **kwargs)``.

        Every item gets its own task id, middlewares (``pre_send`` /
        ``post_send``) and result, exactly as with ``kiq``; the arguments are
        checked once per item before anything is sent. The messages go out in
        one pipeline on taskiq-redis's ``ListQueueBroker`` and
        ``RedisStreamBroker``, and as concurrent kicks on any other broker.
        Returns one task per item, in order.

        :raises BatchArgumentError: if the arguments do not fit; nothing is sent.
        :raises SendTaskError: if the broker refused the messages.
        """
        broker = self.broker
        kicker = self.kicker()
        messages: list[TaskiqMessage] = []
        for item in items:
            messages.append(
                await _pre_send(broker, kicker.message(item, *args, **kwargs))
            )
        send = sender_of(broker)  # in process: without the wire, as kiq
        try:
            wired = messages if send is None else [m for m in messages if not send(m)]
            await kick_many(broker, [broker.formatter.dumps(m) for m in wired])
        except Exception as exc:
            raise SendTaskError from exc
        for message in messages:
            await _post_send(broker, message)
        # The broker's backend is generic in nothing; each item's result is
        # a ResultT, as for kiq.
        backend = typing.cast("AsyncResultBackend[ResultT]", broker.result_backend)
        return [
            AsyncTaskiqTask(
                task_id=message.task_id,
                result_backend=backend,
                return_type=self.return_type,
            )
            for message in messages
        ]

    def kicker(self) -> BatchKicker[EntryP, ResultT]:
        """Taskiq's kicker for one item (``with_labels``, ``with_task_id``, ...)."""
        return BatchKicker(self)

    async def schedule_by_cron(
        self,
        source: ScheduleSource,
        cron: "str | CronSpec",
        *args: EntryP.args,
        **kwargs: EntryP.kwargs,
    ) -> CreatedSchedule[ResultT]:
        """Schedule one item on a cron (see taskiq's ``schedule_by_cron``)."""
        return await self.kicker().schedule_by_cron(source, cron, *args, **kwargs)

    async def schedule_by_interval(
        self,
        source: ScheduleSource,
        interval: int | timedelta,
        *args: EntryP.args,
        **kwargs: EntryP.kwargs,
    ) -> CreatedSchedule[ResultT]:
        """Schedule one item at an interval (see taskiq's ``schedule_by_interval``)."""
        return await self.kicker().schedule_by_interval(
            source, interval, *args, **kwargs
        )

    async def schedule_by_time(
        self,
        source: ScheduleSource,
        time: datetime,
        *args: EntryP.args,
        **kwargs: EntryP.kwargs,
    ) -> CreatedSchedule[ResultT]:
        """Schedule one item at a time (see taskiq's ``schedule_by_time``)."""
        return await self.kicker().schedule_by_time(source, time, *args, **kwargs)

    def __repr__(self) -> str:
        """Show the task name and its batch settings."""
        config = self.config
        return (
            f"BatchTask({self.task_name}, batch_size={config.batch_size}, "
            f"batch_timeout={config.batch_timeout}, results={config.results!r})"
        )

    def _entry_point(self, func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        """The per-message function taskiq registers and its receiver calls."""
        bind = self.signature.bind
        batcher_here = self._batcher
        note_caller = _lifecycle.note_caller
        tracer_of = _spans.tracer_of
        task = self

        async def entry(*args: Any, **kwargs: Any) -> Any:
            # One message in, that item's outcome out (kept to one coroutine:
            # this runs once per item).
            bound = bind(args, kwargs)
            measured = measure(task.config, task.task_name, bound.item)
            message = current_message()
            if message is not None and not_before(message.labels) > time.time():
                await task.hold(message)
            batcher, in_place = batcher_here()
            tracer = tracer_of(task.broker)
            item = batcher.submit(
                measured.key(bound.key),
                StockItem(
                    bound,
                    measured,
                    message,
                    time.time(),
                    None if tracer is None else tracer.note(),
                ),
                weight=measured.weight,
                flush_now=in_place,
            )
            note_caller()
            try:
                return await item.future
            except asyncio.CancelledError:
                batcher.withdraw(item)
                raise

        signature = self.signature

        # What inspect.signature and taskiq's dependency graph read; functions
        # keep such attributes in their __dict__.
        entry.__dict__["__signature__"] = signature.entry_signature
        entry.__dict__[_OWNER] = self
        entry.__annotations__ = dict(signature.entry_annotations)
        entry.__module__ = func.__module__
        entry.__name__ = getattr(func, "__name__", "batch_task")
        entry.__qualname__ = getattr(func, "__qualname__", entry.__name__)
        entry.__doc__ = func.__doc__
        return entry

    async def hold(self, message: TaskiqMessage) -> None:
        """Wait until a retried item's time has come, outside every batch.

        Held for at most half the broker's redelivery window (`hold_limit`):
        an item due later, or held as the worker shuts down, is handed back
        (sent again as it is) and ends here without a result, so the message
        is acknowledged only after its copy was sent.

        :raises NoResultError: when the item was handed back.
        """
        wait = not_before(message.labels) - time.time()
        limit = hold_limit(adapter_for(self.broker))
        span = wait if limit is None else min(wait, limit)
        if await _lifecycle.hold(self.broker, span) and span >= wait:
            return
        if await hand_back(self.broker, [message]):
            raise NoResultError
        # Not handed back: it runs now, early, rather than be lost.

    def _batcher(self) -> tuple[Batcher[StockItem, Any], bool]:
        """The running loop's batcher, and whether it runs messages in place."""
        loop = asyncio.get_running_loop()
        found = self._batchers.get(loop)
        if found is None:
            for stale in [known for known in self._batchers if known.is_closed()]:
                del self._batchers[stale]
            batcher = self.new_batcher(self._run_batch)
            found = self._batchers[loop] = (batcher, self._runs_in_place())
        return found

    def new_batcher(self, run: RunBatch[V, Any]) -> Batcher[V, Any]:
        """A batcher for this task on the running loop, following `reconfigure`."""
        batcher = _lifecycle.new_batcher(
            self.broker, run, name=self.task_name, limits=self.config.limits()
        )
        self._every_batcher.add(batcher)
        return batcher

    def reconfigure(self, **changes: Unpack[BatchSettings[ItemT]]) -> None:
        """Change settings in this process, for batches opened from now on.

        Takes the decorator's settings (not ``results``), checked the same
        way; ``None`` turns an optional one off. A lowered ``batch_size`` or
        ``max_weight`` flushes an open batch that has reached it at once,
        and call limits apply at once; ``batch_timeout``, ``debounce`` and
        ``adaptive`` apply to batches opened afterwards. Call it on the
        worker's event loop (a task of the worker, or a handler added with
        ``loop.add_signal_handler``); from another thread it is handed to
        each loop that batches this task.

        :raises BatchConfigError: on a bad setting; nothing changes then.
        """
        config = self.config.changed(self.task_name, changes)
        self.config = config
        limits = config.limits()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for batcher in list(self._every_batcher):
            loop = batcher.loop
            if loop.is_closed():
                continue
            if loop is running:
                batcher.configure(limits)
            else:
                loop.call_soon_threadsafe(batcher.configure, limits)

    async def reconfigure_fleet(self, **changes: Unpack[BatchSettings[ItemT]]) -> int:
        """`reconfigure` here and in every worker process of the broker.

        Checked here first (a bad change raises and is sent nowhere), applied
        here, then sent on the broker's notice channel: each worker process
        applies it on arrival, within about a second (the Redis stream
        brokers, RabbitMQ and NATS; ``python -m batchtask reconfigure`` sends
        the same from a shell). Only plain values travel (numbers, booleans,
        strings, None).

        :returns: how many worker processes were listening (on RabbitMQ and
            NATS: how many answered within half a second, after which it
            returns).
        :raises BatchConfigError: on a bad setting; nothing changes then.
        :raises TypeError: for a function (``weight=``, ``group_by=``, ...).
        :raises RuntimeError: if the broker has no notice channel.
        """
        notice = _notices.encode(self.task_name, changes)
        self.config.changed(self.task_name, changes)
        listening = await _notices.publish(self.broker, notice)
        self.reconfigure(**changes)
        return listening

    def _runs_in_place(self) -> bool:
        return adapter_for(self.broker).runs_in_place()

    async def outcomes(
        self, items: list[Any], leader: BoundItem, scope: Scope | None = None
    ) -> list[Outcome]:
        """Call the function for `items` (bisecting if set): one outcome each.

        The call's extra and injected arguments are `leader`'s; each call
        runs inside `scope` where given (a tracer's).
        """

        async def call(chunk: list[Any]) -> Any:
            started = time.perf_counter()
            try:
                return await self._call(chunk, leader)
            finally:
                took = time.perf_counter() - started
                known = self.call_seconds
                self.call_seconds = (
                    took if known is None else known + CALL_AVERAGING * (took - known)
                )

        return await settle(
            items,
            call,
            task_name=self.task_name,
            results=self.config.results,
            bisect=self.config.bisect_on_error,
            scope=scope,
            call_timeout=self.config.call_timeout,
            sync=not self._is_async,
        )

    async def _run_batch(self, batch: Batch[StockItem, Any]) -> None:
        live = [entry for entry in batch.entries if not entry.future.done()]
        if not live:
            return
        call = plan(
            self.config,
            self.task_name,
            [entry.value.measured for entry in live],
            lambda: [
                sent_at(
                    None if e.value.message is None else e.value.message.labels,
                    e.value.received,
                )
                for e in live
            ],
        )
        passed = [live[index].value.bound for index in call.passed]
        outcomes: list[Outcome] = []
        if passed:
            leader = passed[0]
            if leader.injected:
                # A Context or BatchContext stands for the whole call.
                leader = leader._replace(
                    injected=merged_injections([bound.injected for bound in passed])
                )
            scope = _spans.scope(
                _spans.tracer_of(self.broker),
                self.task_name,
                batch,
                leader,
                [live[index].value.note for index in call.passed],
                live[0].value.measured.shown_group,
            )
            outcomes = await self.outcomes(
                [bound.item for bound in passed], leader, scope
            )
            context = next(
                (v for v in leader.injected.values() if isinstance(v, BatchContext)),
                None,
            )
            if context is not None:
                outcomes = [
                    Outcome(override) if (override := context.override(i)) else outcome
                    for i, outcome in enumerate(outcomes)
                ]
            outcomes = await settle_retries(
                self.config,
                self.task_name,
                self.broker,
                [live[index].value.message for index in call.passed],
                outcomes,
                _lifecycle.observer_of(self.broker),
            )
        outcomes = call.spread(len(live), outcomes)
        report(self, call, outcomes, live[0].value.measured.shown_group)
        for entry, outcome in zip(live, outcomes, strict=True):
            if entry.future.done():
                continue
            if outcome.error is None:
                entry.future.set_result(outcome.value)
            else:
                entry.future.set_exception(outcome.error)

    async def _call(self, items: list[Any], bound: BoundItem) -> Any:
        func = self.original_func
        kwargs = {**bound.kwargs, **bound.injected}
        if self._is_async:
            returned = func(items, *bound.args, **kwargs)
        else:
            returned = await asyncio.to_thread(func, items, *bound.args, **kwargs)
        if inspect.isawaitable(returned):
            returned = await returned
        return returned


class _BatchDecorator(Generic[ResultT]):
    """What ``batch_task(broker, ...)`` returns: apply it to the batch function."""

    def __init__(
        self,
        broker: AsyncBroker,
        config: BatchConfig,
        task_name: str | None,
        labels: dict[str, Any],
    ) -> None:
        self._broker = broker
        self._config = config
        self._task_name = task_name
        self._labels = labels

    def _make(self, func: Callable[..., Any]) -> Any:
        return BatchTask[Any, ..., ..., Any, Any](
            self._broker, func, self._config, self._task_name, self._labels
        )


class _SharedDecorator(_BatchDecorator[Any]):
    @overload
    def __call__(
        self,
        func: Callable[Concatenate[list[ItemT], P], Coroutine[Any, Any, ResultT]],
    ) -> BatchTask[
        ItemT, P, Concatenate[ItemT, P], ResultT, Coroutine[Any, Any, ResultT]
    ]: ...

    @overload
    def __call__(
        self,
        func: Callable[Concatenate[list[ItemT], P], ResultT],
    ) -> BatchTask[ItemT, P, Concatenate[ItemT, P], ResultT, ResultT]: ...

    def __call__(self, func: Callable[..., Any]) -> Any:
        return self._make(func)


class _PerItemDecorator(_BatchDecorator[Any]):
    @overload
    def __call__(
        self,
        func: Callable[
            Concatenate[list[ItemT], P], Coroutine[Any, Any, Sequence[ResultT]]
        ],
    ) -> BatchTask[
        ItemT,
        P,
        Concatenate[ItemT, P],
        ResultT,
        Coroutine[Any, Any, Sequence[ResultT]],
    ]: ...

    @overload
    def __call__(
        self,
        func: Callable[Concatenate[list[ItemT], P], Sequence[ResultT]],
    ) -> BatchTask[ItemT, P, Concatenate[ItemT, P], ResultT, Sequence[ResultT]]: ...

    def __call__(self, func: Callable[..., Any]) -> Any:
        return self._make(func)


@overload
def batch_task(
    broker: AsyncBroker,
    *,
    batch_size: int,
    batch_timeout: float,
    results: Literal["shared"] = "shared",
    bisect_on_error: bool = False,
    max_weight: float | None = None,
    weight: Callable[[Any], float] | None = None,
    max_concurrent_calls: int | None = None,
    max_concurrent_calls_per_key: int | None = None,
    debounce: float | None = None,
    max_item_age: float | None = None,
    dedup_key: Callable[[Any], Hashable] | None = None,
    adaptive: bool = False,
    max_attempts: int | None = None,
    retry_delay: float = 0.0,
    call_timeout: float | None = None,
    group_by: Callable[[Any], Hashable] | None = None,
    dead_letter: DeadLetterTask | None = None,
    task_name: str | None = None,
    **labels: Any,
) -> _SharedDecorator: ...


@overload
def batch_task(
    broker: AsyncBroker,
    *,
    batch_size: int,
    batch_timeout: float,
    results: Literal["per_item"],
    bisect_on_error: bool = False,
    max_weight: float | None = None,
    weight: Callable[[Any], float] | None = None,
    max_concurrent_calls: int | None = None,
    max_concurrent_calls_per_key: int | None = None,
    debounce: float | None = None,
    max_item_age: float | None = None,
    dedup_key: Callable[[Any], Hashable] | None = None,
    adaptive: bool = False,
    max_attempts: int | None = None,
    retry_delay: float = 0.0,
    call_timeout: float | None = None,
    group_by: Callable[[Any], Hashable] | None = None,
    dead_letter: DeadLetterTask | None = None,
    task_name: str | None = None,
    **labels: Any,
) -> _PerItemDecorator: ...


def batch_task(
    broker: AsyncBroker,
    *,
    batch_size: int,
    batch_timeout: float,
    results: ResultsMode = "shared",
    bisect_on_error: bool = False,
    max_weight: float | None = None,
    weight: Callable[[Any], float] | None = None,
    max_concurrent_calls: int | None = None,
    max_concurrent_calls_per_key: int | None = None,
    debounce: float | None = None,
    max_item_age: float | None = None,
    dedup_key: Callable[[Any], Hashable] | None = None,
    adaptive: bool = False,
    max_attempts: int | None = None,
    retry_delay: float = 0.0,
    call_timeout: float | None = None,
    group_by: Callable[[Any], Hashable] | None = None,
    dead_letter: DeadLetterTask | None = None,
    task_name: str | None = None,
    **labels: Any,
) -> _SharedDecorator | _PerItemDecorator:
    """Turn a function of a list of items into a taskiq task of one item.

    ``@batch_task(broker, batch_size=100, batch_timeout=2.0)`` over
    ``async def save(rows: list[Row], table: str) -> int`` gives a task whose
    ``await save.kiq(row, "events")`` sends one row; the worker calls ``save``
    once per group of up to `batch_size` rows with equal extra arguments, at
    the latest `batch_timeout` seconds after the group's first row.

    :param broker: the taskiq broker to register with.
    :param batch_size: most items one call receives (int >= 1).
    :param batch_timeout: seconds after a batch's first item at which it is
        called however full it is (finite, > 0).
    :param results: ``"shared"``: every item's result is the call's return
        value; ``"per_item"``: the call returns one result per item, in order.
    :param bisect_on_error: when a call raises, call each half again until the
        failing items are isolated (the function must be safe to repeat).
    :param max_weight: the most the `weight` of one call's items may add up
        to; a batch is called when the next item would exceed it (which then
        opens the next batch), and an item heavier than this runs alone.
    :param weight: one validated item's weight (a finite number >= 0, e.g.
        its tokens or bytes); an item whose weight fails fails alone.
    :param max_concurrent_calls: most calls of this task running at once in
        one worker process; waiting batches take turns by group key.
    :param max_concurrent_calls_per_key: the same for the calls of one group
        key (other keys run meanwhile).
    :param debounce: also call a batch once no item joined it for this many
        seconds (below `batch_timeout`, which stays the hard bound).
    :param max_item_age: an item sent more than this many seconds before its
        batch is called fails with `ItemExpiredError` instead of being passed
        (its message is acknowledged as done).
    :param dedup_key: items of one call with equal keys are passed once (the
        latest of them); each duplicate gets that item's outcome.
    :param adaptive: call a batch early when its key's measured arrival rate
        says waiting will not fill it (never later than `batch_timeout`).
    :param max_attempts: the most calls one item is passed to: a failed item
        (any error but a validation error) is sent again, after
        `retry_delay`, until its `max_attempts`-th call fails too; then its
        failure is final (None: every failure is final, and an explicit
        `Retry` gets up to 10 attempts in all).
    :param retry_delay: seconds a retried item waits before it joins a batch
        again (a `Retry`'s own ``delay`` wins; finite, >= 0).
    :param call_timeout: seconds one call may run; a longer one is cancelled
        (a sync function's thread is abandoned) and its items fail with
        `CallTimeoutError`.
    :param group_by: a key of one validated item: items with different keys
        never share a call, whatever their extra arguments.
    :param dead_letter: a taskiq task of one `DeadLetter`, sent each item
        whose failure is final (after its attempts).
    :param task_name: taskiq task name; defaults to ``module:function``.
    :param labels: taskiq labels, as for ``broker.task(...)``; a name within
        two letters of a setting's is refused (a typo would lose the setting).
    :raises BatchConfigError: on a bad setting or a function that cannot batch.
    """
    misspelled_setting(task_name, labels)
    config = BatchConfig.checked(
        task=task_name,
        batch_size=batch_size,
        batch_timeout=batch_timeout,
        results=results,
        bisect_on_error=bisect_on_error,
        max_weight=max_weight,
        weight=weight,
        max_concurrent_calls=max_concurrent_calls,
        max_concurrent_calls_per_key=max_concurrent_calls_per_key,
        debounce=debounce,
        max_item_age=max_item_age,
        dedup_key=dedup_key,
        adaptive=adaptive,
        max_attempts=max_attempts,
        retry_delay=retry_delay,
        call_timeout=call_timeout,
        group_by=group_by,
        dead_letter=dead_letter,
    )
    if config.results == "per_item":
        return _PerItemDecorator(broker, config, task_name, labels)
    return _SharedDecorator(broker, config, task_name, labels)


_OWNER = "batchtask_task"
"""The entry point's attribute that names its `BatchTask`."""


def batch_task_of(
    func: Callable[..., Any],
) -> "BatchTask[Any, ..., ..., Any, Any] | None":
    """The batch task whose entry point `func` is, or None."""
    owner = getattr(func, _OWNER, None)
    if isinstance(owner, BatchTask):
        return typing.cast("BatchTask[Any, ..., ..., Any, Any]", owner)
    return None


def report(
    task: BatchTask[Any, ..., ..., Any, Any],
    call: CallPlan,
    outcomes: list[Outcome],
    group: str | None = None,
) -> None:
    """Tell the broker's metrics about a finished call (of ``group_by`` key `group`)."""
    observer = _lifecycle.observer_of(task.broker)
    if observer is None:
        return
    failed = sum(
        outcome.error is not None
        and not isinstance(outcome.error, (ItemExpiredError, NoResultError))
        for outcome in outcomes
    )
    if group is not None and call.passed:
        observer.called_group(task.task_name, group)
    if failed:
        observer.failed(task.task_name, failed)
    if call.expired:
        observer.expired(task.task_name, len(call.expired))
    if call.copies:
        observer.deduplicated(task.task_name, len(call.copies))


def _default_task_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}:{getattr(func, '__name__', 'batch_task')}"


def _is_async_callable(func: Callable[..., Any]) -> bool:
    call = type(func).__call__ if not inspect.isroutine(func) else None
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)


def _item_return_type(func: Callable[..., Any], results: ResultsMode) -> Any:
    """The type one item's result has, for taskiq to parse stored results."""
    try:
        returned = typing.get_type_hints(func).get("return")
    except (NameError, TypeError):
        return None
    if returned is None or results == "shared":
        return returned
    if typing.get_origin(returned) in (list, Sequence, tuple):
        element = typing.get_args(returned)
        if len(element) == 1 or (len(element) == 2 and element[1] is Ellipsis):
            return element[0]
    return None
