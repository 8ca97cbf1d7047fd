"""Retries with a delay, attempts and dead letters: what a failed item does next.

After a call (both paths), `Retries.settle` looks at each passed item's
outcome together with its message:

- An item whose outcome is a `Retry`, or any failure on a task with
  ``max_attempts``, is *retried* while it has attempts left: its message is
  sent again (same task id; the label ``batchtask_attempt`` counts its
  calls, ``batchtask_not_before`` says when it may join a batch again) and
  the item ends without a result (taskiq's ``NoResultError``), so the
  original message is acknowledged only after its copy was sent.
- Otherwise its failure is *final*: it stores the error (a `Retry`'s
  ``__cause__`` if it has one); with ``dead_letter`` set, that task is sent a
  `DeadLetter` first. A final failure batchtask counted carries the label
  ``retry_on_error=False``, so taskiq's retry middlewares do not retry it
  again: one of the two counts, never both.

On arrival (`not_before`), an item whose ``batchtask_not_before`` lies ahead
waits outside every batch until then.
"""

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from pydantic import BaseModel


class DeadLetter(BaseModel):
    """What a task's ``dead_letter`` receives for an item whose failure is final."""

    task_name: str
    """The batch task's name."""
    task_id: str
    """The item's task id (its result stores the error under it)."""
    item: Any
    """The item as it was sent (its message's first argument)."""
    args: list[Any]
    """The extra positional arguments it was sent with."""
    kwargs: dict[str, Any]
    """The keyword arguments it was sent with."""
    attempts: int
    """The calls it was passed to, the last one included."""
    error: str
    """The last error's text."""
    error_type: str
    """The last error's class, ``module.QualifiedName``."""
    labels: dict[str, Any] = {}
    """Its message's labels."""


class DeadLetterTask(Protocol):
    """A taskiq task (batch or not) that takes one `DeadLetter`."""

    def kiq(self, letter: DeadLetter, /) -> Awaitable[Any]:
        """Send one dead letter."""
        ...


ATTEMPT = "batchtask_attempt"
"""Label: the calls an item was passed to before this delivery."""
NOT_BEFORE = "batchtask_not_before"
"""Label: the time (``time.time()``) before which the item joins no batch."""


def attempt_of(labels: Mapping[str, Any] | None) -> int:
    """The calls an item was passed to before this delivery."""
    if labels is None:
        return 0
    try:
        return max(int(labels.get(ATTEMPT, 0)), 0)
    except (TypeError, ValueError):
        return 0


def not_before(labels: Mapping[str, Any] | None) -> float:
    """When the item may join a batch (0.0: at once)."""
    if labels is None:
        return 0.0
    stamp = labels.get(NOT_BEFORE)
    if stamp is None:
        return 0.0
    try:
        return float(stamp)
    except (TypeError, ValueError):
        return 0.0
