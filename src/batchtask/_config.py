"""The settings of one batch task, checked once when the decorator runs."""

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

from batchtask._errors import BatchConfigError

ResultsMode: TypeAlias = Literal["shared", "per_item"]
RESULTS_MODES: tuple[str, ...] = get_args(ResultsMode)


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How a task's items are grouped into calls and how results come back.

    - `batch_size`: most items one call receives (an int >= 1).
    - `batch_timeout`: seconds after a batch's first item at which the batch
      is called however full it is (finite, > 0). It bounds every item's wait.
    - `results`: `"shared"` stores the call's return value for every item;
      `"per_item"` gives item i element i of the returned sequence.
    - `bisect_on_error`: when a call raises, split the batch in halves and
      call again until the failing items are isolated.
    """

    batch_size: int
    batch_timeout: float
    results: ResultsMode = "shared"
    bisect_on_error: bool = False

    @classmethod
    def checked(
        cls,
        *,
        task: str | None,
        batch_size: object,
        batch_timeout: object,
        results: object,
        bisect_on_error: object,
    ) -> "BatchConfig":
        """Build the config, raising `BatchConfigError` naming any bad field."""
        if (
            not isinstance(batch_size, int)
            or isinstance(batch_size, bool)
            or batch_size < 1
        ):
            raise _bad(
                task,
                "batch_size",
                batch_size,
                "must be an int >= 1 (the most items one call receives)",
                "pass e.g. batch_size=100",
            )
        if (
            not isinstance(batch_timeout, (int, float))
            or isinstance(batch_timeout, bool)
            or not math.isfinite(batch_timeout)
            or batch_timeout <= 0
        ):
            raise _bad(
                task,
                "batch_timeout",
                batch_timeout,
                "must be a finite number of seconds > 0; it bounds how long "
                "an item may wait for its batch to fill",
                "pass e.g. batch_timeout=2.0",
            )
        if results == "shared":
            mode: ResultsMode = "shared"
        elif results == "per_item":
            mode = "per_item"
        else:
            raise _bad(
                task,
                "results",
                results,
                f"must be one of {', '.join(map(repr, RESULTS_MODES))}",
                "pass results='shared' to store the call's return value for "
                "every item, or results='per_item' to give item i element i "
                "of the returned list",
            )
        if not isinstance(bisect_on_error, bool):
            raise _bad(
                task,
                "bisect_on_error",
                bisect_on_error,
                "must be True or False",
                "pass bisect_on_error=True to isolate failing items",
            )
        return cls(
            batch_size=batch_size,
            batch_timeout=float(batch_timeout),
            results=mode,
            bisect_on_error=bisect_on_error,
        )


def _bad(
    task: str | None, field: str, value: object, problem: str, fix: str
) -> BatchConfigError:
    where = f"batch task {task!r}" if task else "batch_task()"
    return BatchConfigError(
        message=f"{where}: {field}={value!r} {problem}. Fix: {fix}.",
    )
