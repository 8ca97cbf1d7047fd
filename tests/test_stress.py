"""Property-based stress test: many batch tasks, keys, arrivals and failures at once.

Each hypothesis example builds a fresh `InMemoryBroker` (started and shut down
inside the example) with 2-3 batch tasks under fresh names, each with its own
random ``batch_size`` (1..50), ``batch_timeout``, results mode, bisection
setting and call duration, and 1..n group keys. Each task also draws the
shaping settings, each on or off: ``max_weight`` (with a ``weight`` function
reading a weight drawn per item, some items heavier than ``max_weight``),
``max_concurrent_calls``, ``max_concurrent_calls_per_key``, ``debounce``
(below ``batch_timeout``), ``dedup_key`` (a key drawn per item from a few
values, so that duplicates meet in a batch) and ``adaptive``; and the
item-level settings, each on or off: ``group_by`` (reading a group drawn per
item from 1..3 values), ``max_attempts`` (1..3) with a ``retry_delay`` (0 or
small), ``call_timeout`` (a little over the call's duration) and a
``dead_letter`` (a recorder with ``async def kiq(letter)``). A task with
``dedup_key`` draws neither ``max_attempts`` nor ``dead_letter`` and no
`Retry`: retries and dead letters see only the items passed to the call, so
a duplicate folded into a retried item would get no result at all. Several
producers kick items concurrently, in bursts with pauses between them. Every
item's fate is fixed in advance from its value: it succeeds, fails alone (the
function raises `PartialFailure` naming it), poisons its whole call (the
function raises, failing every item of that call unless the task bisects), is
flaky (its first 1..3 attempts, read from its message's ``batchtask_attempt``,
fail: an error or a `Retry(delay=...)` with or without a cause in the
`PartialFailure`, or a `Retry` raised for the whole call; then it succeeds),
or, on a task with ``call_timeout``, is slow (its first attempt's call sleeps
three times ``call_timeout``, so that the timeout cancels it).

Asserted for every example:

- every kicked item's result is stored exactly once (counted by a middleware;
  a retried delivery stores none) and is that item's own outcome, the one
  its last call gave it: its value (``per_item``), its call's return value
  (``shared``), its own `PartialFailure` error (a `Retry`'s cause, else the
  `Retry`), its call's error or `CallTimeoutError`;
- every attempt but an item's last failed and may be retried: ``max_attempts``
  calls (a `Retry` without ``max_attempts``: up to 10; another failure
  without it: just one), each no earlier than its delay (``retry_delay`` or
  the `Retry`'s) after the last call of the attempt before; the last attempt
  succeeded or had no attempt left. In plain words, an item whose calls
  failed for no other item succeeds iff it had more attempts than failing
  ones;
- with ``dead_letter``, exactly the items whose failure was final get one
  letter each, naming their task, task id, item, extra arguments, attempts
  and the stored error with its class;
- with ``dedup_key``, an item the function never saw is a duplicate: it gets
  the outcome of an item passed in its place, which has its task, group key,
  ``group_by`` key and dedup key, arrived after it, and whose batch (the
  items of its task and keys that arrived from the duplicate to it, all
  folded into it when they share its dedup key) holds at most
  ``batch_size`` items whose weights add up to at most ``max_weight``; no
  call holds two items with equal keys;
- the function sees a passed item in exactly one call that settles it per
  attempt (its message's ``batchtask_attempt``, numbered 0, 1, ... in call
  order): without bisection that is the attempt's only call; with
  bisection every earlier call of the attempt holding it raised for all its
  items and held more than one item, there are at most
  ``1 + ceil(log2(batch_size))`` of them, and only the failing items fail;
- no call is empty, holds an item twice, holds more than ``batch_size`` items,
  or mixes tasks, group keys or ``group_by`` keys; the weights of a call of
  more than one item add up to at most ``max_weight``;
- a call holding a slow item's first attempt is cancelled at
  ``call_timeout`` (and not bisected); no other call is, unless the event
  loop ran later than the timeout's margin over the call's duration;
- no more calls of a task run at once (counted inside the function) than
  ``max_concurrent_calls``, nor of one of its keys (a group key with its
  ``group_by`` key) than ``max_concurrent_calls_per_key``;
- in a task without a call limit (with one, waiting for a call slot comes on
  top), no item waits longer than ``batch_timeout`` plus one call (its
  ``call_timeout``, if it has one) (plus a generous 1 s margin, plus the
  longest the event loop was measured late for a timer in that example: on
  a saturated machine no timer can fire on time) from its kiq to the start
  of the first call that holds it (or the item passed in its place); a
  retry comes back later by design, so only first attempts are measured;
- the example completes: a 60 s bound turns a hang into a failure, and no
  call happens after every result is in.

Runs: the default is short (15 derandomized examples, a few seconds). For a
long run with ~500 random examples and wider ranges, pass ``--stress`` to
pytest or set ``BATCHTASK_STRESS=1``::

    .venv/bin/python -m pytest tests/test_stress.py --stress
    BATCHTASK_STRESS=1 .venv/bin/python -m pytest tests/test_stress.py

``--hypothesis-show-statistics`` shows how many examples retried an item,
sent a dead letter, timed a call out or grouped by ``group_by``.

A --stress run takes about 8 minutes on 2 cores, mostly sleeping through
pauses, batch timeouts, retry delays, timed-out calls and calls waiting for
a call slot; past pytest's
``faulthandler_timeout`` (120 s) it prints a stack dump that is not a
failure (``-o faulthandler_timeout=0`` turns it off).
"""

import asyncio
import gc
import itertools
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from taskiq import (
    AsyncTaskiqTask,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)

from batchtask import (
    BatchContext,
    CallTimeoutError,
    DeadLetter,
    PartialFailure,
    Retry,
    batch_task,
)

STRESS = os.environ.get("BATCHTASK_STRESS", "").strip() not in {"", "0"}
"""Set by ``--stress`` (see tests/conftest.py) or ``BATCHTASK_STRESS=1``."""

HANG_BOUND = 60.0
"""Seconds after which a wait counts as a hang; never reached by a passing run."""
LATENESS_MARGIN = 1.0
"""Slack on top of ``batch_timeout`` plus one call, for a loaded 2-core box."""
LAG_PROBE = 0.01
"""Seconds between two looks at how late the event loop runs its callbacks."""
QUIET_LOGGERS = ("taskiq.receiver.receiver", "taskiq.task", "batchtask")
RETRY_LIMIT = 10
"""Attempts an explicit `Retry` gets on a task without ``max_attempts``."""
STAMP_SLACK = 0.01
"""A retried item's time to come back is stamped to the millisecond, from
another clock than the event loop's."""


@dataclass(frozen=True)
class Ranges:
    keys: int
    producers: int
    steps: int
    burst: int
    pause: float
    timeout: tuple[float, float]
    call_delay: float
    retry_delay: float
    """The longest ``retry_delay`` and `Retry` delay drawn."""
    call_margin: tuple[float, float]
    """``call_timeout`` is the task's call delay plus this much."""


RANGES = (
    Ranges(
        keys=6,
        producers=5,
        steps=10,
        burst=40,
        pause=0.1,
        timeout=(0.002, 0.3),
        call_delay=0.05,
        retry_delay=0.05,
        call_margin=(0.05, 0.15),
    )
    if STRESS
    else Ranges(
        keys=3,
        producers=3,
        steps=5,
        burst=12,
        pause=0.02,
        timeout=(0.01, 0.2),
        call_delay=0.02,
        retry_delay=0.02,
        call_margin=(0.05, 0.1),
    )
)


class ItemFailed(Exception):
    """One item's own failure, raised through `PartialFailure`."""


class CallFailed(Exception):
    """A whole call's failure: the call held a poisoned item (or an item
    raising `Retry` for the whole call, as its cause)."""


@dataclass(frozen=True)
class TaskSpec:
    batch_size: int
    batch_timeout: float
    results: str
    bisect: bool
    keys: int
    call_delay: float
    max_weight: int | None = None
    """Weights are whole numbers, so sums compare exactly in any order."""
    max_calls: int | None = None
    max_calls_per_key: int | None = None
    debounce: float | None = None
    dedup: bool = False
    adaptive: bool = False
    groups: int | None = None
    """``group_by`` on, with items drawn into this many groups."""
    max_attempts: int | None = None
    retry_delay: float = 0.0
    call_timeout: float | None = None
    dead_letter: bool = False
    """Whether the task has a ``dead_letter`` (the run's `DeadLetters`)."""

    @property
    def call_span(self) -> float:
        """The longest one call runs: its delay, or up to its timeout."""
        return self.call_delay if self.call_timeout is None else self.call_timeout


@dataclass(frozen=True)
class Item:
    task: int
    key: int
    fate: str
    """"ok", "fail" (alone, via PartialFailure), "poison" (fails its call),
    "flaky" (its first `flaky` attempts fail as `how` says, then it is ok) or
    "slow" (its first attempt's call sleeps past ``call_timeout``)."""
    weight: int = 0
    """Its weight, when its task has ``max_weight``."""
    dup: int | None = None
    """Its dedup key, when its task has one (None: a key of its own)."""
    group: int = 0
    """Its ``group_by`` key, when its task has one."""
    flaky: int = 0
    """The attempts a "flaky" item fails: its calls already made (the label
    ``batchtask_attempt``) are below this number."""
    how: str = "error"
    """How a flaky attempt fails: "error" (an `ItemFailed` in the
    `PartialFailure`), "retry" (a `Retry` value there, from an `ItemFailed`),
    "bare" (a `Retry` value with no cause) or "raise" (the function raises
    `Retry` from a `CallFailed`, for the whole call)."""
    delay: float | None = None
    """Its `Retry`'s delay (None: the task's ``retry_delay``)."""


@dataclass(frozen=True)
class Step:
    burst: int
    """Items kicked concurrently."""
    pause: float
    """Seconds slept after the burst (0: no sleep at all)."""


@dataclass(frozen=True)
class Scenario:
    tasks: tuple[TaskSpec, ...]
    producers: tuple[tuple[Step, ...], ...]
    items: tuple[Item, ...]
    """Item value ``x`` is ``items[x]``; producers kick them in order."""


@dataclass(frozen=True)
class Call:
    id: int
    task: int
    key: str
    items: tuple[int, ...]
    attempts: tuple[int, ...]
    """Per item, its calls already made (its message's ``batchtask_attempt``;
    bisection's calls within one flushed batch share it)."""
    started: float

    def attempt_of(self, x: int) -> int:
        return self.attempts[self.items.index(x)]


@st.composite
def task_specs(draw: st.DrawFn) -> TaskSpec:
    batch_timeout = draw(st.floats(*RANGES.timeout))
    call_delay = draw(st.just(0.0) | st.floats(0.0, RANGES.call_delay))
    dedup = draw(st.booleans())
    return TaskSpec(
        batch_size=draw(st.integers(1, 50)),
        batch_timeout=batch_timeout,
        results=draw(st.sampled_from(["shared", "per_item"])),
        bisect=draw(st.booleans()),
        keys=draw(st.integers(1, RANGES.keys)),
        call_delay=call_delay,
        max_weight=draw(st.none() | st.integers(1, 12)),
        max_calls=draw(st.none() | st.integers(1, 3)),
        max_calls_per_key=draw(st.none() | st.integers(1, 2)),
        debounce=draw(
            st.none() | st.floats(0.05, 0.9).map(lambda share: share * batch_timeout)
        ),
        dedup=dedup,
        adaptive=draw(st.booleans()),
        groups=draw(st.none() | st.integers(1, 3)),
        # Not with dedup_key: a duplicate folded into a retried item gets no
        # result, and a final failure sends no dead letter for a duplicate
        # (retries and dead letters only see the items passed to the call).
        max_attempts=None if dedup else draw(st.none() | st.integers(1, 3)),
        retry_delay=draw(st.just(0.0) | st.floats(0.0, RANGES.retry_delay)),
        call_timeout=draw(
            st.none()
            | st.floats(*RANGES.call_margin).map(lambda margin: call_delay + margin)
        ),
        dead_letter=False if dedup else draw(st.booleans()),
    )


steps = st.builds(
    Step,
    burst=st.integers(1, RANGES.burst),
    pause=st.just(0.0) | st.floats(0.0, RANGES.pause),
)
FATES = ("ok", "ok", "ok", "ok", "fail", "fail", "poison", "flaky", "flaky")
"""Fates drawn for items; "slow" too where the task has a ``call_timeout``."""
HOWS = ("error", "retry", "bare", "raise")
"""How flaky attempts fail; "error" only with ``dedup_key`` (no retries)."""
DUPS = (0, 0, 0, 1, 1, 2, None)
"""Dedup keys drawn for items (None: a key of its own): few, so that equal
items meet in a batch."""


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tasks = tuple(draw(st.lists(task_specs(), min_size=2, max_size=3)))
    producers = tuple(
        tuple(draw(st.lists(steps, min_size=1, max_size=RANGES.steps)))
        for _ in range(draw(st.integers(1, RANGES.producers)))
    )
    total = sum(step.burst for plan in producers for step in plan)
    items: list[Item] = []
    for _ in range(total):
        task = draw(st.integers(0, len(tasks) - 1))
        key = draw(st.integers(0, tasks[task].keys - 1))
        spec = tasks[task]
        fate = draw(
            st.sampled_from(FATES if spec.call_timeout is None else (*FATES, "slow"))
        )
        # Up to 2 over max_weight: such an item must run alone.
        weight = (
            0 if spec.max_weight is None else draw(st.integers(0, spec.max_weight + 2))
        )
        # Few dedup keys, so that duplicates share batches.
        dup = draw(st.sampled_from(DUPS)) if spec.dedup else None
        group = 0 if spec.groups is None else draw(st.integers(0, spec.groups - 1))
        flaky, how, delay = 0, "error", None
        if fate == "flaky":
            flaky = draw(st.integers(1, 3))
            how = "error" if spec.dedup else draw(st.sampled_from(HOWS))
            if how != "error":
                delay = draw(st.none() | st.floats(0.0, RANGES.retry_delay))
        items.append(Item(task, key, fate, weight, dup, group, flaky, how, delay))
    return Scenario(tasks, producers, tuple(items))


def dedup_key(scenario: Scenario, x: int) -> tuple[str, int]:
    """Item `x`'s dedup key: its drawn one, else one equal to no other."""
    dup = scenario.items[x].dup
    return ("unique", x) if dup is None else ("dup", dup)


def key_name(key: int) -> str:
    # The same names in every task: equal extra arguments of different
    # tasks must still never share a batch.
    return f"k{key}"


def per_item_value(x: int, task: int, key: str) -> int:
    return x * 1000 + task * 100 + int(key[1:])


def stalls(scenario: Scenario, call: Call) -> bool:
    """Whether `call` sleeps past ``call_timeout`` (a "slow" item's first)."""
    return any(
        scenario.items[x].fate == "slow" and a == 0
        for x, a in zip(call.items, call.attempts, strict=True)
    )


def raised(scenario: Scenario, call: Call) -> BaseException | None:
    """What the function raises for all of `call` (if it does not stall)."""
    if any(scenario.items[x].fate == "poison" for x in call.items):
        return CallFailed(f"call {call.id} failed")
    for x, a in zip(call.items, call.attempts, strict=True):
        item = scenario.items[x]
        if item.fate == "flaky" and item.how == "raise" and a < item.flaky:
            retry = Retry(delay=item.delay)
            retry.__cause__ = CallFailed(f"call {call.id} failed")
            return retry
    return None


def own_error(scenario: Scenario, x: int, attempt: int) -> BaseException | None:
    """Item `x`'s own failure (in the `PartialFailure`) at `attempt`, if any."""
    item = scenario.items[x]
    failing = item.fate == "fail" or (
        item.fate == "flaky" and item.how != "raise" and attempt < item.flaky
    )
    if not failing:
        return None
    error = ItemFailed(f"item {x} failed")
    if item.fate == "fail" or item.how == "error":
        return error
    retry = Retry(delay=item.delay)
    if item.how == "retry":
        retry.__cause__ = error
    return retry


def signature(error: BaseException | None) -> tuple[Any, ...] | None:
    """What two equal errors share: class and text (a `Retry`: its delay and
    cause; a `CallTimeoutError`: its class only)."""
    if error is None:
        return None
    if isinstance(error, CallTimeoutError):
        return (CallTimeoutError,)
    if isinstance(error, Retry):
        return (Retry, error.delay, signature(error.__cause__))
    return (type(error), str(error))


def stored(error: BaseException) -> BaseException:
    """What a final failure stores: a `Retry`'s cause if it has one."""
    if isinstance(error, Retry) and error.__cause__ is not None:
        return error.__cause__
    return error


def retry_delay(spec: TaskSpec, error: BaseException, attempts: int) -> float | None:
    """The delay before an item that failed with `error` in its `attempts`-th
    call runs again; None: that failure is final."""
    is_retry = isinstance(error, Retry)
    if not (is_retry or spec.max_attempts is not None or spec.dead_letter):
        return None
    limit = spec.max_attempts or (RETRY_LIMIT if is_retry else 1)
    if attempts >= limit:
        return None
    if isinstance(error, Retry) and error.delay is not None:
        return error.delay
    return spec.retry_delay


def attempt_label(message: TaskiqMessage) -> int:
    return int(message.labels.get("batchtask_attempt", 0))


class DeadLetters:
    """A ``dead_letter``: anything with ``async def kiq(letter)`` will do."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def kiq(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


class CountSaves(TaskiqMiddleware):
    """Counts stored results per task id: each item must complete once."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.saved: Counter[str] = Counter()
        self.expected = expected
        self.all_saved = asyncio.Event()

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.saved[message.task_id] += 1
        if len(self.saved) >= self.expected:
            self.all_saved.set()


_example_numbers = itertools.count()


@dataclass
class Run:
    scenario: Scenario
    calls: list[Call] = field(default_factory=lambda: [])
    ended: dict[int, float] = field(default_factory=lambda: {})
    """When each call returned or raised."""
    timed_out: set[int] = field(default_factory=lambda: set[int]())
    """The calls cancelled (by ``call_timeout``: nothing else cancels one)."""
    letters: DeadLetters = field(default_factory=DeadLetters)
    task_names: list[str] = field(default_factory=lambda: [])
    kiq_at: dict[int, float] = field(default_factory=lambda: {})
    handles: dict[int, AsyncTaskiqTask[Any]] = field(default_factory=lambda: {})
    results: dict[int, TaskiqResult[Any]] = field(default_factory=lambda: {})
    saved: Counter[str] = field(default_factory=lambda: Counter[str]())
    calls_when_done: int = -1
    arrived: dict[int, int] = field(default_factory=lambda: {})
    """Order in which the items of dedup tasks were keyed (on arrival, just
    before they join their batch), so the latest of equal items is known."""
    running: Counter[tuple[int, tuple[str, int] | None]] = field(
        default_factory=lambda: Counter[tuple[int, tuple[str, int] | None]]()
    )
    """Calls running now, per (task, None) and per (task, (key, group))."""
    peak: Counter[tuple[int, tuple[str, int] | None]] = field(
        default_factory=lambda: Counter[tuple[int, tuple[str, int] | None]]()
    )
    """The most calls that ran at once, counted like `running`."""
    loop_lag: float = 0.0
    """The longest the event loop was late for a timer during the example: a
    timer cannot fire earlier than the loop gets to it, on any machine."""


def declare(broker: InMemoryBroker, run: Run, example: int) -> list[Any]:
    """Declare the scenario's tasks; each records its calls in `run.calls`."""
    loop = asyncio.get_running_loop()
    scenario = run.scenario
    arrivals = itertools.count()

    def weigh(x: int) -> int:
        return scenario.items[x].weight

    def key_of(x: int) -> tuple[str, int]:
        run.arrived.setdefault(x, next(arrivals))
        return dedup_key(scenario, x)

    def group_of(x: int) -> int:
        return scenario.items[x].group

    async def respond(call: Call, spec: TaskSpec) -> list[int]:
        """Sleep, then return the call's value or raise its failures."""
        if spec.call_delay:
            await asyncio.sleep(spec.call_delay)
        if stalls(scenario, call):
            # call_timeout's timer is due first, so it always fires first
            # (timers run in deadline order, however late the event loop).
            assert spec.call_timeout is not None
            await asyncio.sleep(3 * spec.call_timeout)
        error = raised(scenario, call)
        if error is not None:
            raise error
        errors: dict[int, BaseException] = {}
        for i, (x, a) in enumerate(zip(call.items, call.attempts, strict=True)):
            if (own := own_error(scenario, x, a)) is not None:
                errors[i] = own
        if spec.results == "shared":
            value = [call.id, *call.items]
        else:
            value = [
                -1 if i in errors else per_item_value(x, call.task, call.key)
                for i, x in enumerate(call.items)
            ]
        if errors:
            raise PartialFailure(errors, results=value)
        return value

    async def called(
        t: int, spec: TaskSpec, items: list[int], key: str, ctx: BatchContext | None
    ) -> list[int]:
        # Each item's calls already made, from its message (all 0 on a task
        # that never retries); bisection's calls get every passed message.
        made = (
            {} if ctx is None else {m.args[0]: attempt_label(m) for m in ctx.messages}
        )
        attempts = tuple(made.get(x, 0 if ctx is None else -1) for x in items)
        call = Call(len(run.calls), t, key, tuple(items), attempts, loop.time())
        run.calls.append(call)
        # Calls running at once, of the task and of its (key, group).
        counted = ((t, None), (t, (key, scenario.items[items[0]].group)))
        for slot in counted:
            run.running[slot] += 1
            run.peak[slot] = max(run.peak[slot], run.running[slot])
        try:
            return await respond(call, spec)
        except asyncio.CancelledError:
            run.timed_out.add(call.id)
            raise
        finally:
            run.ended[call.id] = loop.time()
            for slot in counted:
                run.running[slot] -= 1

    declared: list[Any] = []
    for t, spec in enumerate(scenario.tasks):
        retries = spec.max_attempts not in (None, 1) or any(
            item.task == t and item.how != "error" for item in scenario.items
        )

        async def process(
            items: list[int], key: str, t: int = t, spec: TaskSpec = spec
        ) -> list[int]:
            return await called(t, spec, items, key, None)

        async def process_counting(
            items: list[int],
            key: str,
            ctx: BatchContext = TaskiqDepends(),
            t: int = t,
            spec: TaskSpec = spec,
        ) -> list[int]:
            return await called(t, spec, items, key, ctx)

        shaping: dict[str, Any] = {
            "max_weight": spec.max_weight,
            "weight": None if spec.max_weight is None else weigh,
            "max_concurrent_calls": spec.max_calls,
            "max_concurrent_calls_per_key": spec.max_calls_per_key,
            "debounce": spec.debounce,
            "dedup_key": key_of if spec.dedup else None,
            "adaptive": spec.adaptive,
        }
        item_level: dict[str, Any] = {
            "max_attempts": spec.max_attempts,
            "retry_delay": spec.retry_delay,
            "call_timeout": spec.call_timeout,
            "group_by": None if spec.groups is None else group_of,
            "dead_letter": run.letters if spec.dead_letter else None,
        }
        name = f"stress_{example}_{t}"
        run.task_names.append(name)
        decorate: Any = batch_task(
            broker,
            batch_size=spec.batch_size,
            batch_timeout=spec.batch_timeout,
            results=spec.results,  # type: ignore[arg-type]  # drawn at random
            bisect_on_error=spec.bisect,
            task_name=name,
            **shaping,
            **item_level,
        )
        # Only a task that may retry reads its attempts (from a BatchContext).
        declared.append(decorate(process_counting if retries else process))
    return declared


async def produce(
    run: Run, tasks: list[Any], plan: tuple[Step, ...], first: int
) -> None:
    """Kick items ``first, first + 1, ...`` in the bursts and pauses of `plan`."""
    loop = asyncio.get_running_loop()

    async def send(x: int) -> None:
        item = run.scenario.items[x]
        run.kiq_at[x] = loop.time()
        run.handles[x] = await tasks[item.task].kiq(x, key_name(item.key))

    x = first
    for step in plan:
        await asyncio.gather(*(send(y) for y in range(x, x + step.burst)))
        x += step.burst
        if step.pause:
            await asyncio.sleep(step.pause)


async def play(scenario: Scenario) -> Run:
    """Run one scenario on a fresh broker; every wait is bounded by HANG_BOUND."""
    run = Run(scenario)
    loop = asyncio.get_running_loop()

    async def probe_lag() -> None:
        while True:
            due = loop.time() + LAG_PROBE
            await asyncio.sleep(LAG_PROBE)
            run.loop_lag = max(run.loop_lag, loop.time() - due)

    prober = asyncio.create_task(probe_lag())
    counter = CountSaves(expected=len(scenario.items))
    broker = InMemoryBroker().with_middlewares(counter)
    await broker.startup()
    try:
        tasks = declare(broker, run, next(_example_numbers))
        sizes = [sum(step.burst for step in plan) for plan in scenario.producers]
        firsts = itertools.accumulate(sizes[:-1], initial=0)
        producers = [
            produce(run, tasks, plan, first)
            for plan, first in zip(scenario.producers, firsts, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*producers), HANG_BOUND)
        # Not broker.wait_all(): taskiq's receiver swallows the cancellation
        # that asyncio.wait_for sends at its bound, so a hang would stay a hang.
        await asyncio.wait_for(counter.all_saved.wait(), HANG_BOUND)
        run.calls_when_done = len(run.calls)
        for x, handle in run.handles.items():
            run.results[x] = await handle.get_result()
    finally:
        prober.cancel()
        await asyncio.wait_for(broker.shutdown(), HANG_BOUND)
    run.saved = counter.saved
    return run


def items_equal(scenario: Scenario, x: int, y: int) -> bool:
    """Whether items `x` and `y` share task, keys and dedup key."""
    a, b = scenario.items[x], scenario.items[y]
    return (a.task, a.key, a.group) == (b.task, b.key, b.group) and dedup_key(
        scenario, x
    ) == dedup_key(scenario, y)


def passed_instead(run: Run, x: int, holding: dict[int, list[Call]]) -> int:
    """The item whose outcome item `x` got: `x` itself unless a duplicate.

    A duplicate's outcome names the item passed in its place, or its call
    (which then holds exactly one item equal to it); a `CallTimeoutError`
    names neither: that item is then the first equal item passed after it
    (the others up to it were in its batch, and not passed).
    """
    if holding[x]:
        return x
    scenario = run.scenario
    item = scenario.items[x]
    assert scenario.tasks[item.task].dedup, f"item {x} ({item}) was never passed"
    result = run.results[x]
    call: Call | None = None
    y = -1
    if result.is_err and isinstance(result.error, ItemFailed):
        y = int(str(result.error).split()[1])
    elif result.is_err and isinstance(result.error, CallTimeoutError):
        later = [
            z
            for z in range(len(scenario.items))
            if holding[z]
            and items_equal(scenario, x, z)
            and run.arrived[z] > run.arrived[x]
        ]
        assert later, f"duplicate {x} ({item}) timed out, nothing equal passed"
        y = min(later, key=lambda z: run.arrived[z])
    elif result.is_err:
        assert isinstance(result.error, CallFailed), (x, item, result.error)
        call = run.calls[int(str(result.error).split()[1])]
    elif scenario.tasks[item.task].results == "per_item":
        y = result.return_value // 1000
    else:
        call = run.calls[result.return_value[0]]
    if call is not None:
        equal = [z for z in call.items if items_equal(scenario, x, z)]
        assert len(equal) == 1, f"duplicate {x} ({item}) settled by {call}"
        y = equal[0]
    assert 0 <= y < len(scenario.items), (x, item, result)
    assert holding[y], f"duplicate {x} got the outcome of {y}, never passed"
    assert items_equal(scenario, x, y), (
        f"duplicate {x} ({item}) got the outcome of {y} ({scenario.items[y]})"
    )
    return y


def check_duplicates(run: Run, instead: list[int]) -> None:
    """Each duplicate was folded into the latest equal item of its batch.

    The batches of one task and keys (extra argument and group) take their
    items in arrival order, one batch after another, so the items of that
    task and keys that arrived from a duplicate to the item passed in its
    place were all in their batch: at most ``batch_size`` of them, weighing
    at most ``max_weight`` together, and those equal to the passed item were
    folded into it too.
    """
    scenario = run.scenario
    for x, y in enumerate(instead):
        if x == y:
            continue
        item = scenario.items[x]
        spec = scenario.tasks[item.task]
        assert run.arrived[x] < run.arrived[y], (
            f"duplicate {x} got the outcome of {y}, which arrived before it"
        )
        batch = [
            z
            for z, other in enumerate(scenario.items)
            if (other.task, other.key, other.group) == (item.task, item.key, item.group)
            and run.arrived[x] <= run.arrived[z] <= run.arrived[y]
        ]
        assert len(batch) <= spec.batch_size, (x, y, batch)
        if spec.max_weight is not None:
            weight = sum(scenario.items[z].weight for z in batch)
            assert weight <= spec.max_weight, (x, y, batch, weight)
        for z in batch:
            if items_equal(scenario, z, y):
                assert instead[z] == y, f"{z} not folded into {y} with {x}: {batch}"


def attempts_of(
    run: Run, spec: TaskSpec, y: int, calls: list[Call]
) -> list[tuple[list[Call], BaseException | None]]:
    """Item `y`'s attempts: each one's calls, and the outcome its last gave it.

    Checked on the way: the attempts are numbered 0, 1, ... in call order;
    without bisection an attempt is one call; with it, every call of an
    attempt but the last raised for all its items and held more than one
    (a timed-out call is not bisected), the last raised only if `y` is
    alone in it, and there are at most ``1 + ceil(log2(batch_size))`` calls.
    """
    scenario = run.scenario
    numbers = [c.attempt_of(y) for c in calls]
    assert numbers == sorted(numbers), f"item {y}: attempts out of order: {calls}"
    assert sorted(set(numbers)) == list(range(len(set(numbers)))), (y, calls)
    attempts: list[tuple[list[Call], BaseException | None]] = []
    for a in range(len(set(numbers))):
        group = [c for c in calls if c.attempt_of(y) == a]
        failed = [
            c.id not in run.timed_out and raised(scenario, c) is not None for c in group
        ]
        final = group[-1]
        if spec.bisect:
            assert all(failed[:-1]), f"item {y} repeated after success: {group}"
            assert all(len(c.items) > 1 for c in group[:-1]), group
            assert not failed[-1] or final.items == (y,), group
            assert len(group) <= 1 + math.ceil(math.log2(spec.batch_size)), group
        else:
            assert len(group) == 1, f"item {y} passed {len(group)} times: {group}"
        if final.id in run.timed_out:
            outcome: BaseException | None = CallTimeoutError(message="timed out")
        else:
            outcome = raised(scenario, final) or own_error(scenario, y, a)
        attempts.append((group, outcome))
    return attempts


def check(run: Run) -> None:
    scenario = run.scenario
    items = scenario.items
    count = len(items)

    # Every item was kicked once, under its own task id, and completed once.
    assert sorted(run.handles) == list(range(count))
    task_ids = [run.handles[x].task_id for x in range(count)]
    assert len(set(task_ids)) == count
    assert run.saved == Counter(task_ids), "a result was stored twice or never"
    assert len(run.calls) == run.calls_when_done, "a call ran after all results"

    # Calls: non-empty, distinct items of one task and keys, within
    # batch_size and max_weight, no two items with equal dedup keys; a call
    # sleeping past call_timeout timed out, and (unless the event loop ran
    # later than the timeout's margin) no other call did.
    holding: dict[int, list[Call]] = {x: [] for x in range(count)}
    for call in run.calls:
        spec = scenario.tasks[call.task]
        assert call.items, f"empty call {call}"
        assert len(set(call.items)) == len(call.items), f"duplicate in {call}"
        assert len(call.items) <= spec.batch_size, f"over batch_size: {call}"
        assert all(a >= 0 for a in call.attempts), f"message not in context: {call}"
        for x in call.items:
            assert 0 <= x < count, f"unknown item in {call}"
            assert (items[x].task, key_name(items[x].key)) == (call.task, call.key), (
                f"item {x} ({items[x]}) in a call of another task or key: {call}"
            )
            holding[x].append(call)
        groups = {items[x].group for x in call.items}
        assert len(groups) == 1, f"call {call} mixes group_by keys {groups}"
        if spec.max_weight is not None and len(call.items) > 1:
            weight = sum(items[x].weight for x in call.items)
            assert weight <= spec.max_weight, f"weighs {weight}: {call}"
        keys = {dedup_key(scenario, x) for x in call.items}
        assert len(keys) == len(call.items), f"equal dedup keys in {call}"
        if stalls(scenario, call):
            assert call.id in run.timed_out, f"past call_timeout, not cancelled: {call}"
        elif spec.call_timeout is not None:
            margin = spec.call_timeout - spec.call_delay
            assert call.id not in run.timed_out or run.loop_lag >= margin, (
                f"call {call} timed out (event loop late by {run.loop_lag:.3f}s)"
            )
        else:
            assert call.id not in run.timed_out, f"cancelled: {call}"

    # Calls running at once, counted inside the function.
    for (t, key), peak in run.peak.items():
        spec = scenario.tasks[t]
        limit = spec.max_calls if key is None else spec.max_calls_per_key
        assert limit is None or peak <= limit, (
            f"task {t} key {key}: {peak} calls at once, limit {limit}"
        )

    instead = [passed_instead(run, x, holding) for x in range(count)]
    check_duplicates(run, instead)

    letters: dict[str, list[DeadLetter]] = {}
    for letter in run.letters.letters:
        letters.setdefault(letter.task_id, []).append(letter)
    lettered = 0
    for x, item in enumerate(items):
        spec = scenario.tasks[item.task]
        # Its outcome is that of the item passed in its place (itself, or
        # the latest equal item of its batch).
        y = instead[x]
        passed = items[y]
        attempts = attempts_of(run, spec, y, holding[y])
        # Every attempt but the last failed and was sent again (no earlier
        # than its delay after its last call); the last one's outcome is
        # final: a success, or a failure with no attempt left.
        for a, (group, outcome) in enumerate(attempts):
            delay = None if outcome is None else retry_delay(spec, outcome, a + 1)
            if a + 1 < len(attempts):
                assert delay is not None, f"item {y} ran again after {outcome!r}"
                came_back = attempts[a + 1][0][0].started
                assert came_back >= run.ended[group[-1].id] + delay - STAMP_SLACK, (
                    f"item {y} retried {delay}s after {group[-1]}, at {came_back}"
                )
            else:
                assert delay is None, f"item {y} not retried after {outcome!r}"
        final, outcome = attempts[-1][0][-1], attempts[-1][1]
        # The plain reading, for an item whose calls failed only for it:
        # it succeeds iff it had more attempts than its failing ones.
        alone = all(
            c.id not in run.timed_out and raised(scenario, c) is None
            for group, _ in attempts
            for c in group[-1:]
        )
        if alone and passed.fate in ("ok", "fail", "flaky"):
            failing = {"ok": 0, "fail": math.inf, "flaky": passed.flaky}[passed.fate]
            enough = spec.max_attempts or (
                RETRY_LIMIT if passed.fate == "flaky" and passed.how != "error" else 1
            )
            assert (outcome is None) == (failing < enough), (x, y, passed, attempts)

        result = run.results[x]
        if outcome is None:
            assert not result.is_err, (x, y, passed, result.error)
            if spec.results == "shared":
                expected: Any = [final.id, *final.items]
            else:
                expected = per_item_value(y, item.task, key_name(item.key))
            assert result.return_value == expected, (x, y, passed, final)
        else:
            assert result.is_err, (x, y, passed, result.return_value)
            assert signature(result.error) == signature(stored(outcome)), (
                x,
                y,
                passed,
                result.error,
                outcome,
            )

        # A failure is final after the attempts it got: with a dead_letter,
        # the letter of its task id says so (and no other item gets one).
        sent = letters.get(task_ids[x], [])
        if spec.dead_letter and outcome is not None:
            assert len(sent) == 1, f"item {x}: {len(sent)} dead letters"
            [letter] = sent
            lettered += 1
            got = (letter.task_name, letter.item, letter.args, letter.attempts)
            assert got == (
                run.task_names[item.task],
                x,
                [key_name(item.key)],
                len(attempts),
            ), (x, letter)
            assert letter.error == str(result.error), (x, letter, result.error)
            error_type = type(result.error)
            assert letter.error_type == (
                f"{error_type.__module__}.{error_type.__qualname__}"
            ), (x, letter)
        else:
            assert not sent, f"item {x} ({item}, {outcome!r}) got a dead letter"

        # Waited at most batch_timeout plus one call (and a generous margin,
        # plus however late the event loop ran timers in this example) from
        # its kiq to the start of the first call holding it. With a call
        # limit, waiting for a call slot comes on top: not bounded here.
        # Measured for its first attempt: a retry comes back later by design.
        if spec.max_calls is None and spec.max_calls_per_key is None:
            waited = attempts[0][0][0].started - run.kiq_at[x]
            bound = spec.batch_timeout + spec.call_span + LATENESS_MARGIN + run.loop_lag
            assert waited <= bound, f"item {x} waited {waited:.3f}s > {bound:.3f}s"
    assert lettered == len(run.letters.letters), "a dead letter for no final failure"
    # What the example exercised (--hypothesis-show-statistics).
    retried = sum(len({c.attempt_of(x) for c in holding[x]}) > 1 for x in range(count))
    for name, happened in [
        ("an item retried", retried),
        ("a dead letter", lettered),
        ("a call timed out", run.timed_out),
        ("group_by", any(spec.groups for spec in scenario.tasks)),
    ]:
        if happened:
            event(name)


@settings(
    max_examples=500 if STRESS else 15,
    deadline=None,
    derandomize=not STRESS,
    print_blob=STRESS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_every_item_completes_once_with_its_own_outcome(scenario: Scenario) -> None:
    # taskiq logs a traceback for every failed item (receiver) and a warning
    # for every error result it cannot parse to the return type (task), and
    # batchtask one per failed call and per retry: far too many here. What
    # they report is asserted on below.
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    # Everything alive before the example (hypothesis' bookkeeping, which
    # grows with every example, and whatever earlier examples left) is
    # frozen, so a full collection while it runs scans only its own objects.
    # Unfrozen, such collections took over a second in --stress runs and
    # stalled the event loop, timers included.
    gc.freeze()
    try:
        run = asyncio.run(play(scenario))
    finally:
        gc.unfreeze()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    check(run)
