"""Property-based stress test: many batch tasks, keys, arrivals and failures at once.

Each hypothesis example builds a fresh `InMemoryBroker` (started and shut down
inside the example) with 2-3 batch tasks under fresh names, each with its own
random ``batch_size`` (1..50), ``batch_timeout``, results mode, bisection
setting and call duration, and 1..n group keys. Each task also draws the
shaping settings, each on or off: ``max_weight`` (with a ``weight`` function
reading a weight drawn per item, some items heavier than ``max_weight``),
``max_concurrent_calls``, ``max_concurrent_calls_per_key``, ``debounce``
(below ``batch_timeout``), ``dedup_key`` (a key drawn per item from a few
values, so that duplicates meet in a batch) and ``adaptive``. Several
producers kick items concurrently, in bursts with pauses between them. Every
item's fate is fixed in advance from its value: it succeeds, fails alone (the
function raises `PartialFailure` naming it) or poisons its whole call (the
function raises, failing every item of that call unless the task bisects).

Asserted for every example:

- every kicked item's result is stored exactly once (counted by a middleware)
  and is that item's own outcome: its value (``per_item``), its call's return
  value (``shared``), its own `PartialFailure` error, or its call's error;
- with ``dedup_key``, an item the function never saw is a duplicate: it gets
  the outcome of an item passed in its place, which has its task, group key
  and dedup key, arrived after it, and whose batch (the items of its task and
  key that arrived from the duplicate to it, all folded into it when they
  share its dedup key) holds at most ``batch_size`` items whose weights add
  up to at most ``max_weight``; no call holds two items with equal keys;
- the function sees each passed item in exactly one call that settles it: without
  bisection that is its only call; with bisection every earlier call holding
  it raised and held more than one item, there are at most
  ``1 + ceil(log2(batch_size))`` of them, and only the failing items fail;
- no call is empty, holds an item twice, holds more than ``batch_size`` items,
  or mixes tasks or group keys; the weights of a call of more than one item
  add up to at most ``max_weight``;
- no more calls of a task run at once (counted inside the function) than
  ``max_concurrent_calls``, nor of one of its group keys than
  ``max_concurrent_calls_per_key``;
- in a task without a call limit (with one, waiting for a call slot comes on
  top), no item waits longer than ``batch_timeout`` plus one call (plus a
  generous 1 s margin, plus the longest the event loop was measured late for
  a timer in that example: on a saturated machine no timer can fire on time)
  from its kiq to the start of the first call that holds it (or the item
  passed in its place);
- the example completes: a 60 s bound turns a hang into a failure, and no
  call happens after every result is in.

Runs: the default is short (15 derandomized examples, a few seconds). For a
long run with ~500 random examples and wider ranges, pass ``--stress`` to
pytest or set ``BATCHTASK_STRESS=1``::

    .venv/bin/python -m pytest tests/test_stress.py --stress
    BATCHTASK_STRESS=1 .venv/bin/python -m pytest tests/test_stress.py

A --stress run takes about 7-8 minutes on 2 cores, mostly sleeping through
pauses, batch timeouts and calls waiting for a call slot; past pytest's
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

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taskiq import (
    AsyncTaskiqTask,
    InMemoryBroker,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)

from batchtask import PartialFailure, batch_task

STRESS = os.environ.get("BATCHTASK_STRESS", "").strip() not in {"", "0"}
"""Set by ``--stress`` (see tests/conftest.py) or ``BATCHTASK_STRESS=1``."""

HANG_BOUND = 60.0
"""Seconds after which a wait counts as a hang; never reached by a passing run."""
LATENESS_MARGIN = 1.0
"""Slack on top of ``batch_timeout`` plus one call, for a loaded 2-core box."""
LAG_PROBE = 0.01
"""Seconds between two looks at how late the event loop runs its callbacks."""
QUIET_LOGGERS = ("receiver.receiver", "task")


@dataclass(frozen=True)
class Ranges:
    keys: int
    producers: int
    steps: int
    burst: int
    pause: float
    timeout: tuple[float, float]
    call_delay: float


RANGES = (
    Ranges(
        keys=6,
        producers=5,
        steps=10,
        burst=40,
        pause=0.1,
        timeout=(0.002, 0.3),
        call_delay=0.05,
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
    )
)


class ItemFailed(Exception):
    """One item's own failure, raised through `PartialFailure`."""


class CallFailed(Exception):
    """A whole call's failure: the call held a poisoned item."""


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


@dataclass(frozen=True)
class Item:
    task: int
    key: int
    fate: str
    """"ok", "fail" (alone, via PartialFailure) or "poison" (fails its call)."""
    weight: int = 0
    """Its weight, when its task has ``max_weight``."""
    dup: int | None = None
    """Its dedup key, when its task has one (None: a key of its own)."""


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
    started: float


@st.composite
def task_specs(draw: st.DrawFn) -> TaskSpec:
    batch_timeout = draw(st.floats(*RANGES.timeout))
    return TaskSpec(
        batch_size=draw(st.integers(1, 50)),
        batch_timeout=batch_timeout,
        results=draw(st.sampled_from(["shared", "per_item"])),
        bisect=draw(st.booleans()),
        keys=draw(st.integers(1, RANGES.keys)),
        call_delay=draw(st.just(0.0) | st.floats(0.0, RANGES.call_delay)),
        max_weight=draw(st.none() | st.integers(1, 12)),
        max_calls=draw(st.none() | st.integers(1, 3)),
        max_calls_per_key=draw(st.none() | st.integers(1, 2)),
        debounce=draw(
            st.none() | st.floats(0.05, 0.9).map(lambda share: share * batch_timeout)
        ),
        dedup=draw(st.booleans()),
        adaptive=draw(st.booleans()),
    )


steps = st.builds(
    Step,
    burst=st.integers(1, RANGES.burst),
    pause=st.just(0.0) | st.floats(0.0, RANGES.pause),
)
FATES = ("ok", "ok", "ok", "ok", "fail", "fail", "poison")
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
        fate = draw(st.sampled_from(FATES))
        spec = tasks[task]
        # Up to 2 over max_weight: such an item must run alone.
        weight = (
            0 if spec.max_weight is None else draw(st.integers(0, spec.max_weight + 2))
        )
        # Few dedup keys, so that duplicates share batches.
        dup = draw(st.sampled_from(DUPS)) if spec.dedup else None
        items.append(Item(task, key, fate, weight, dup))
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
    kiq_at: dict[int, float] = field(default_factory=lambda: {})
    handles: dict[int, AsyncTaskiqTask[Any]] = field(default_factory=lambda: {})
    results: dict[int, TaskiqResult[Any]] = field(default_factory=lambda: {})
    saved: Counter[str] = field(default_factory=lambda: Counter[str]())
    calls_when_done: int = -1
    arrived: dict[int, int] = field(default_factory=lambda: {})
    """Order in which the items of dedup tasks were keyed (on arrival, just
    before they join their batch), so the latest of equal items is known."""
    running: Counter[tuple[int, str | None]] = field(
        default_factory=lambda: Counter[tuple[int, str | None]]()
    )
    """Calls running now, per (task, None) and per (task, group key)."""
    peak: Counter[tuple[int, str | None]] = field(
        default_factory=lambda: Counter[tuple[int, str | None]]()
    )
    """The most calls that ran at once, counted like `running`."""
    loop_lag: float = 0.0
    """The longest the event loop was late for a timer during the example: a
    timer cannot fire earlier than the loop gets to it, on any machine."""


def declare(broker: InMemoryBroker, run: Run, example: int) -> list[Any]:
    """Declare the scenario's tasks; each records its calls in `run.calls`."""
    loop = asyncio.get_running_loop()
    scenario = run.scenario
    fates = [item.fate for item in scenario.items]
    arrivals = itertools.count()

    def weigh(x: int) -> int:
        return scenario.items[x].weight

    def key_of(x: int) -> tuple[str, int]:
        run.arrived.setdefault(x, next(arrivals))
        return dedup_key(scenario, x)

    async def respond(call: Call, spec: TaskSpec) -> list[int]:
        """Sleep, then return the call's value or raise its failures."""
        if spec.call_delay:
            await asyncio.sleep(spec.call_delay)
        if any(fates[x] == "poison" for x in call.items):
            raise CallFailed(f"call {call.id} failed")
        errors: dict[int, BaseException] = {
            i: ItemFailed(f"item {x} failed")
            for i, x in enumerate(call.items)
            if fates[x] == "fail"
        }
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

    declared: list[Any] = []
    for t, spec in enumerate(scenario.tasks):

        async def process(
            items: list[int], key: str, t: int = t, spec: TaskSpec = spec
        ) -> list[int]:
            call = Call(len(run.calls), t, key, tuple(items), loop.time())
            run.calls.append(call)
            # Calls running at once, of the task and of its group key.
            counted = ((t, None), (t, key))
            for slot in counted:
                run.running[slot] += 1
                run.peak[slot] = max(run.peak[slot], run.running[slot])
            try:
                return await respond(call, spec)
            finally:
                for slot in counted:
                    run.running[slot] -= 1

        shaping: dict[str, Any] = {
            "max_weight": spec.max_weight,
            "weight": None if spec.max_weight is None else weigh,
            "max_concurrent_calls": spec.max_calls,
            "max_concurrent_calls_per_key": spec.max_calls_per_key,
            "debounce": spec.debounce,
            "dedup_key": key_of if spec.dedup else None,
            "adaptive": spec.adaptive,
        }
        decorate: Any = batch_task(
            broker,
            batch_size=spec.batch_size,
            batch_timeout=spec.batch_timeout,
            results=spec.results,  # type: ignore[arg-type]  # drawn at random
            bisect_on_error=spec.bisect,
            task_name=f"stress_{example}_{t}",
            **shaping,
        )
        declared.append(decorate(process))
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
    """Whether items `x` and `y` share task, group key and dedup key."""
    a, b = scenario.items[x], scenario.items[y]
    return (a.task, a.key) == (b.task, b.key) and dedup_key(scenario, x) == dedup_key(
        scenario, y
    )


def passed_instead(run: Run, x: int, holding: dict[int, list[Call]]) -> int:
    """The item whose outcome item `x` got: `x` itself unless a duplicate.

    A duplicate's outcome names the item passed in its place, or its call
    (which then holds exactly one item equal to it).
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

    The batches of one task and key take its items in arrival order, one
    batch after another, so the items of that task and key that arrived from
    a duplicate to the item passed in its place were all in their batch: at
    most ``batch_size`` of them, weighing at most ``max_weight`` together,
    and those equal to the passed item were folded into it too.
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
            if (other.task, other.key) == (item.task, item.key)
            and run.arrived[x] <= run.arrived[z] <= run.arrived[y]
        ]
        assert len(batch) <= spec.batch_size, (x, y, batch)
        if spec.max_weight is not None:
            weight = sum(scenario.items[z].weight for z in batch)
            assert weight <= spec.max_weight, (x, y, batch, weight)
        for z in batch:
            if items_equal(scenario, z, y):
                assert instead[z] == y, f"{z} not folded into {y} with {x}: {batch}"


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

    # Calls: non-empty, distinct items of one task and key, within batch_size
    # and max_weight, no two items with equal dedup keys.
    holding: dict[int, list[Call]] = {x: [] for x in range(count)}
    for call in run.calls:
        spec = scenario.tasks[call.task]
        assert call.items, f"empty call {call}"
        assert len(set(call.items)) == len(call.items), f"duplicate in {call}"
        assert len(call.items) <= spec.batch_size, f"over batch_size: {call}"
        for x in call.items:
            assert 0 <= x < count, f"unknown item in {call}"
            assert (items[x].task, key_name(items[x].key)) == (call.task, call.key), (
                f"item {x} ({items[x]}) in a call of another task or key: {call}"
            )
            holding[x].append(call)
        if spec.max_weight is not None and len(call.items) > 1:
            weight = sum(items[x].weight for x in call.items)
            assert weight <= spec.max_weight, f"weighs {weight}: {call}"
        keys = {dedup_key(scenario, x) for x in call.items}
        assert len(keys) == len(call.items), f"equal dedup keys in {call}"

    # Calls running at once, counted inside the function.
    for (t, key), peak in run.peak.items():
        spec = scenario.tasks[t]
        limit = spec.max_calls if key is None else spec.max_calls_per_key
        assert limit is None or peak <= limit, (
            f"task {t} key {key}: {peak} calls at once, limit {limit}"
        )

    instead = [passed_instead(run, x, holding) for x in range(count)]
    check_duplicates(run, instead)

    for x, item in enumerate(items):
        spec = scenario.tasks[item.task]
        # Its outcome is that of the item passed in its place (itself, or
        # the latest equal item of its batch).
        y = instead[x]
        passed = items[y]
        calls = holding[y]
        poisoned = [any(items[z].fate == "poison" for z in c.items) for c in calls]
        final = calls[-1]
        if spec.bisect:
            # Earlier calls were re-split because they raised; the last settles.
            assert all(poisoned[:-1]), f"item {y} repeated after success: {calls}"
            assert all(len(c.items) > 1 for c in calls[:-1]), calls
            assert not poisoned[-1] or final.items == (y,), calls
            assert len(calls) <= 1 + math.ceil(math.log2(spec.batch_size)), calls
            assert run.results[x].is_err == (passed.fate != "ok"), (x, y, passed)
        else:
            assert len(calls) == 1, f"item {y} passed {len(calls)} times: {calls}"

        result = run.results[x]
        if poisoned[-1]:
            expected_error: tuple[type, str] | None = (
                CallFailed,
                f"call {final.id} failed",
            )
        elif passed.fate == "fail":
            expected_error = (ItemFailed, f"item {y} failed")
        else:
            expected_error = None
        if expected_error is None:
            assert not result.is_err, (x, y, passed, result.error)
            if spec.results == "shared":
                expected: Any = [final.id, *final.items]
            else:
                expected = per_item_value(y, item.task, key_name(item.key))
            assert result.return_value == expected, (x, y, passed, final)
        else:
            assert result.is_err, (x, y, passed, result.return_value)
            error = result.error
            assert (type(error), str(error)) == expected_error, (x, y, error)

        # Waited at most batch_timeout plus one call (and a generous margin,
        # plus however late the event loop ran timers in this example) from
        # its kiq to the start of the first call holding it. With a call
        # limit, waiting for a call slot comes on top: not bounded here.
        if spec.max_calls is None and spec.max_calls_per_key is None:
            waited = calls[0].started - run.kiq_at[x]
            bound = (
                spec.batch_timeout + spec.call_delay + LATENESS_MARGIN + run.loop_lag
            )
            assert waited <= bound, f"item {x} waited {waited:.3f}s > {bound:.3f}s"


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
    # for every error result it cannot parse to the return type (task): far
    # too many here. What they report is asserted on below.
    loggers = [logging.getLogger(f"taskiq.{name}") for name in QUIET_LOGGERS]
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
