"""bench/fleet_sim.py, small: its fleet fills, moves few keys, loses nothing."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from batchtask._fleet import owner_of

_PATH = Path(__file__).parent.parent / "bench" / "fleet_sim.py"
_spec = importlib.util.spec_from_file_location("fleet_sim", _PATH)
assert _spec is not None
assert _spec.loader is not None
sim = importlib.util.module_from_spec(_spec)
sys.modules["fleet_sim"] = sim
_spec.loader.exec_module(sim)

CFG = sim.Config(
    machines=5,
    procs=8,
    keys=2000,
    rate=4000.0,
    duration=8.0,
    batch_size=50,
    churn=2,
    claim_idle=2.0,
)


@pytest.fixture(scope="module")
def world():
    routes = sim.route_names(CFG.keys)
    tl = sim.build_timeline(CFG, routes)
    times, keys = sim.arrivals(CFG)
    runs = {
        (mode, churn): sim.simulate(
            CFG, mode, tl, times, keys, churn=churn, record=True
        )
        for mode in ("big", "fleet", "local")
        for churn in (False, True)
        if not (mode == "big" and churn)
    }
    return routes, tl, runs


def test_every_item_is_called_exactly_once(world):
    _routes, _tl, runs = world
    for (mode, churn), r in runs.items():
        assert r.called is not None
        assert r.called_items == r.items == len(r.called), (mode, churn)
        counts = Counter(r.called)
        assert len(counts) == r.items, (mode, churn)
        assert set(counts.values()) == {1}, (mode, churn)
        assert min(counts) == 0
        assert max(counts) == r.items - 1
    churned = runs["fleet", True]
    # the churn run went through the paths that could lose or double items
    assert churned.reclaimed > 0
    assert churned.claimed > 0
    assert churned.reclaim_calls >= 2 * CFG.procs


def test_fleet_fills_more_than_each_process_alone(world):
    _routes, _tl, runs = world
    big = runs["big", False].fill
    fleet = runs["fleet", False].fill
    local = runs["local", False].fill
    assert fleet > 2 * local
    assert fleet >= 0.95 * big
    assert runs["fleet", True].fill > 2 * runs["local", True].fill
    assert runs["fleet", False].moved > 0
    assert runs["fleet", False].move_calls <= runs["fleet", False].moved


def test_owner_is_batchtask_owner_of(world):
    routes, tl, _runs = world
    assert len(tl.owners) > 3  # joins and expiries made new versions
    for members, owners in zip(tl.members, tl.owners, strict=True):
        names = [tl.names[p] for p in sorted(members)]
        for k in range(0, len(routes), 7):
            assert tl.names[owners[k]] == owner_of(names, routes[k])
    first = [tl.names[p] for p in range(CFG.processes)]
    assert sim.initial_owners(first, routes[:50]) == tl.owners[0][:50]


def test_keys_moved_per_join_and_leave_near_one_nth(world):
    routes, tl, _runs = world
    moved = sim.keys_moved(CFG, tl, routes)
    n = CFG.processes
    assert len(moved.join) == CFG.churn * CFG.procs
    mean_join = sum(moved.join) / len(moved.join)
    assert mean_join == pytest.approx(len(routes) / (n + 1), rel=0.2)
    assert sum(moved.leave) == len(routes)  # each route has one owner
    assert max(moved.leave) < 3 * len(routes) / n
    # a whole machine joining moves about procs/(n + procs) of the routes
    for count in moved.machine_join:
        assert count == pytest.approx(len(routes) * 8 / (n + 8), rel=0.25)
    # the join counted is what the real owner_of changes
    joiner = n
    before = [tl.names[p] for p in range(n)]
    after = [*before, tl.names[joiner]]
    changed = sum(owner_of(before, r) != owner_of(after, r) for r in routes)
    assert changed == moved.join[0]


def test_main_quick_prints_the_tables(capsys):
    sim.main(["--quick", "--machines", "3", "--keys", "300", "--duration", "4"])
    out = capsys.readouterr().out
    for text in ("fill", "keys moved per join", "server operations", "beats"):
        assert text in out


def test_a_hot_route_stays_where_it_is_read():
    cfg = sim.Config(
        machines=1,
        procs=8,
        keys=200,
        rate=20000.0,
        duration=4.0,
        batch_size=50,
        churn=0,
    )
    routes = sim.route_names(cfg.keys)
    tl = sim.build_timeline(cfg, routes)
    times, keys = sim.arrivals(cfg)
    fleet = sim.simulate(cfg, "fleet", tl, times, keys, churn=False, record=True)
    local = sim.simulate(cfg, "local", tl, times, keys, churn=False)
    assert fleet.hot_local > 0.1 * fleet.items  # the top keys fill batches here
    assert fleet.moved + fleet.hot_local < fleet.items
    assert fleet.fill > local.fill
    assert sorted(fleet.called or []) == list(range(fleet.items))
