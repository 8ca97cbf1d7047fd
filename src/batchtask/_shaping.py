"""Per-item settings around a call: weight, dedup key, group and age; who gets called.

On arrival (`measure`) an item's ``weight``, ``dedup_key`` and ``group_by``
are computed,
so a function that raises fails that item alone, before it joins a batch.
When the batch is called (`plan`), items older than ``max_item_age`` end
with `ItemExpiredError` and items with equal dedup keys are passed once;
`CallPlan.spread` gives every item of the batch the outcome it gets.
"""

import contextvars
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware

from batchtask._config import BatchConfig
from batchtask._errors import ItemExpiredError, ItemValidationError
from batchtask._outcomes import Outcome

SENT_AT: Final = "batchtask_sent_at"
"""The label in which ``kiq`` stamps the send time (Unix seconds)."""


class _NoKey:
    """The dedup key of an item measured without ``dedup_key``."""

    __slots__ = ()


NO_KEY: Final = _NoKey()
"""An item with this key is equal to no other (it was measured while the
task had no ``dedup_key``; `reconfigure` may have set one since)."""


@dataclass(frozen=True, slots=True)
class Measured:
    """What the task's settings measured of one item on arrival."""

    weight: float = 0.0
    dedup: Hashable = NO_KEY
    """Its dedup key, or `NO_KEY`."""
    group: Hashable = NO_KEY
    """Its ``group_by`` key, or `NO_KEY` (the task has none)."""

    def key(self, extra: Hashable) -> Hashable:
        """Its batch's key: `extra` (the extra arguments' key) and its group."""
        return extra if self.group is NO_KEY else (extra, self.group)

    @property
    def shown_group(self) -> str | None:
        """Its ``group_by`` key as metrics and traces show it (None: no key)."""
        if self.group is NO_KEY:
            return None
        shown = repr(self.group)
        return (
            shown if len(shown) <= GROUP_LENGTH else shown[: GROUP_LENGTH - 3] + "..."
        )


GROUP_LENGTH: Final = 64
"""The longest ``group_by`` key metrics and traces show."""

PLAIN: Final = Measured()
"""The measure of every item of a task without ``weight`` or ``dedup_key``."""


def measure(config: BatchConfig, task_name: str, item: Any) -> Measured:
    """Weigh and key one validated item.

    :raises ItemValidationError: if ``weight``, ``dedup_key`` or ``group_by`` raised or
        returned something unusable (only this item fails).
    """
    if config.weight is None and config.dedup_key is None and config.group_by is None:
        return PLAIN
    weight = 0.0
    if config.weight is not None:
        weight = _weigh(config, task_name, item)
    dedup: Hashable = NO_KEY
    if config.dedup_key is not None:
        dedup = _key(task_name, item, config.dedup_key, "dedup_key")
    group: Hashable = NO_KEY
    if config.group_by is not None:
        group = _key(task_name, item, config.group_by, "group_by")
    return Measured(weight, dedup, group)


def sent_at(labels: Mapping[str, Any] | None, received: float) -> float:
    """The send time a message's labels carry, else `received` (its arrival)."""
    if labels is not None:
        stamp = labels.get(SENT_AT)
        if stamp is not None:
            try:
                value = float(stamp)
            except (TypeError, ValueError):
                value = math.nan
            if math.isfinite(value):
                return value
    return received


def _weigh(config: BatchConfig, task_name: str, item: Any) -> float:
    weigh = config.weight
    assert weigh is not None
    try:
        weight = cast("object", weigh(item))
    except Exception as exc:
        raise ItemValidationError(
            message=f"batch task {task_name!r}: weight={_name(weigh)} raised "
            f"{exc!r} for this item; the item fails alone. Fix: make the "
            "weight function accept every item, or validate items earlier",
        ) from exc
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ItemValidationError(
            message=f"batch task {task_name!r}: weight={_name(weigh)} returned "
            f"{weight!r} for this item, not a finite number >= 0; the item "
            "fails alone. Fix: return the item's weight, e.g. its token count",
        )
    return float(weight)


def _key(
    task_name: str,
    item: Any,
    key_of: Callable[[Any], Hashable],
    setting: str,
) -> Hashable:
    try:
        key = key_of(item)
        hash(key)
    except Exception as exc:
        raise ItemValidationError(
            message=f"batch task {task_name!r}: {setting}={_name(key_of)} "
            f"failed for this item ({exc!r}); the item fails alone. Fix: "
            "return a hashable key (a str, an int, a tuple of them) for every item",
        ) from exc
    return key


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


@dataclass(frozen=True, slots=True)
class CallPlan:
    """Which of a batch's items the function gets, and what the others get."""

    passed: list[int]
    """Indexes (in the batch) of the items passed, in call order."""
    expired: dict[int, ItemExpiredError]
    """Items too old to pass, with their error."""
    copies: dict[int, int]
    """A duplicate's index -> the index of the item passed in its place."""

    @property
    def trivial(self) -> bool:
        """Whether every item is passed as it is."""
        return not self.expired and not self.copies

    def spread(self, size: int, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """Every item's outcome, from the outcomes of the passed items."""
        if self.trivial:
            return list(outcomes)
        found: list[Outcome | None] = [None] * size
        for index, outcome in zip(self.passed, outcomes, strict=True):
            found[index] = outcome
        for index, error in self.expired.items():
            found[index] = Outcome(error)
        for index, original in self.copies.items():
            found[index] = found[original]
        return [outcome for outcome in found if outcome is not None]

    def groups(self) -> list[list[int]]:
        """Per passed item, its index and its duplicates' (for acks)."""
        group = {index: [index] for index in self.passed}
        for index, original in self.copies.items():
            group[original].append(index)
        return [group[index] for index in self.passed]


def plan(
    config: BatchConfig,
    task_name: str,
    measured: Sequence[Measured],
    sent_times: Callable[[], Sequence[float]],
) -> CallPlan:
    """Decide which items a call gets: not too old, one per dedup key.

    `sent_times` gives each item's send time (see `sent_at`); it is called
    only when the task has a ``max_item_age``.
    """
    expired: dict[int, ItemExpiredError] = {}
    max_age = config.max_item_age
    if max_age is not None:
        now = time.time()
        for index, sent in enumerate(sent_times()):
            age = now - sent
            if age > max_age:
                expired[index] = ItemExpiredError(
                    message=f"batch task {task_name!r}: this item was sent "
                    f"{age:.0f}s before its batch was called, more than "
                    f"max_item_age={max_age:g}; it was not passed to the function",
                )
    if config.dedup_key is None:
        passed = [index for index in range(len(measured)) if index not in expired]
        return CallPlan(passed, expired, {})
    latest: dict[Hashable, int] = {}
    keyless: list[int] = []
    for index, seen in enumerate(measured):
        if index in expired:
            continue
        if seen.dedup is NO_KEY:
            keyless.append(index)
        else:
            latest[seen.dedup] = index
    copies = {
        index: latest[seen.dedup]
        for index, seen in enumerate(measured)
        if index not in expired
        and seen.dedup is not NO_KEY
        and latest[seen.dedup] != index
    }
    return CallPlan(sorted([*keyless, *latest.values()]), expired, copies)


_message: contextvars.ContextVar[TaskiqMessage | None] = contextvars.ContextVar(
    "batchtask_message", default=None
)


def current_message() -> TaskiqMessage | None:
    """On taskiq's own path: the batch task message being run."""
    return _message.get()


class SendTimeMiddleware(TaskiqMiddleware):
    """Stamps a batch task's messages with their send time, and reads it back.

    `batch_task` adds one to its broker. ``pre_send`` runs for ``kiq``,
    ``kiq_many`` and taskiq's scheduler as each message is sent (not when a
    schedule is made), so the stamp is the time of sending. On taskiq's own
    path ``pre_execute`` runs in the asyncio task that then runs the entry
    point, so the labels it notes are the ones the entry point reads (the
    batch-native path reads each message's labels itself).
    """

    def __init__(self) -> None:
        """Serve no task yet (`stamp_send_time` adds task names)."""
        super().__init__()
        self.task_names: set[str] = set()

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Stamp `message` if it is a batch task's and has no stamp yet."""
        if message.task_name in self.task_names and SENT_AT not in message.labels:
            # A string: some brokers carry labels as headers (NATS).
            message.labels[SENT_AT] = f"{time.time():.3f}"
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Note a batch task message for its entry point."""
        if message.task_name in self.task_names:
            _message.set(message)
        return message


def stamp_send_time(broker: AsyncBroker, task_name: str) -> None:
    """Have `broker` stamp the messages of `task_name` as they are sent."""
    for middleware in broker.middlewares:
        if isinstance(middleware, SendTimeMiddleware):
            middleware.task_names.add(task_name)
            return
    stamping = SendTimeMiddleware()
    stamping.task_names.add(task_name)
    broker.add_middlewares(stamping)
