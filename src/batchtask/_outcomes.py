"""Turns one batch's call (or calls, when bisecting) into one outcome per item.

- ``results="shared"``: every item gets the call's return value.
- ``results="per_item"``: the call returns one value per item, in order; any
  other length fails every item of that call with `BatchResultError`.
- A raised exception fails every item of the call, unless bisecting, which
  calls each half again until the failing items are alone.
- `PartialFailure` fails the items it names and gives the others their results.
- With a tracer (`batchtask._spans`), each call runs inside its scope.
- With ``call_timeout``, a call running longer is cancelled (a sync
  function's thread is left to finish, its outcome ignored) and its items
  fail with `CallTimeoutError`; a timed-out call is not bisected.
- A `BaseException` that is not an `Exception` (say an `asyncio.CancelledError`
  raised inside the function) fails the items with `BatchCallError`; only a
  cancellation of the batch itself propagates.
"""

import asyncio
import logging
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from batchtask._config import ResultsMode
from batchtask._errors import (
    BatchCallError,
    BatchResultError,
    CallTimeoutError,
    PartialFailure,
)
from batchtask._spans import Scope

logger = logging.getLogger("batchtask")


class Outcome(NamedTuple):
    """What one item ends with: an error, or else a value."""

    error: BaseException | None
    value: Any = None


Call = Callable[[list[Any]], Awaitable[Any]]


async def settle(
    items: Sequence[Any],
    call: Call,
    *,
    task_name: str,
    results: ResultsMode,
    bisect: bool,
    scope: Scope | None = None,
    call_timeout: float | None = None,
    sync: bool = False,
) -> list[Outcome]:
    """Call `call` on `items` (in halves when bisecting) and return one outcome each.

    With `scope`, each call runs inside ``scope(start, stop, attempt)``; with
    `call_timeout`, each call may run that many seconds (`sync`: the
    function runs in a thread, which a timeout abandons).
    """
    outcomes: list[Outcome] = [Outcome(None)] * len(items)
    attempts = 0

    async def attempt(start: int, stop: int) -> None:
        nonlocal attempts
        chunk = list(items[start:stop])
        attempts += 1
        limit = asyncio.timeout(call_timeout)
        try:
            async with limit:
                if scope is None:
                    returned = await call(chunk)
                else:
                    with scope(start, stop, attempts):
                        returned = await call(chunk)
        except TimeoutError as exc:
            if not limit.expired():
                error: BaseException = exc
            else:
                outcomes[start:stop] = [
                    Outcome(_timed_out(task_name, len(chunk), call_timeout, sync))
                ] * len(chunk)
                return
        except PartialFailure as partial:
            outcomes[start:stop] = _partial(partial, len(chunk), task_name, results)
            return
        except Exception as exc:
            error = exc
        except BaseException as exc:
            current = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (
                current is not None and current.cancelling()
            ):
                raise
            error = BatchCallError(
                message=(
                    f"batch task {task_name!r}: the function raised "
                    f"{type(exc).__name__} ({exc!r}), which is not an Exception; "
                    f"failing the {len(chunk)} item(s) of this call"
                ),
            )
            error.__cause__ = exc
        else:
            outcomes[start:stop] = _returned(returned, len(chunk), task_name, results)
            return
        if bisect and stop - start > 1:
            middle = (start + stop) // 2
            await attempt(start, middle)
            await attempt(middle, stop)
        else:
            outcomes[start:stop] = [Outcome(error)] * len(chunk)

    if items:
        await attempt(0, len(items))
    return outcomes


def _timed_out(
    task_name: str, size: int, call_timeout: float | None, sync: bool
) -> CallTimeoutError:
    if sync:
        logger.warning(
            "batch task %s: a call of %d item(s) ran past call_timeout=%gs; its "
            "thread is left to finish and its outcome ignored",
            task_name,
            size,
            call_timeout,
        )
    what = "its thread was abandoned" if sync else "it was cancelled"
    return CallTimeoutError(
        message=(
            f"batch task {task_name!r}: the call of {size} item(s) ran longer than "
            f"call_timeout={call_timeout:g}s and {what}. Fix: raise call_timeout, "
            "give the function's own I/O a timeout, or lower batch_size"
        )
    )


def _returned(
    returned: Any, size: int, task_name: str, results: ResultsMode
) -> list[Outcome]:
    if results == "shared":
        return [Outcome(None, returned)] * size
    values = _per_item_values(returned)
    if values is None or len(values) != size:
        found = (
            f"a {type(returned).__name__}"
            if values is None
            else f"{len(values)} result(s)"
        )
        error = BatchResultError(
            message=(
                f"batch task {task_name!r} has results='per_item' and got {size} "
                f"item(s), but the function returned {found}. Fix: return a list "
                "with exactly one result per item, in the order of the items"
            ),
        )
        return [Outcome(error)] * size
    return [Outcome(None, value) for value in values]


def _partial(
    partial: PartialFailure,
    size: int,
    task_name: str,
    results: ResultsMode,
) -> list[Outcome]:
    errors = partial.errors
    outside = sorted(index for index in errors if not 0 <= index < size)
    if outside:
        error = BatchResultError(
            message=(
                f"batch task {task_name!r}: PartialFailure names index(es) "
                f"{outside}, but the call got {size} item(s) (valid indexes are "
                f"0..{size - 1})"
            ),
        )
        error.__cause__ = partial
        return [Outcome(error)] * size
    if results == "shared":
        successes = [Outcome(None, partial.results)] * size
    else:
        successes = _returned(partial.results, size, task_name, results)
    return [
        Outcome(errors[index]) if index in errors else successes[index]
        for index in range(size)
    ]


def _per_item_values(returned: object) -> Sequence[object] | None:
    if isinstance(returned, (str, bytes, bytearray, Mapping)):
        return None
    if isinstance(returned, Sequence):
        return typing.cast("Sequence[object]", returned)
    if isinstance(returned, Iterable):
        return list(typing.cast("Iterable[object]", returned))
    return None
