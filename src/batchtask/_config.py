"""The settings of one batch task, checked by the decorator and by `reconfigure`."""

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, fields
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    TypeAlias,
    TypedDict,
    TypeVar,
    get_args,
)

from batchtask._batcher import Limits
from batchtask._errors import BatchConfigError

if TYPE_CHECKING:
    # For an annotation only: _retries stays free to import this module.
    from batchtask._retries import DeadLetterTask

ResultsMode: TypeAlias = Literal["shared", "per_item"]
RESULTS_MODES: tuple[str, ...] = get_args(ResultsMode)

ItemT = TypeVar("ItemT")


class BatchSettings(TypedDict, Generic[ItemT], total=False):
    """What `BatchTask.reconfigure` may change (``None`` turns a setting off)."""

    batch_size: int
    batch_timeout: float
    bisect_on_error: bool
    max_weight: float | None
    weight: Callable[[ItemT], float] | None
    max_concurrent_calls: int | None
    max_concurrent_calls_per_key: int | None
    debounce: float | None
    max_item_age: float | None
    dedup_key: Callable[[ItemT], Hashable] | None
    adaptive: bool
    max_attempts: int | None
    retry_delay: float
    call_timeout: float | None
    group_by: Callable[[ItemT], Hashable] | None
    dead_letter: "DeadLetterTask | None"


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How a task's items are grouped into calls and how results come back.

    - `batch_size`: most items one call receives (an int >= 1).
    - `batch_timeout`: seconds after a batch's first item at which the batch
      is called however full it is (finite, > 0). It bounds every item's wait
      for its batch (waiting for a call slot comes on top, see
      `max_concurrent_calls`).
    - `results`: `"shared"` stores the call's return value for every item;
      `"per_item"` gives item i element i of the returned sequence.
    - `bisect_on_error`: when a call raises, split the batch in halves and
      call again until the failing items are isolated.
    - `max_weight` with `weight`: the weights of one call's items add up to
      at most `max_weight` (an item heavier than that runs alone).
    - `max_concurrent_calls` / `max_concurrent_calls_per_key`: most calls of
      the task (of one group key) running at once in one worker process.
    - `debounce`: a batch is also called once no item joined it for this
      many seconds (below `batch_timeout`, which stays the hard bound).
    - `max_item_age`: an item sent longer ago than this when its batch is
      called fails with `ItemExpiredError` instead of being passed.
    - `dedup_key`: items of one call with equal keys are passed once.
    - `adaptive`: call a batch early when its arrivals say it will not fill.
    - `max_attempts`: calls an item is passed to at most; a failed item is
      sent again until then (None: a failure is final, as without retries).
    - `retry_delay`: seconds a retried item waits before it joins a batch
      again (a `Retry`'s own delay wins).
    - `call_timeout`: seconds a call may run before its items fail with
      `CallTimeoutError`.
    - `group_by`: items with different ``group_by(item)`` never share a call.
    - `dead_letter`: a taskiq task of one `DeadLetter`, sent each item whose
      failure is final.
    """

    batch_size: int
    batch_timeout: float
    results: ResultsMode = "shared"
    bisect_on_error: bool = False
    max_weight: float | None = None
    weight: Callable[[Any], float] | None = None
    max_concurrent_calls: int | None = None
    max_concurrent_calls_per_key: int | None = None
    debounce: float | None = None
    max_item_age: float | None = None
    dedup_key: Callable[[Any], Hashable] | None = None
    adaptive: bool = False
    max_attempts: int | None = None
    retry_delay: float = 0.0
    call_timeout: float | None = None
    group_by: Callable[[Any], Hashable] | None = None
    dead_letter: Any = None

    @classmethod
    def checked(cls, *, task: str | None, **settings: object) -> "BatchConfig":
        """Build the config, raising `BatchConfigError` naming any bad field."""
        unknown = [name for name in settings if name not in SETTINGS]
        if unknown:
            raise _bad(
                task,
                unknown[0],
                settings[unknown[0]],
                "is not a batch setting",
                f"use one of {', '.join(SETTINGS)}",
            )
        checked: dict[str, Any] = {}
        for name, value in settings.items():
            checked[name] = _CHECKS[name](task, name, value)
        if checked.get("max_weight") is not None and checked.get("weight") is None:
            raise _bad(
                task,
                "max_weight",
                settings["max_weight"],
                "needs weight=, the function that gives one item's weight",
                "pass e.g. weight=lambda doc: doc.tokens",
            )
        debounce = checked.get("debounce")
        if debounce is not None and debounce >= checked["batch_timeout"]:
            raise _bad(
                task,
                "debounce",
                settings["debounce"],
                f"must be below batch_timeout={settings['batch_timeout']!r}, "
                "which stays the hard bound on an item's wait",
                "pass a shorter debounce or a longer batch_timeout",
            )
        return cls(**checked)

    def changed(self, task: str, changes: Mapping[str, object]) -> "BatchConfig":
        """A copy with `changes` applied, checked like the decorator's settings."""
        if "results" in changes:
            raise _bad(
                task,
                "results",
                changes["results"],
                "cannot change after the decorator ran (it decides the "
                "type of each item's result)",
                "declare another task for the other results mode",
            )
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return BatchConfig.checked(task=task, **{**current, **changes})

    def limits(self) -> Limits:
        """What the batcher needs of these settings."""
        return Limits(
            batch_size=self.batch_size,
            batch_timeout=self.batch_timeout,
            max_weight=self.max_weight,
            debounce=self.debounce,
            adaptive=self.adaptive,
            max_calls=self.max_concurrent_calls,
            max_calls_per_key=self.max_concurrent_calls_per_key,
        )


def misspelled_setting(task: str | None, labels: Mapping[str, object]) -> None:
    """Raise for a label name that is a misspelled setting (``batch_timout``).

    A keyword `batch_task` does not know becomes a taskiq label, so a typo
    would silently turn a setting off; a name within two edits of a setting
    (case aside) is taken for one.
    """
    for label in labels:
        lowered = label.lower()
        for setting in (*SETTINGS, "task_name"):
            if label != setting and _edits(lowered, setting) <= _TYPO_EDITS:
                raise _bad(
                    task,
                    label,
                    labels[label],
                    f"is not a batch setting; did you mean {setting!r}?",
                    f"spell it {setting}= (a taskiq label this close to a "
                    "setting's name is refused)",
                )


_TYPO_EDITS = 2


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (names are short)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            )
        previous = current
    return previous[-1]


def _positive(value: object) -> float | None:
    """`value` as a float if it is a finite number > 0 (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _count(value: object) -> int | None:
    """`value` if it is an int >= 1 (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


Check = Callable[[str | None, str, object], Any]


def _count_check(problem: str, example: str, *, optional: bool) -> Check:
    def check(task: str | None, name: str, value: object) -> int | None:
        if value is None and optional:
            return None
        count = _count(value)
        if count is None:
            raise _bad(task, name, value, f"must be an int >= 1 ({problem})", example)
        return count

    return check


def _number_check(
    problem: str, example: str, *, optional: bool, unit: str = " of seconds"
) -> Check:
    def check(task: str | None, name: str, value: object) -> float | None:
        if value is None and optional:
            return None
        seconds = _positive(value)
        if seconds is None:
            raise _bad(
                task,
                name,
                value,
                f"must be a finite number{unit} > 0; {problem}",
                example,
            )
        return seconds

    return check


def _function_check(problem: str, example: str) -> Check:
    def check(task: str | None, name: str, value: object) -> object:
        if value is not None and not callable(value):
            raise _bad(
                task, name, value, f"must be a function of one item {problem}", example
            )
        return value

    return check


def _delay_check(task: str | None, name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _bad(
            task,
            name,
            value,
            "must be a finite number of seconds >= 0; a retried item waits "
            "this long before it joins a batch again",
            "pass e.g. retry_delay=30.0, or 0 to retry in the next batch",
        )
    return float(value)


def _task_check(task: str | None, name: str, value: object) -> object:
    if value is not None and not callable(getattr(value, "kiq", None)):
        raise _bad(
            task,
            name,
            value,
            "must be a taskiq task (anything with .kiq) that takes one "
            "batchtask.DeadLetter",
            "declare e.g. @broker.task async def dead(letter: DeadLetter) -> None "
            "and pass dead_letter=dead",
        )
    return value


def _flag_check(example: str) -> Check:
    def check(task: str | None, name: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise _bad(task, name, value, "must be True or False", example)
        return value

    return check


def _check_results(task: str | None, name: str, value: object) -> ResultsMode:
    if value == "shared":
        return "shared"
    if value == "per_item":
        return "per_item"
    raise _bad(
        task,
        name,
        value,
        f"must be one of {', '.join(map(repr, RESULTS_MODES))}",
        "pass results='shared' to store the call's return value for "
        "every item, or results='per_item' to give item i element i "
        "of the returned list",
    )


_CHECKS: dict[str, Check] = {
    "batch_size": _count_check(
        "the most items one call receives", "pass e.g. batch_size=100", optional=False
    ),
    "batch_timeout": _number_check(
        "it bounds how long an item may wait for its batch to fill",
        "pass e.g. batch_timeout=2.0",
        optional=False,
    ),
    "results": _check_results,
    "bisect_on_error": _flag_check(
        "pass bisect_on_error=True to isolate failing items"
    ),
    "max_weight": _number_check(
        "the most the weights of one call's items may add up to",
        "pass e.g. max_weight=8000 with weight=lambda doc: doc.tokens",
        optional=True,
        unit="",
    ),
    "weight": _function_check(
        "returning its weight (a finite number >= 0)",
        "pass e.g. weight=lambda doc: doc.tokens",
    ),
    "max_concurrent_calls": _count_check(
        "the most calls of this task running at once in a worker process",
        "pass e.g. max_concurrent_calls=2, or None for no limit",
        optional=True,
    ),
    "max_concurrent_calls_per_key": _count_check(
        "the most calls of one group key running at once in a worker process",
        "pass e.g. max_concurrent_calls_per_key=1, or None for no limit",
        optional=True,
    ),
    "debounce": _number_check(
        "seconds without a new item after which a batch is called",
        "pass e.g. debounce=0.2",
        optional=True,
    ),
    "max_item_age": _number_check(
        "seconds after sending after which an item is not passed any more",
        "pass e.g. max_item_age=3600",
        optional=True,
    ),
    "dedup_key": _function_check(
        "returning a hashable key",
        "pass e.g. dedup_key=lambda doc: doc.id",
    ),
    "adaptive": _flag_check(
        "pass adaptive=True to call batches early when they will not fill"
    ),
    "max_attempts": _count_check(
        "the most calls one item is passed to before its failure is final",
        "pass e.g. max_attempts=5, or None for no retries",
        optional=True,
    ),
    "retry_delay": _delay_check,
    "call_timeout": _number_check(
        "a call running longer is cancelled and its items fail",
        "pass e.g. call_timeout=30.0, or None for no limit",
        optional=True,
    ),
    "group_by": _function_check(
        "returning a hashable key: items with different keys never share a call",
        "pass e.g. group_by=lambda row: row.tenant",
    ),
    "dead_letter": _task_check,
}
SETTINGS: tuple[str, ...] = tuple(_CHECKS)
"""Every setting's name, in the decorator's order."""


def _bad(
    task: str | None, field: str, value: object, problem: str, fix: str
) -> BatchConfigError:
    where = f"batch task {task!r}" if task else "batch_task()"
    return BatchConfigError(
        message=f"{where}: {field}={value!r} {problem}. Fix: {fix}.",
    )
