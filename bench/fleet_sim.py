"""Fleet mode at scale, simulated: fill, keys moved per join and leave, server ops.

    .venv/bin/python bench/fleet_sim.py [--machines 100] [--procs 8]
        [--keys 10000] [--zipf 1.1] [--rate 50000] [--duration 20]
        [--batch-size 100] [--batch-timeout 1.0] [--churn 10] [--quick]

No server runs: a discrete-event simulation of a Redis-stream taskiq fleet of
``machines x procs`` worker processes. Ownership is the real one:
`batchtask._fleet.owner_of` (and `rendezvous` for a join's comparison) over
the route strings `batchtask._fleet.route_key` makes. Modelled:

- arrivals: Poisson at ``--rate`` items/s in total, keys Zipf(``--zipf``)
  over ``--keys`` routes; the stream hands each delivery to a random live
  process (what a consumer group does);
- the batch rule: a batch of a key in a process is called at ``batch_size``
  items or ``batch_timeout`` after its first item;
- fleet mode, as `batchtask._fleet.Router.route`: each process sees the
  membership of its last beat (every `BEAT_EVERY` s, its own phase); a route
  that fills a batch within one window in a process by itself is hot there
  for `HOT_FOR` windows and stays local; a delivery of a route another member
  owns moves to that owner's inbox (one script call per process per loop
  turn of ``--turn`` s that moves something) and is batched there ``--hop``
  s later; a move to a process no longer a member fails (the script checks)
  and is batched where it is;
- churn (``--churn N``: N machines die and N new ones join, alternating,
  over the middle 80 % of the run): a dead process's membership expires
  `MEMBER_TTL` after its last beat, when the next beat reclaims its inbox
  back to the queue (rounds of `RECLAIM_COUNT`); what it held unacked is
  claimed by another process after ``--claim-idle`` s.

Compared: one big worker (every item in one process), fleet mode, and
``fleet=False`` (each process batches what it reads). Every item is called
exactly once (checked at the end of each run).
"""

import argparse
import bisect
import heapq
import itertools
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from batchtask._fleet import (
    BEAT_EVERY,
    HOT_FOR,
    MEMBER_TTL,
    RECLAIM_COUNT,
    Router,
    owner_of,
    rendezvous,
    route_key,
)
from batchtask.brokers._base import RouteServer

TASK = "app:store_rows"


@dataclass
class Config:
    """One simulation's parameters."""

    machines: int = 100
    procs: int = 8
    keys: int = 10_000
    zipf: float = 1.1
    rate: float = 50_000.0
    duration: float = 20.0
    batch_size: int = 100
    batch_timeout: float = 1.0
    hop: float = 0.002
    """Seconds from a move to the owner reading it from its inbox."""
    turn: float = 0.002
    """Seconds of one read loop turn (moves of one turn share a script call)."""
    churn: int = 10
    claim_idle: float = 10.0
    seed: int = 1

    @property
    def processes(self) -> int:
        """Worker processes at the start."""
        return self.machines * self.procs


def member_name(process: int) -> str:
    """A process's member name (host:pid:tag, as `Router` makes one)."""
    return f"host{process // 8:04d}:{1000 + process % 8}:{process * 7919:08x}:m"


def route_names(keys: int) -> list[str]:
    """The route of each key index, as `route_key` names it."""
    return [route_key(TASK, [None, f"tenant-{k}"], {}) for k in range(keys)]


# -- membership over time and each route's owner per view ----------------------


@dataclass
class Timeline:
    """Membership changes, the owners per membership version, churn events."""

    names: list[str]
    """Member name of each process index (joiners after the first ones)."""
    change_times: list[float]
    """When each version became the server's membership (first: -inf)."""
    members: list[frozenset[int]]
    """The live members of each version."""
    owners: list[list[int]]
    """Owner (process index) of each route, per version."""
    events: list[tuple[float, str, int]]
    """(time, "join" | "die" | "expire", process) in time order."""
    phase: list[float]
    """Each process's beat phase in [0, BEAT_EVERY)."""
    joined: list[float]
    died: list[float]


def initial_owners(names: Sequence[str], routes: Sequence[str]) -> list[int]:
    """Each route's owner among `names` (indexes), by the real `owner_of`."""
    index = {name: i for i, name in enumerate(names)}
    members = list(names)
    return [index[owner_of(members, route)] for route in routes]


def build_timeline(cfg: Config, routes: Sequence[str]) -> Timeline:
    """The churn schedule and the owner of every route in every version."""
    rng = random.Random(cfg.seed + 7)
    n0 = cfg.processes
    n_all = n0 + cfg.churn * cfg.procs
    names = [member_name(p) for p in range(n_all)]
    phase = [rng.random() * BEAT_EVERY for _ in range(n_all)]
    joined = [0.0] * n0 + [math.inf] * (n_all - n0)
    died = [math.inf] * n_all
    raw: list[tuple[float, str, int]] = []
    leavers = rng.sample(range(cfg.machines), cfg.churn)
    steps = 2 * cfg.churn
    for i in range(steps):
        at = cfg.duration * (0.1 + 0.8 * i / max(steps - 1, 1))
        j = i // 2
        if i % 2 == 0:  # a machine dies (all its processes at once)
            for p in range(leavers[j] * cfg.procs, (leavers[j] + 1) * cfg.procs):
                died[p] = at
                raw.append((at, "die", p))
                last_beat = at - ((at - phase[p]) % BEAT_EVERY)
                raw.append((last_beat + MEMBER_TTL, "expire", p))
        else:  # a new machine joins
            for p in range(n0 + j * cfg.procs, n0 + (j + 1) * cfg.procs):
                joined[p] = at
                phase[p] = at % BEAT_EVERY
                raw.append((at, "join", p))
    raw.sort()
    owners = initial_owners(names[:n0], routes)
    best = [rendezvous(names[o], r) for o, r in zip(owners, routes, strict=True)]
    live = set(range(n0))
    tl = Timeline(
        names,
        [-math.inf],
        [frozenset(live)],
        [owners],
        raw,
        phase,
        joined,
        died,
    )
    for at, kind, p in raw:
        if kind == "die":
            continue  # still a member until its membership expires
        owners = list(owners)
        if kind == "join":
            live.add(p)
            name = names[p]
            for k, route in enumerate(routes):
                score = rendezvous(name, route)
                if score > best[k]:
                    best[k], owners[k] = score, p
        else:
            live.discard(p)
            members = [names[q] for q in sorted(live)]
            index = {names[q]: q for q in live}
            for k, route in enumerate(routes):
                if owners[k] == p:
                    owners[k] = index[owner_of(members, route)]
                    best[k] = rendezvous(names[owners[k]], route)
        if tl.change_times[-1] == at:  # same instant: one version
            tl.members[-1], tl.owners[-1] = frozenset(live), owners
        else:
            tl.change_times.append(at)
            tl.members.append(frozenset(live))
            tl.owners.append(owners)
    return tl


# -- keys moved per join and leave -----------------------------------------------


@dataclass
class Moved:
    """Routes whose owner changes on one member's join or leave."""

    join: list[int]
    leave: list[int]
    machine_join: list[int]
    machine_leave: list[int]
    routes: int
    members: int


def keys_moved(cfg: Config, tl: Timeline, routes: Sequence[str]) -> Moved:
    """Count, against the starting membership, moved routes per join and leave."""
    n0 = cfg.processes
    owners = tl.owners[0]
    best = [rendezvous(tl.names[o], r) for o, r in zip(owners, routes, strict=True)]
    joiners = list(range(n0, len(tl.names))) or [n0]
    names = tl.names if joiners[0] < len(tl.names) else [*tl.names, "extra:1:0:m"]
    join_scores = {
        p: [rendezvous(names[p], route) for route in routes] for p in joiners
    }
    join = [
        sum(s > b for s, b in zip(join_scores[p], best, strict=True)) for p in joiners
    ]
    held = [0] * n0
    for o in owners:
        held[o] += 1
    machine_join = []
    for m in range(len(joiners) // cfg.procs):
        group = joiners[m * cfg.procs : (m + 1) * cfg.procs]
        machine_join.append(
            sum(
                max(join_scores[p][k] for p in group) > best[k]
                for k in range(len(routes))
            )
        )
    machine_leave = [
        sum(held[m * cfg.procs : (m + 1) * cfg.procs]) for m in range(cfg.machines)
    ]
    return Moved(join, held, machine_join, machine_leave, len(routes), n0)


# -- the event simulation ------------------------------------------------------


@dataclass
class Result:
    """What one run measured."""

    mode: str
    items: int = 0
    calls: int = 0
    called_items: int = 0
    moved: int = 0
    move_calls: int = 0
    failed_moves: int = 0
    refused_reclaimed: int = 0
    rerouted: int = 0
    """Refused moves of entries a reclaim had put back on the queue."""
    reads: int = 0
    hot_local: int = 0
    beats: float = 0.0
    reclaim_calls: int = 0
    reclaimed: int = 0
    claimed: int = 0
    process_seconds: float = 0.0
    window_calls: int = 0
    window_items: int = 0
    """Calls (and their items) whose first item arrived in the churn window."""
    called: list[int] | None = field(default=None, repr=False)

    @property
    def fill(self) -> float:
        """Mean batch size: items per call."""
        return self.called_items / self.calls if self.calls else 0.0

    @property
    def window_fill(self) -> float:
        """Mean batch size of the calls begun during the churn window."""
        return self.window_items / self.window_calls if self.window_calls else 0.0


def churn_window(cfg: Config) -> tuple[float, float]:
    """From the first churn event to a membership's time after the last."""
    return 0.1 * cfg.duration, min(cfg.duration, 0.9 * cfg.duration + MEMBER_TTL)


def zipf_cum_weights(keys: int, s: float) -> list[float]:
    """Cumulative Zipf(`s`) weights of `keys` ranks (rank 1 first)."""
    return list(itertools.accumulate(1.0 / (k**s) for k in range(1, keys + 1)))


def arrivals(cfg: Config) -> tuple[list[float], list[int]]:
    """Arrival times and key indexes (the same for every mode)."""
    rng = random.Random(cfg.seed)
    n = int(cfg.rate * cfg.duration)
    times = sorted(rng.random() * cfg.duration for _ in range(n))
    keys = rng.choices(
        range(cfg.keys), cum_weights=zipf_cum_weights(cfg.keys, cfg.zipf), k=n
    )
    return times, keys


def simulate(
    cfg: Config,
    mode: str,
    tl: Timeline,
    times: Sequence[float],
    keys: Sequence[int],
    *,
    churn: bool,
    record: bool = False,
) -> Result:
    """Run `mode` ("big", "fleet" or "local") over the arrivals; count calls."""
    res = Result(mode, items=len(times))
    if record:
        res.called = []
    called = res.called
    bsize, btimeout, hop, turn = cfg.batch_size, cfg.batch_timeout, cfg.hop, cfg.turn
    hot_span = HOT_FOR * btimeout
    n_all = len(tl.names)
    n0 = cfg.processes
    rng = random.Random(cfg.seed + 1)
    big = mode == "big"
    fleet = mode == "fleet"
    alive = list(range(1 if big else n0))
    alive_pos = {p: i for i, p in enumerate(alive)}
    server_member = [p < n0 for p in range(n_all)]
    dead = [False] * n_all
    reclaimed_done = [False] * n_all
    inbox: list[list[tuple[int, int]]] = [[] for _ in range(n_all)]
    batches: list[dict[int, list]] = [{} for _ in range(n_all)]
    rates: list[dict[int, list[float]]] = [{} for _ in range(n_all)]
    last_move_turn = [-1] * n_all
    last_read_turn = [-1] * n_all
    phase = tl.phase
    change_times = tl.change_times if churn else tl.change_times[:1]
    all_owners = tl.owners if churn else tl.owners[:1]
    heap: list[tuple[float, int, int, int, int, int]] = []
    seq = itertools.count()
    # heap kinds: 0 inbox arrival (proc, key, item); 1 redelivery (key, item,
    # 0 claimed, 1 first delivery, 2 reclaimed); 2 churn event (index into tl.events)
    INBOX, REDELIVER, CHURN = 0, 1, 2
    if churn and not big:
        for i, (at, _kind, _p) in enumerate(tl.events):
            heapq.heappush(heap, (at, next(seq), CHURN, i, 0, 0))
    calls = called_items = 0
    w_start, w_end = churn_window(cfg)

    def call(items: list[int]) -> None:
        nonlocal calls, called_items
        calls += 1
        called_items += len(items)
        if w_start <= times[items[0]] < w_end:
            res.window_calls += 1
            res.window_items += len(items)
        if called is not None:
            called.extend(items)

    def batch(q: int, k: int, item: int, now: float) -> None:
        open_ = batches[q]
        b = open_.get(k)
        if b is not None and now >= b[0] + btimeout:
            call(b[1])
            b = None
        if b is None:
            open_[k] = [now, [item]]
            if bsize == 1:
                call(open_.pop(k)[1])
            return
        b[1].append(item)
        if len(b[1]) >= bsize:
            call(b[1])
            del open_[k]

    def read(q: int, now: float) -> None:
        slot = int(now / turn)
        if last_read_turn[q] != slot:
            last_read_turn[q] = slot
            res.reads += 1

    def deliver(
        k: int, item: int, now: float, first: bool, again: bool = False
    ) -> None:
        """A delivery read from the queue by a random live process."""
        q = alive[rng.randrange(len(alive))]
        read(q, now)
        if fleet and first:
            rq = rates[q]
            r = rq.get(k)
            if r is None:
                r = rq[k] = [now, 0.0, 0.0]
            elif now - r[0] >= btimeout:
                r[0], r[1] = now, 0.0
            r[1] += 1
            if r[1] >= bsize:
                r[2] = now + hot_span
            if now < r[2]:
                res.hot_local += 1
            else:
                ph = phase[q]
                last_beat = now - ((now - ph) % BEAT_EVERY)
                v = bisect.bisect_right(change_times, last_beat) - 1
                owner = all_owners[v][k]
                if owner != q:
                    slot = int(now / turn)
                    if last_move_turn[q] != slot:
                        last_move_turn[q] = slot
                        res.move_calls += 1
                    if server_member[owner]:
                        res.moved += 1
                        heapq.heappush(
                            heap, (now + hop, next(seq), INBOX, owner, k, item)
                        )
                        return
                    res.failed_moves += 1
                    if again:
                        res.refused_reclaimed += 1
                    # Router.gone: the refused owner leaves this process's
                    # view, the move goes to the route's next owner (as of the
                    # server's membership now), once.
                    v_now = bisect.bisect_right(change_times, now) - 1
                    second = all_owners[v_now][k]
                    if second not in (q, owner) and server_member[second]:
                        res.move_calls += 1
                        res.moved += 1
                        res.rerouted += 1
                        heapq.heappush(
                            heap, (now + 2 * hop, next(seq), INBOX, second, k, item)
                        )
                        return
        batch(q, k, item, now)

    def churn_event(i: int, now: float) -> None:
        _at, kind, p = tl.events[i]
        if kind == "join":
            alive_pos[p] = len(alive)
            alive.append(p)
            server_member[p] = True
        elif kind == "die":
            dead[p] = True
            j = alive_pos.pop(p)
            last = alive.pop()
            if last != p:
                alive[j] = last
                alive_pos[last] = j
            for k, (first, items) in batches[p].items():
                if now >= first + btimeout:
                    call(items)  # it was called before the death
                    continue
                for item in items:  # held unacked: claimed after the idle time
                    res.claimed += 1
                    heapq.heappush(
                        heap,
                        (now + cfg.claim_idle, next(seq), REDELIVER, k, item, 0),
                    )
            batches[p].clear()
        else:  # expire: the next beat reclaims its inbox back to the queue
            server_member[p] = False
            reclaimed_done[p] = True
            entries = inbox[p]
            res.reclaim_calls += len(entries) // RECLAIM_COUNT + 1
            res.reclaimed += len(entries)
            for k, item in entries:
                heapq.heappush(heap, (now, next(seq), REDELIVER, k, item, 2))
            entries.clear()

    def run_heap(until: float) -> None:
        while heap and heap[0][0] <= until:
            now, _s, kind, a, b, c = heapq.heappop(heap)
            if kind == INBOX:
                if dead[a]:
                    if reclaimed_done[a]:  # reclaimed with the rest
                        res.reclaimed += 1
                        heapq.heappush(heap, (now, next(seq), REDELIVER, b, c, 2))
                    else:
                        inbox[a].append((b, c))
                else:
                    read(a, now)
                    batch(a, b, c, now)
            elif kind == REDELIVER:
                deliver(a, b, now, c > 0, c == 2)
            else:
                churn_event(a, now)

    for item, now in enumerate(times):
        if heap and heap[0][0] <= now:
            run_heap(now)
        deliver(keys[item], item, now, True)
    run_heap(math.inf)
    for open_ in batches:
        for _first, items in open_.values():
            call(items)
        open_.clear()
    res.calls, res.called_items = calls, called_items
    # processes alive over [0, duration] (beats: one per process per BEAT_EVERY)
    end = cfg.duration
    if big:
        res.process_seconds = end
    else:
        ids = range(n_all) if churn else range(n0)
        res.process_seconds = sum(
            max(0.0, min(end, tl.died[p] if churn else end) - tl.joined[p])
            for p in ids
            if tl.joined[p] < end
        )
    res.beats = res.process_seconds / BEAT_EVERY
    return res


# -- the report ---------------------------------------------------------------


def run(cfg: Config, out=None) -> dict[str, object]:
    """Simulate every mode, print the tables; return what was measured."""
    t0 = time.perf_counter()
    out = sys.stdout if out is None else out

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say("fleet_sim: batchtask fleet mode, simulated (no servers)")
    say(
        f"  fleet: {cfg.machines} machines x {cfg.procs} processes = "
        f"{cfg.processes} members; {cfg.keys} keys (routes), Zipf s={cfg.zipf}"
    )
    say(
        f"  load: {cfg.rate:g} items/s for {cfg.duration:g} s "
        f"({int(cfg.rate * cfg.duration)} items); batch_size={cfg.batch_size}, "
        f"batch_timeout={cfg.batch_timeout:g} s"
    )
    say(
        f"  fleet rules (batchtask._fleet): BEAT_EVERY={BEAT_EVERY:g} s, "
        f"MEMBER_TTL={MEMBER_TTL:g} s, HOT_FOR={HOT_FOR} windows, "
        f"RECLAIM_COUNT={RECLAIM_COUNT}; move hop={cfg.hop * 1000:g} ms, "
        f"loop turn={cfg.turn * 1000:g} ms, claim idle={cfg.claim_idle:g} s"
    )
    say(
        f"  churn run: {cfg.churn} machines die and {cfg.churn} join, alternating "
        f"over {0.1 * cfg.duration:g}..{0.9 * cfg.duration:g} s; seed={cfg.seed}"
    )
    routes = route_names(cfg.keys)
    tl = build_timeline(cfg, routes)
    t_owners = time.perf_counter() - t0
    times, keys = arrivals(cfg)
    results: dict[str, Result] = {}
    for name, mode, churn in (
        ("one big worker", "big", False),
        ("fleet", "fleet", False),
        ("fleet=False", "local", False),
        ("fleet, churn", "fleet", True),
        ("fleet=False, churn", "local", True),
    ):
        r = simulate(cfg, mode, tl, times, keys, churn=churn)
        if r.called_items != r.items:
            raise AssertionError(f"{name}: {r.called_items} called of {r.items}")
        results[name] = r
    moved = keys_moved(cfg, tl, routes)
    base = results["one big worker"].fill
    say()
    say("fill (mean batch size = items / calls)")
    say(f"  {'mode':<22}{'items':>10}{'calls':>10}{'fill':>9}{'vs one big':>12}")
    for name, r in results.items():
        say(
            f"  {name:<22}{r.items:>10}{r.calls:>10}{r.fill:>9.2f}"
            f"{r.fill / base:>11.2f}x"
        )
    w_start, w_end = churn_window(cfg)
    wbase = results["one big worker"].window_fill
    say(
        f"  during churn (calls begun {w_start:g}..{w_end:g} s): one big worker "
        f"{wbase:.2f}, fleet {results['fleet, churn'].window_fill:.2f} "
        f"({results['fleet, churn'].window_fill / wbase:.2f}x), fleet=False "
        f"{results['fleet=False, churn'].window_fill:.2f} "
        f"({results['fleet=False, churn'].window_fill / wbase:.2f}x)"
    )
    say()
    n = moved.members
    say(f"keys moved per join and leave ({moved.routes} routes, {n} members)")

    def stats(xs: Sequence[int]) -> str:
        return f"mean {sum(xs) / len(xs):7.2f}  min {min(xs):4d}  max {max(xs):4d}"

    join_ideal = moved.routes / (n + 1)
    leave_ideal = moved.routes / n
    say(
        f"  one member joins:   {stats(moved.join)}  ideal 1/{n + 1} of routes "
        f"= {join_ideal:.2f}  (over {len(moved.join)} joiners)"
    )
    say(
        f"  one member leaves:  {stats(moved.leave)}  ideal 1/{n} of routes "
        f"= {leave_ideal:.2f}  (over all {n} members)"
    )
    if moved.machine_join:
        say(
            f"  one machine joins:  {stats(moved.machine_join)}  ideal "
            f"{cfg.procs}/{n + cfg.procs} = "
            f"{moved.routes * cfg.procs / (n + cfg.procs):.2f}"
        )
    say(
        f"  one machine leaves: {stats(moved.machine_leave)}  ideal "
        f"{cfg.procs}/{n} = {moved.routes * cfg.procs / n:.2f}"
    )
    say()
    say("server operations per second (fleet mode; per process in brackets)")
    say(
        f"  {'run':<14}{'beats':>16}{'move scripts':>18}{'reads':>18}"
        f"{'reclaims*':>11}{'moved items/s':>15}"
    )
    for name in ("fleet", "fleet, churn"):
        r = results[name]
        procs = r.process_seconds / cfg.duration

        def cell(x: float, procs: float = procs, per: float = cfg.duration) -> str:
            return f"{x / per:9.0f} ({x / per / procs:5.2f})"

        say(
            f"  {name:<14}{cell(r.beats):>16}{cell(r.move_calls):>18}"
            f"{cell(r.reads):>18}{r.reclaim_calls:>11}{r.moved / cfg.duration:>15.0f}"
        )
    rc = results["fleet, churn"]
    say(
        f"  *total, not per second. churn: {rc.reclaim_calls} reclaim script "
        f"calls moved {rc.reclaimed} "
        f"inbox entries back to the queue; {rc.claimed} held items claimed "
        f"after the idle time; {rc.failed_moves} moves refused (owner no member), "
        f"{rc.refused_reclaimed} of them of reclaimed entries; {rc.rerouted} "
        "refused moves went on to the next owner"
    )
    rf = results["fleet"]
    say(
        f"  hot (batched where read): {rf.hot_local} of {rf.items} deliveries; "
        f"moved: {rf.moved} ({rf.moved / rf.items:.1%})"
    )
    probe = routes[: min(200, len(routes))]
    members = tl.names[: cfg.processes]
    t1 = time.perf_counter()
    for route in probe:
        owner_of(members, route)
    per_route = (time.perf_counter() - t1) / len(probe)
    change = router_change_cost(members, routes)
    say(
        f"  Router cost: owner_of over {cfg.processes} members takes "
        f"{per_route * 1e3:.2f} ms for a route first seen; a membership change "
        f"with all {cfg.keys} routes known takes a real Router "
        f"{change['leave'] * 1e3:.1f} ms for a leave, {change['join'] * 1e3:.1f} ms "
        f"for a join (only a leaver's routes are looked up again, "
        f"{per_route * cfg.keys / cfg.processes * 1e3:.1f} ms, when next seen)"
    )
    say()
    say(
        f"every item called exactly once in each run; owners computed in "
        f"{t_owners:.1f} s, total {time.perf_counter() - t0:.1f} s"
    )
    return {"results": results, "moved": moved, "timeline": tl}


def router_change_cost(members: list[str], routes: list[str]) -> dict[str, float]:
    """Seconds a real `Router` spends on one leave and one join.

    Of `members`, with every route of `routes` known (its owners kept,
    `Router._rehome`).
    """
    made = Router(cast(RouteServer, object()))
    made.member = members[0]
    made.members = tuple(members)
    made.valid_until = time.monotonic() + 3600
    for route in routes:
        made.route(route, 10**9, 3600.0)
    cost = {}
    for name, new in (("leave", members[:-1]), ("join", members)):
        t1 = time.perf_counter()
        made._rehome(made.members, new)
        cost[name] = time.perf_counter() - t1
        made.members = tuple(new)
    return cost


QUICK = {
    "machines": 10,
    "keys": 1000,
    "rate": 5000.0,
    "duration": 8.0,
    "batch_size": 50,
    "churn": 2,
    "claim_idle": 3.0,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Config()
    for name in (
        "machines",
        "procs",
        "keys",
        "zipf",
        "rate",
        "duration",
        "batch_size",
        "batch_timeout",
        "hop",
        "turn",
        "churn",
        "claim_idle",
        "seed",
    ):
        value = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(value), default=None
        )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for name, value in vars(args).items():
        if name != "quick" and value is not None:
            values[name] = value
    run(Config(**values))


if __name__ == "__main__":
    main()
