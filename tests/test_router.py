"""`batchtask._fleet.Router` by itself: owners, the hot rule, a stale view."""

import asyncio
import logging
import random
import time
from typing import Any, cast

import pytest
from taskiq import InMemoryBroker

from batchtask import batch_task
from batchtask._fleet import Router, owner_of
from batchtask.brokers._base import RouteServer
from tests.conftest import within


def router(members: list[str], me: str) -> Router:
    """A router that sees `members` (trusted for a minute), as member `me`."""
    made = Router(cast(RouteServer, object()))
    made.member = me
    made.members = tuple(members)
    made.valid_until = time.monotonic() + 60
    return made


def owner(made: Router, key: str) -> str:
    """Whom `made` sends route `key` to (itself when it keeps it)."""
    return made.route(key, 10**9, 60.0) or made.member


def test_owners_follow_joins_and_leaves_as_owner_of_over_the_new_members() -> None:
    """The owners kept across membership changes are exactly `owner_of`
    over the members after each change (joins, leaves, both at once)."""
    rng = random.Random(7)
    members = [f"m{i}" for i in range(40)]
    made = router(members, "m0")
    keys = [f"task\0({i},)\0[]" for i in range(3000)]
    for key in keys:
        owner(made, key)
    spare = [f"n{i}" for i in range(100)]
    for _ in range(30):
        new = list(made.members)
        for _ in range(rng.randint(0, 3)):
            new.remove(rng.choice([m for m in new if m != "m0"]))
        for _ in range(rng.randint(0, 3)):
            new.append(spare.pop())
        made._rehome(made.members, new)
        made.members = tuple(new)
        assert [owner(made, key) for key in keys] == [
            owner_of(new, key) for key in keys
        ]


def test_a_join_moves_only_the_routes_the_joiner_wins() -> None:
    members = [f"m{i}" for i in range(20)]
    made = router(members, "m0")
    keys = [f"k{i}" for i in range(2000)]
    before = {key: owner(made, key) for key in keys}
    made._rehome(made.members, [*members, "new"])
    made.members = (*members, "new")
    moved = {key for key in keys if owner(made, key) != before[key]}
    assert moved == {key for key in keys if owner_of(made.members, key) == "new"}
    assert 0 < len(moved) < 2000 / 21 * 2


def test_a_route_that_fills_a_batch_here_stays_here() -> None:
    members = ["a", "b"]
    made = router(members, "a")
    key = next(k for k in (f"k{i}" for i in range(100)) if owner_of(members, k) == "b")
    sent = [made.route(key, 5, 60.0) for _ in range(8)]
    assert sent[:4] == ["b"] * 4, "routed to its owner until it is hot here"
    assert sent[4:] == [None] * 4, "batched here once a batch filled in one window"


def test_a_move_is_made_only_where_the_calls_it_saves_cost_more() -> None:
    """Batches of 40 here from 40 arrivals a window, 80 at the owner of
    two members: a move saves 1/40 - 1/80 of a call per item. A call of 1 ms
    (and `CALL_OVERHEAD`) saves 14 µs, less than a move (`MOVE_COST`):
    batched here; a call of 50 ms saves 626 µs: moved; a call not known yet
    (or a ``dedup_key`` task, which passes None): moved."""
    members = ["a", "b"]
    key = next(k for k in (f"k{i}" for i in range(100)) if owner_of(members, k) == "b")
    for call, expected in ((1e-3, None), (50e-3, "b"), (None, "b")):
        made = router(members, "a")
        sent = [made.route(key, 100, 60.0, call) for _ in range(40)]
        assert sent[-1] == expected, call
    cheap = router(members, "a")
    first = cheap.route(key, 100, 60.0, 1e-3)
    assert first == "b", "the first items of a window move: few here yet"


def test_no_routing_alone_or_on_a_stale_view() -> None:
    alone = router(["a"], "a")
    assert alone.route("k", 100, 1.0) is None
    members = ["a", "b"]
    stale = router(members, "a")
    key = next(k for k in (f"k{i}" for i in range(100)) if owner_of(members, k) == "b")
    assert stale.route(key, 100, 1.0) == "b"
    stale.valid_until = time.monotonic() - 1
    assert stale.route(key, 100, 1.0) is None, "a view past its validity moves nothing"


def test_a_stale_view_and_a_failed_move_are_warned_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Batching per process because the fleet's view is too old (a late
    heartbeat) or because a move failed is said, once a minute for each,
    and counted."""
    members = ["a", "b"]
    made = router(members, "a")
    key = next(k for k in (f"k{i}" for i in range(100)) if owner_of(members, k) == "b")
    made.valid_until = time.monotonic() - 1
    with caplog.at_level(logging.WARNING, logger="batchtask"):
        for _ in range(3):
            assert made.route(key, 100, 1.0) is None
            made.move_failed(TimeoutError())
    said = [record.getMessage() for record in caplog.records]
    assert made.stale_routes == 3
    assert made.unmoved == 3
    assert len(said) == 2, said
    assert "view of the fleet is 4.5 s old" in said[0]
    assert "moving a delivery" in said[1]
    assert "TimeoutError()" in said[1]


def test_a_refused_member_leaves_the_view_at_once() -> None:
    """`Router.gone`: the routes of a member the server refused a move to
    go to their next owners before the next beat; a view of one is no view."""
    members = [f"m{i}" for i in range(10)]
    made = router(members, "m0")
    keys = [f"k{i}" for i in range(500)]
    for key in keys:
        owner(made, key)
    made.gone("m3")
    assert "m3" not in made.members
    rest = [m for m in members if m != "m3"]
    assert [owner(made, key) for key in keys] == [owner_of(rest, key) for key in keys]
    made.gone("m0")
    assert "m0" in made.members, "this process never drops itself"
    two = router(["a", "b"], "a")
    two.gone("b")
    assert two.owner("k") is None, "alone: batched here"


async def test_a_batch_task_knows_what_its_calls_take() -> None:
    """`BatchTask.call_seconds`, the move rule's cost of a call: None before
    the first call, then a moving average of the function's calls."""
    broker = InMemoryBroker()
    pauses = iter([0.05, 0.15])

    @batch_task(broker, batch_size=1, batch_timeout=1.0)
    async def save(rows: list[int]) -> None:
        await asyncio.sleep(next(pauses))

    await broker.startup()
    try:
        assert save.call_seconds is None
        await within((await save.kiq(1)).wait_result(timeout=10), 20)
        first = save.call_seconds
        assert first is not None
        assert 0.05 <= first < 0.15
        await within((await save.kiq(2)).wait_result(timeout=10), 20)
        second = save.call_seconds
        assert second is not None
        assert first < second < 0.15, "averaged, not replaced"
    finally:
        await broker.shutdown()


async def test_a_move_that_starts_after_its_route_became_hot_is_batched_here() -> None:
    """One read brought a whole batch of a route owned elsewhere.

    The first deliveries are routed to the owner before the last makes the
    route hot here; their moves start after the read's loop turn, see the
    route hot, and batch them here with the rest (none moves).
    """
    from taskiq import TaskiqMessage

    from batchtask._native import NativePath

    members = ["a", "b"]
    made = router(members, "a")
    key = next(k for k in (f"k{i}" for i in range(100)) if owner_of(members, k) == "b")
    cold = next(k for k in (f"c{i}" for i in range(100)) if owner_of(members, k) == "b")
    sent = [made.route(key, 5, 60.0) for _ in range(5)]
    assert sent == ["b", "b", "b", "b", None]
    assert made.route(cold, 5, 60.0) == "b"
    assert made.hot(key)
    assert not made.hot(cold)

    moved: list[object] = []

    class Server:
        async def forward(self, member: str, data: object) -> None:
            moved.append(data)

    made.server = cast(RouteServer, Server())
    path = NativePath.__new__(NativePath)
    path.router = made
    path.ended = None
    here: list[object] = []
    path._take_here = lambda task, message, data, slot: here.append(data)  # type: ignore[method-assign]
    message = TaskiqMessage(task_id="m", task_name="t", labels={}, args=[], kwargs={})
    for index in range(4):
        await path._forward(cast(Any, None), message, f"d{index}", key, "b", False)
    await path._forward(cast(Any, None), message, "cold", cold, "b", False)
    assert here == ["d0", "d1", "d2", "d3"]
    assert moved == ["cold"], "a route that is not hot here still moves"
