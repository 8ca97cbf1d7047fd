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

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pydantic import BaseModel
from taskiq import AsyncBroker, BrokerMessage, TaskiqMessage
from taskiq.exceptions import NoResultError, TaskRejectedError

from batchtask._errors import (
    RETRY_LIMIT,
    BatchArgumentError,
    ItemExpiredError,
    ItemValidationError,
    PoisonItemError,
    Retry,
)
from batchtask._outcomes import Outcome
from batchtask.brokers import adapter_for

if TYPE_CHECKING:
    from batchtask._batcher import Observer
    from batchtask._config import BatchConfig
    from batchtask.brokers import BrokerAdapter

logger = logging.getLogger("batchtask")


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


FINAL: tuple[type[BaseException], ...] = (
    NoResultError,
    TaskRejectedError,
    ItemExpiredError,
    ItemValidationError,
    BatchArgumentError,
    PoisonItemError,
)
"""Outcomes never retried: no result, rejected, never run, or a poison item."""

RETRY_ON_ERROR = "retry_on_error"
"""taskiq's retry middlewares' label; ``False`` keeps them off a counted failure."""


class _Again(NamedTuple):
    at: int
    message: TaskiqMessage
    attempts: int
    delay: float


async def settle_retries(
    config: "BatchConfig",
    task_name: str,
    broker: AsyncBroker,
    messages: Sequence[TaskiqMessage | None],
    outcomes: list[Outcome],
    observer: "Observer | None" = None,
) -> list[Outcome]:
    """Each passed item's outcome after retries: re-sent, or final (see the module).

    `messages[i]` is the message of the item with `outcomes[i]` (None where
    it is not known: that item's outcome stays as it is).
    """
    counts_every_failure = (
        config.max_attempts is not None or config.dead_letter is not None
    )
    if not counts_every_failure and not any(
        isinstance(outcome.error, Retry) for outcome in outcomes
    ):
        return outcomes
    again: list[_Again] = []
    letters: list[tuple[TaskiqMessage, int, BaseException]] = []
    settled = list(outcomes)
    for index, (message, outcome) in enumerate(zip(messages, outcomes, strict=True)):
        error = outcome.error
        if error is None or message is None or isinstance(error, FINAL):
            continue
        attempts = attempt_of(message.labels) + 1
        if isinstance(error, Retry) or counts_every_failure:
            limit = config.max_attempts or (
                RETRY_LIMIT if isinstance(error, Retry) else 1
            )
            if attempts < limit:
                delay = config.retry_delay
                if isinstance(error, Retry) and error.delay is not None:
                    delay = error.delay
                again.append(_Again(index, message, attempts, delay))
                continue
            # batchtask counted this failure: taskiq's retries keep off it.
            message.labels[RETRY_ON_ERROR] = "False"
        final = error
        if isinstance(error, Retry) and error.__cause__ is not None:
            final = error.__cause__
        settled[index] = Outcome(final)
        if config.dead_letter is not None:
            letters.append((message, attempts, final))
    if again and await _send_again(broker, again):
        for retry in again:
            settled[retry.at] = Outcome(NoResultError())
        if observer is not None:
            observer.retried(task_name, len(again))
        logger.info(
            "batch task %s: %d item(s) sent again (attempt %s)",
            task_name,
            len(again),
            ", ".join(sorted({str(r.attempts + 1) for r in again})),
        )
    if letters:
        await _dead_letters(config.dead_letter, task_name, letters)
        if observer is not None:
            observer.dead_lettered(task_name, len(letters))
    return settled


async def _send_again(broker: AsyncBroker, again: Sequence[_Again]) -> bool:
    """Send each item's message again with its attempt and its time; all or none."""
    native_delay = adapter_for(broker).delays()
    now = time.time()
    copies: list[TaskiqMessage] = []
    for retry in again:
        labels = dict(retry.message.labels)
        labels[ATTEMPT] = str(retry.attempts)
        labels.pop("delay", None)
        labels.pop(NOT_BEFORE, None)
        if retry.delay > 0:
            labels[NOT_BEFORE] = f"{now + retry.delay:.3f}"
            if native_delay:
                labels["delay"] = f"{retry.delay:g}"
        copies.append(retry.message.model_copy(update={"labels": labels}))
    return await _resend(
        broker, copies, "sending %d item(s) again failed; their failure is final"
    )


async def _resend(
    broker: AsyncBroker, messages: Sequence[TaskiqMessage], failure: str
) -> bool:
    """Kick `messages`; all or none (a failure is logged with `failure`)."""
    try:
        await _kick(
            adapter_for(broker),
            [broker.formatter.dumps(message) for message in messages],
        )
    except Exception:
        logger.exception("batchtask: " + failure, len(messages))
        return False
    return True


_background: "set[asyncio.Task[None]]" = set()
"""Sends to a broker that runs each message as it is kicked (`_kick`)."""


async def _kick(adapter: "BrokerAdapter", copies: Sequence[BrokerMessage]) -> None:
    """Send `copies`; on a broker that runs messages in place, in the background.

    There a kick returns only once its message ran, and awaiting it from
    inside a call would wait for a later call of the same task (for a call
    slot this call holds, with ``max_concurrent_calls``): a hang. Nothing
    is acknowledged on such a broker, so nothing waits for the send either.
    """
    if not adapter.runs_in_place():
        await adapter.kick_many(copies)
        return
    task = asyncio.ensure_future(adapter.kick_many(copies))
    _background.add(task)
    task.add_done_callback(_sent)


def _sent(task: "asyncio.Task[None]") -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("batchtask: sending items again failed", exc_info=task.exception())


async def wait_sent() -> None:
    """Wait for the sends `_kick` left in the background on this loop."""
    loop = asyncio.get_running_loop()
    while pending := {t for t in _background if t.get_loop() is loop}:
        await asyncio.wait(pending)


async def hand_back(broker: AsyncBroker, messages: Sequence[TaskiqMessage]) -> bool:
    """Send held messages again as they are (their time still ahead); all or none."""
    if not messages:
        return True
    return await _resend(
        broker, messages, "handing %d held item(s) back to the broker failed"
    )


async def _dead_letters(
    task: Any,
    task_name: str,
    letters: Sequence[tuple[TaskiqMessage, int, BaseException]],
) -> None:
    """Send one `DeadLetter` per final failure; a failed send is logged."""

    async def send(message: TaskiqMessage, attempts: int, error: BaseException) -> None:
        letter = DeadLetter(
            task_name=task_name,
            task_id=message.task_id,
            item=message.args[0] if message.args else None,
            args=list(message.args[1:]),
            kwargs=dict(message.kwargs),
            attempts=attempts,
            error=str(error) or repr(error),
            error_type=f"{type(error).__module__}.{type(error).__qualname__}",
            labels={
                k: v
                for k, v in message.labels.items()
                if k not in (ATTEMPT, NOT_BEFORE, RETRY_ON_ERROR)
            },
        )
        await task.kiq(letter)

    replies = await asyncio.gather(
        *(send(*letter) for letter in letters), return_exceptions=True
    )
    for (message, _, _), reply in zip(letters, replies, strict=True):
        if isinstance(reply, BaseException):
            logger.error(
                "batch task %s: sending the dead letter of %s failed",
                task_name,
                message.task_id,
                exc_info=reply,
            )


def hold_limit(adapter: "BrokerAdapter") -> float | None:
    """The longest a worker holds an item before handing it back, if bounded.

    Half the broker's redelivery window: held longer, an unacknowledged
    message would be delivered to another worker meanwhile.
    """
    window = adapter.redelivery_window()
    return None if window is None else max(window[0] / 2, 0.5)
