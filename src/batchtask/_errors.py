"""The exceptions batchtask raises, and `PartialFailure`, which user code raises.

Every message says what was wrong, with which value, and how to fix it.
The errors are taskiq errors, so code that catches `TaskiqError` sees them too.
"""

import math
from collections.abc import Mapping
from typing import Any, cast

from taskiq.exceptions import TaskiqError


class BatchTaskError(TaskiqError):
    """Base class of every error batchtask raises.

    Built as ``BatchTaskError(message=...)`` or ``BatchTaskError("...")``; the
    positional form is what taskiq's result backends use to rebuild an error
    from its stored arguments, so an item's error keeps its class on the
    producer side of any broker.
    """

    __template__ = "{message}"
    message: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take the message by keyword or as the only positional argument."""
        if len(args) == 1 and "message" not in kwargs:
            kwargs["message"] = args[0]
        elif args:
            raise TypeError(
                f"{type(self).__name__} takes one message, by position or as "
                f"message=..., not {args!r}"
            )
        super().__init__(**kwargs)


class BatchConfigError(BatchTaskError):
    """A batch task was declared with settings or a function it cannot run.

    Raised when the decorator runs, never later.
    """


class BatchArgumentError(BatchTaskError):
    """One item's arguments do not fit the task's signature.

    Raised by `kiq` on the producer, and on the worker for a message that was
    built without `kiq`; only that item fails.
    """


class ItemValidationError(BatchTaskError):
    """One item does not match the item annotation; only that item fails."""


class ItemExpiredError(BatchTaskError):
    """An item was sent more than ``max_item_age`` seconds before its call.

    It was not passed to the function; its message is acknowledged as done.
    """


class PoisonItemError(BatchTaskError):
    """An item's call ended its worker process even with the item alone in it.

    After a worker process died (``os._exit``, a segfault, the OOM killer)
    its items come back in ever smaller calls, one such call at a time; an
    item that was alone in a call that never finished fails with this error
    on its next delivery and is acknowledged, so it cannot take the workers
    down again (`BatchReceiver` only).
    """


class MessageTooLargeError(BatchTaskError):
    """A delivery was larger than the worker's ``max_message_bytes``.

    It was not parsed; its message is acknowledged (`BatchReceiver` only).
    """


class BatchResultError(BatchTaskError):
    """A call's return value (or `PartialFailure`) does not fit its batch.

    Every item of that call fails with it.
    """


class BatchCallError(BatchTaskError):
    """The batch function raised a `BaseException` that is not an `Exception`.

    The original (for example an `asyncio.CancelledError` raised inside the
    function) is the `__cause__`; items carry this error instead, so taskiq
    does not mistake it for cancelling the worker.
    """


class CallTimeoutError(BatchTaskError, TimeoutError):
    """A call ran longer than the task's ``call_timeout``.

    An async function's call is cancelled; a sync function's thread is left
    to finish and its outcome ignored. Every item of that call fails with
    this error (and is retried under ``max_attempts``).
    """


class Retry(Exception):
    """Raise from a batch function to send items again, after `delay` seconds.

    Raised by the function it retries every item of the call; as a value in
    `PartialFailure` (``PartialFailure({3: Retry(delay=30.0)}, results=...)``)
    it retries that item. A retried item is sent again under its task id,
    its attempt counted, and joins a later batch no earlier than `delay`
    seconds later (``None``: the task's ``retry_delay``). Raise it ``from``
    the error that caused it: that error is what a final failure stores.

    Without ``max_attempts`` on the task, an item is retried this way up to
    `RETRY_LIMIT` attempts in all; with it, up to ``max_attempts``.
    """

    def __init__(self, delay: float | None = None) -> None:
        """Retry after `delay` seconds (a finite number >= 0, or None)."""
        # Checked at run time: the delay comes from user code (a header).
        given = cast("object", delay)
        if given is not None and (
            isinstance(given, bool)
            or not isinstance(given, (int, float))
            or not math.isfinite(given)
            or given < 0
        ):
            raise ValueError(
                f"Retry: delay={delay!r} must be a finite number of seconds >= 0, "
                "or None for the task's retry_delay"
            )
        self.delay: float | None = None if delay is None else float(delay)
        super().__init__(
            "retry requested"
            if delay is None
            else f"retry requested in {self.delay:g} s"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild with its delay (result backends pickle errors)."""
        return (type(self), (self.delay,))


RETRY_LIMIT = 10
"""Attempts in all an explicit `Retry` gets on a task without ``max_attempts``."""


class PartialFailure(Exception):
    """Raise from a batch function to fail some items and give the rest results.

    `errors` maps an item's index in the batch to the exception that item
    fails with. `results` is what the other items get: in `results="shared"`
    mode one value stored for each of them, in `results="per_item"` mode a
    sequence with one element per item of the batch (elements at failed
    indexes are ignored).

    >>> raise PartialFailure({3: ValueError("bad row")}, results=[...])
    """

    def __init__(
        self,
        errors: Mapping[int, BaseException],
        results: Any = None,
    ) -> None:
        """Fail the items at the indexes in `errors`; the others get `results`."""
        # Checked at run time: the mapping comes from user code.
        for index, error in cast("Mapping[object, object]", errors).items():
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError(
                    f"PartialFailure: index {index!r} is not an int; map each "
                    "failed item's index in the batch to its exception"
                )
            if not isinstance(error, BaseException):
                raise TypeError(
                    f"PartialFailure: index {index} maps to {error!r}, which is "
                    "not an exception"
                )
        self.errors: dict[int, BaseException] = dict(errors)
        self.results: Any = results
        indexes = ", ".join(str(index) for index in sorted(self.errors))
        super().__init__(f"{len(self.errors)} item(s) failed: index {indexes}")
