"""Call limits that hold across a fleet: leases on the broker's server, fenced.

``max_concurrent_calls`` and ``max_concurrent_calls_per_key`` bound the calls
of one worker process by themselves. Under `batchtask.BatchReceiver`, on a
broker whose adapter offers a `LeaseServer` (the Redis stream family, and
RabbitMQ and NATS with a taskiq-redis result backend), a call
of a limited task also takes a lease for each limit, so the limits hold for
every `BatchReceiver` worker on that broker, on every machine:

- A lease is one of ``limit`` slots of a name (the task; the task and the
  group key), granted by the server with its own clock and an expiry
  ``ttl`` ahead, and a fencing token (a counter that only grows). Slots go
  in the order processes first asked for them (a process that waits asks
  again with a growing pause, at most `PAUSES`'s last apart), so no waiter
  starves; a dead holder's slot comes free when its lease expires.
- The holder renews its leases while the call runs. It counts its lease as
  valid only until ``ttl`` after it *sent* the request that granted or last
  renewed it (by its own monotonic clock: no clock is compared across
  machines), less a margin. A holder that cannot renew by then stops the call
  (the call's task is cancelled) before the server could hand the slot to
  another process; its items end without a result or an ack, and the broker
  delivers them again.
- A call whose lease cannot be had because the server does not answer (for
  longer than ``ttl``) is not made: its items go back to the broker the same
  way, with a warning. The worker goes on; nothing waits without bound.

What this does not cover: workers without `BatchReceiver` (they take no
lease), and a sync function's thread, which a cancellation abandons but
cannot stop (see ``call_timeout``). docs/fleets.md has the failure table.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from batchtask.brokers._base import LeaseServer, RouteServer

logger = logging.getLogger("batchtask")

LEASE_TTL = 5.0
"""Seconds a lease lasts on the server unless renewed."""
RENEW_EVERY = LEASE_TTL / 5
"""Seconds between two renewals of a running call's leases."""
MARGIN = 1.5
"""Seconds before its lease could expire at which a holder stops its call."""
ASK_TIMEOUT = 1.0
"""Seconds one request to the server may take before it counts as unanswered."""
PAUSES = (0.01, 0.02, 0.04, 0.08, 0.1)
"""Pauses between asks for a full name (the last one repeats)."""


def margin_for(ttl: float) -> float:
    """Seconds before a lease or membership could expire that it is not trusted.

    `MARGIN`, or 30% of a shorter `ttl` (seconds).
    """
    return min(MARGIN, ttl * 0.3)


class LeaseUnavailable(Exception):
    """The lease server did not answer for longer than a lease lasts."""


class LeaseLost(LeaseUnavailable):
    """A call ended after its lease could have passed to another process.

    Its process could not renew in time (stopped, or its event loop held
    for longer than the lease's margin) and the server no longer has the
    lease (or does not answer): another process may have run the same items
    meanwhile, so the call's outcome is not kept; its items go back to the
    broker unacknowledged, as for a call stopped in time.
    """


@dataclass(eq=False, slots=True)
class Lease:
    """One slot held: its name, holder, token, and until when it is valid here."""

    name: str
    holder: str
    token: int
    valid_until: float
    """Monotonic time after which the server may have handed it on."""


_PROCESS = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class FleetLimits:
    """Takes a call's leases, keeps them while it runs, gives them back."""

    def __init__(self, server: LeaseServer, *, ttl: float = LEASE_TTL) -> None:
        """Keep leases on `server`, each lasting `ttl` seconds unless renewed."""
        self.server = server
        self.ttl = ttl
        self.renew_every = min(RENEW_EVERY, ttl / 5)
        self.margin = margin_for(ttl)
        self._held = 0
        self._warned_at = -1e9
        self.granted = 0
        """Leases granted so far (for tests and benchmarks)."""
        self.lost = 0
        """Calls stopped because their lease could not be renewed in time, or
        whose outcome was dropped because it lapsed while they ran."""

    @contextlib.asynccontextmanager
    async def calls(
        self,
        task_name: str,
        key: Hashable,
        max_calls: int | None,
        max_calls_per_key: int | None,
    ) -> AsyncGenerator[None]:
        """Hold the leases of one call of `task_name` for group `key` meanwhile.

        :raises LeaseUnavailable: if the server does not answer (the call
            must not be made).
        :raises LeaseLost: at the call's end, if a lease lapsed while it ran
            (its outcome must not be kept).
        """
        wanted: list[tuple[str, int]] = []
        if max_calls is not None:
            wanted.append((f"{task_name}", max_calls))
        if max_calls_per_key is not None:
            wanted.append((f"{task_name}:{key_digest(key)}", max_calls_per_key))
        if not wanted:
            yield
            return
        leases: list[Lease] = []
        try:
            for name, limit in wanted:  # always in this order: no deadlock
                leases.append(await self._acquire(name, limit))
            call = asyncio.current_task()
            assert call is not None
            keeper = asyncio.create_task(self._keep(leases, call))
            try:
                yield
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            await self._confirm(leases)
        finally:
            await self._release(leases)

    async def _acquire(self, name: str, limit: int) -> Lease:
        self._held += 1
        holder = f"{_PROCESS}:{self._held}"
        ttl_ms = int(self.ttl * 1000)
        unanswered_since: float | None = None
        pause = 0
        while True:
            sent = time.monotonic()
            try:
                token = await asyncio.wait_for(
                    self.server.acquire(name, limit, holder, ttl_ms), ASK_TIMEOUT
                )
            except Exception as exc:  # a fault, or no answer in time
                now = time.monotonic()
                if unanswered_since is None:
                    unanswered_since = sent
                if now - unanswered_since >= self.ttl:
                    self._warn(
                        f"batchtask: the lease server has not answered for "
                        f"{now - unanswered_since:.1f} s ({exc!r}); calls limited "
                        "across the fleet go back to the broker unmade until it does"
                    )
                    raise LeaseUnavailable(name) from exc
                await asyncio.sleep(PAUSES[min(pause, len(PAUSES) - 1)])
                pause += 1
                continue
            unanswered_since = None
            if token > 0:
                self.granted += 1
                return Lease(name, holder, token, sent + self.ttl - self.margin)
            await asyncio.sleep(PAUSES[min(pause, len(PAUSES) - 1)])
            pause += 1

    async def _keep(self, leases: list[Lease], call: "asyncio.Task[object]") -> None:
        """Renew `leases` until cancelled; stop `call` if one cannot be kept."""
        while True:
            await asyncio.sleep(self.renew_every)
            for lease in leases:
                while True:
                    left = lease.valid_until - time.monotonic()
                    if left <= 0:
                        self._stop(call, lease, "no renewal in time")
                        return
                    try:
                        kept = await self._renew(lease, min(ASK_TIMEOUT, left))
                    except Exception:  # a fault, or no answer in time: again
                        await asyncio.sleep(min(0.05, max(left, 0.0)))
                        continue
                    if not kept:
                        self._stop(call, lease, "the server no longer has it")
                        return
                    break

    async def _renew(self, lease: Lease, timeout: float) -> bool:
        """Renew `lease` once, answered within `timeout`; whether the server had it.

        Renewed, it is valid here for another lifetime less the margin, from
        when the renewal was sent.
        """
        sent = time.monotonic()
        kept = await asyncio.wait_for(
            self.server.renew(lease.name, lease.holder, int(self.ttl * 1000)), timeout
        )
        if kept:
            lease.valid_until = sent + self.ttl - self.margin
        return kept

    async def _confirm(self, leases: list[Lease]) -> None:
        """Check that a call that returned held `leases` to its end.

        Only a lease past its validity here is asked about (one renewal): its
        keeper could not run in time (the process was stopped, or its loop
        held). If the server still has it, nobody else had the slot.

        :raises LeaseLost: if the server no longer has one, or does not answer.
        """
        for lease in leases:
            late = time.monotonic() - lease.valid_until
            if late < 0:
                continue
            try:
                kept = await self._renew(lease, ASK_TIMEOUT)
            except Exception as exc:
                kept, why = False, f"no answer: {exc!r}"
            else:
                why = "the server no longer has it"
            if not kept:
                self.lost += 1
                logger.warning(
                    "batchtask: a call's lease %s (token %d) lapsed while the call "
                    "ran (this process could not renew it for %.1f s past its "
                    "validity; %s); the call's outcome is not kept and its items "
                    "go back to the broker",
                    lease.name,
                    lease.token,
                    late,
                    why,
                )
                raise LeaseLost(lease.name)

    def _stop(self, call: "asyncio.Task[object]", lease: Lease, why: str) -> None:
        self.lost += 1
        logger.warning(
            "batchtask: a call's lease %s (token %d) could not be kept (%s); the "
            "call is stopped before another process can take the slot, and its "
            "items go back to the broker",
            lease.name,
            lease.token,
            why,
        )
        call.cancel()

    async def _release(self, leases: list[Lease]) -> None:
        for lease in leases:
            try:
                await asyncio.wait_for(
                    self.server.release(lease.name, lease.holder), ASK_TIMEOUT
                )
            except Exception:  # it expires on its own
                logger.debug("batchtask: releasing lease %s failed", lease.name)

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            logger.warning(text)


def key_digest(key: Hashable) -> str:
    """A group key as every process names it (``repr``, not the salted ``hash``)."""
    return hashlib.sha1(repr(key).encode(), usedforsecurity=False).hexdigest()[:16]


# -- batches that fill across the fleet ---------------------------------------

MEMBER_TTL = 5.0
"""Seconds a worker process stays a member of the fleet without a heartbeat."""
BEAT_EVERY = 1.0
"""Seconds between two heartbeats of one worker process."""
HOT_FOR = 3
"""Batch windows a key stays hot here after a window that filled a batch."""
MOVE_COST = 100e-6
"""Seconds of work one move costs the fleet (a Redis stream move: about 73 µs
of CPU per moved item at saturation in bench/fleet.py; RabbitMQ's about 200):
a delivery moves only if the calls it saves cost more (`Router.route`)."""
CALL_OVERHEAD = 100e-6
"""Seconds of batchtask's own work per call beside the function (its grouped
result write and ack, each a round trip per call)."""
RECLAIM_COUNT = 500
"""Entries of a dead member's inbox moved back to the queue per round trip."""


def rendezvous(member: str, key: str) -> int:
    """`member`'s score for `key`: the member with the highest owns the key."""
    digest = hashlib.blake2b(
        f"{member}\0{key}".encode(), digest_size=8, usedforsecurity=False
    ).digest()
    return int.from_bytes(digest, "big")


def owner_of(members: Sequence[str], key: str) -> str:
    """The member that owns `key`, by rendezvous hashing.

    A join or a leave moves only the keys the joining member wins or the
    leaving one held.
    """
    return max(members, key=lambda member: rendezvous(member, key))


def route_key(task_name: str, args: Sequence[object], kwargs: dict[str, Any]) -> str:
    """What a message of `task_name` is routed by: its arguments after the item.

    Read from the message as sent (JSON values): every process names it the
    same way. It is coarser than the batch key at worst (a ``group_by``
    splits a route into batches at its owner), never finer.
    """
    return f"{task_name}\0{args[1:]!r}\0{sorted(kwargs.items())!r}"


@dataclass(slots=True)
class _Rate:
    """Arrivals of one route in this process, per batch window."""

    since: float
    count: int
    window: float
    hot_until: float = 0.0
    last: int = 0
    """Arrivals in the window before (0: none, or more than a window ago)."""


class Router:
    """Sends each delivery to the one worker process that batches its key.

    Every `BatchReceiver` worker process on a broker with a `RouteServer`
    is a member of the fleet: it renews its membership every `BEAT_EVERY`
    seconds, for `MEMBER_TTL` (the server's clock). Each route (a batch
    task and its arguments after the item) has an owner among the live
    members (rendezvous hashing, `owner_of`). A delivery whose owner is
    another member moves to that member's inbox, acked here in the same
    atomic step (nothing is lost, nothing is doubled); the owner reads its
    inbox with the queue, so its batches fill from the whole fleet's items.

    - **No funnel**: a route that fills a batch within one batch window in
      this process alone is hot here and stays here (for `HOT_FOR`
      windows after the last such window): a key hot enough for every
      process is batched by every process.
    - **A whole batch at once stays**: a move starts after the loop turn
      its delivery arrived in; if the route has become hot here meanwhile
      (one read brought a batch of it), the delivery is batched here.
    - **Moves that pay**: a delivery moves only if the calls it saves
      cost more than the move (`MOVE_COST`): a batch here holds what this
      process receives of its route in a batch window, at the owner what
      the whole fleet does, and a call costs what the task's function took
      here plus `CALL_OVERHEAD`. Cheap calls whose batches fill well here
      (a saturated fleet of no-op calls) stay where they arrive;
      ``dedup_key`` tasks always move.
    - **Moving never loops**: only first deliveries from the shared queue
      move; what arrives in an inbox is batched where it arrives.
    - **A member that dies**: once its membership expires, the next member
      to beat moves its inbox back to the queue (unacknowledged entries
      included: at least once), in rounds of `RECLAIM_COUNT`.
    - **A member cut off**: while it has not got a heartbeat through for
      ``MEMBER_TTL - MARGIN`` seconds, it moves nothing and batches what it
      receives (per process), with a warning; the others stop sending to it
      once its membership expires.
    - **Leaving**: at shutdown, after its batches are drained, a member
      moves what is left in its inbox back to the queue and leaves.
    """

    def __init__(self, server: RouteServer, *, ttl: float = MEMBER_TTL) -> None:
        """Route through `server`; membership lasts `ttl` seconds unrenewed."""
        self.server = server
        self.ttl = ttl
        self.beat_every = min(BEAT_EVERY, ttl / 5)
        self.margin = margin_for(ttl)
        """How long before its membership expires this member stops trusting it."""
        self.member = f"{_PROCESS}:{uuid.uuid4().hex[:6]}"
        self.members: tuple[str, ...] = ()
        """The live members as last seen (empty: not routing)."""
        self.valid_until = 0.0
        """Monotonic time until which `members` is trusted."""
        self._owners: dict[str, tuple[str, int]] = {}
        """Each route seen: its owner among `members` and the owner's score."""
        self._rates: dict[str, _Rate] = {}
        self._beating: asyncio.Task[None] | None = None
        self._warned_at: dict[str, float] = {}
        self.forwarded = 0
        """Deliveries moved to another member so far."""
        self.reclaimed = 0
        """Entries of dead members' inboxes moved back to the queue so far."""
        self.unmoved = 0
        """Deliveries batched here because their move failed, so far."""
        self.stale_routes = 0
        """Deliveries batched here because the view of the fleet was too old."""

    def route(
        self,
        key: str,
        batch_size: int,
        batch_timeout: float,
        call_seconds: float | None = None,
    ) -> str | None:
        """The member to send a delivery of route `key` to; None: batch it here.

        `call_seconds`: how long a call of its task's function takes here
        (None: not known yet, or moves are needed whatever they cost, as for
        ``dedup_key``); `CALL_OVERHEAD` is added.
        """
        now = time.monotonic()
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = _Rate(now, 0, batch_timeout)
        elif now - rate.since >= batch_timeout:
            last = rate.count if now - rate.since < 2 * batch_timeout else 0
            rate.since, rate.count, rate.window = now, 0, batch_timeout
            rate.last = last
        rate.count += 1
        if rate.count >= batch_size:
            rate.hot_until = now + HOT_FOR * batch_timeout
        if now < rate.hot_until:
            return None
        owner = self.owner(key)
        if owner is None or call_seconds is None:
            return owner
        # Calls saved per item moved: a batch here holds what this process
        # gets of the route in a window, at its owner what the fleet does.
        here = max(1, min(batch_size, max(rate.count, rate.last)))
        there = min(batch_size, here * len(self.members))
        if (call_seconds + CALL_OVERHEAD) * (1 / here - 1 / there) < MOVE_COST:
            return None  # cheap calls, well filled here: not worth a move
        return owner

    def hot(self, key: str) -> bool:
        """Whether route `key` fills batches in this process by itself now.

        Asked again as a move starts, after the rest of its loop turn: a read
        that brought a whole batch of one route makes the route hot only at
        that batch's last delivery, after the first ones were routed.
        """
        rate = self._rates.get(key)
        return rate is not None and time.monotonic() < rate.hot_until

    def owner(self, key: str) -> str | None:
        """The member that owns route `key`; None: this one, or not routing."""
        if len(self.members) < 2:
            return None
        now = time.monotonic()
        if now >= self.valid_until:
            self.stale_routes += 1
            self._warn(
                f"batchtask: this worker's view of the fleet is "
                f"{now - self.valid_until + self.ttl - self.margin:.1f} s old (its "
                "heartbeat is late); it batches what it receives, per process, "
                "until a heartbeat goes through",
                "stale",
            )
            return None
        known = self._owners.get(key)
        if known is None:
            owner = owner_of(self.members, key)
            known = self._owners[key] = (owner, rendezvous(owner, key))
        return None if known[0] == self.member else known[0]

    def move_failed(self, error: BaseException) -> None:
        """A move failed with `error`: its delivery is batched here (warned)."""
        self.unmoved += 1
        self._warn(
            f"batchtask: moving a delivery to the worker that batches its key "
            f"failed ({error!r}); batched here ({self.unmoved} so far)",
            "move",
        )

    def gone(self, member: str) -> None:
        """The server refused a move to `member`: it is no member any more.

        Its routes go to their next owners now, not at the next beat: what
        comes back from a dead member's inbox is read by processes that may
        not have seen it expire yet.
        """
        if member in self.members and member != self.member:
            members = tuple(m for m in self.members if m != member)
            self._rehome(self.members, members)
            self.members = members

    def start(self) -> None:
        """Join the fleet and beat until `stop`."""
        if self._beating is None:
            self._beating = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        """Stop routing; move what is left in this member's inbox back; leave."""
        beating, self._beating = self._beating, None
        self.members = ()
        if beating is not None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        self.server.serve(None)
        try:
            moved = 0
            for _ in range(100):  # bounded: a leave never holds a shutdown long
                count = await asyncio.wait_for(
                    self.server.leave(self.member, RECLAIM_COUNT), ASK_TIMEOUT
                )
                moved += max(count, 0)
                if count < RECLAIM_COUNT:
                    break
            if moved:
                logger.info(
                    "batchtask: %d entr%s left in this worker's inbox went back "
                    "to the queue",
                    moved,
                    "y" if moved == 1 else "ies",
                )
        except Exception:  # its membership expires; another member moves them
            logger.warning(
                "batchtask: leaving the fleet failed; this worker's inbox goes "
                "back to the queue once its membership expires",
                exc_info=True,
            )

    async def _beat(self) -> None:
        ttl_ms = int(self.ttl * 1000)
        self.server.serve(self.member)
        while True:
            sent = time.monotonic()
            try:
                live, expired = await asyncio.wait_for(
                    self.server.beat(self.member, ttl_ms), ASK_TIMEOUT
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() >= self.valid_until and self.members:
                    self.members = ()
                    self._owners.clear()
                    self._warn(
                        f"batchtask: the fleet's server did not take this worker's "
                        f"heartbeat ({exc!r}); it batches what it receives, per "
                        "process, until it does"
                    )
                elif not self.valid_until:
                    self._warn(
                        f"batchtask: joining the fleet failed ({exc!r}); this "
                        "worker batches what it receives, per process, until it "
                        "joins"
                    )
            else:
                self.valid_until = sent + self.ttl - self.margin
                members = tuple(live)
                if members != self.members:
                    if self.members:
                        logger.info(
                            "batchtask: the fleet has %d worker process(es) now "
                            "(was %d)",
                            len(members),
                            len(self.members),
                        )
                    self._rehome(self.members, members)
                    self.members = members
                for gone in expired:
                    await self._reclaim(gone)
                self._forget(time.monotonic())
            await asyncio.sleep(self.beat_every)

    async def _reclaim(self, member: str) -> None:
        for _ in range(20):
            try:
                count = await asyncio.wait_for(
                    self.server.reclaim(member, RECLAIM_COUNT), ASK_TIMEOUT
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.debug("batchtask: reclaiming %s's inbox failed", member)
                return
            if count > 0:
                self.reclaimed += count
                logger.info(
                    "batchtask: worker %s left the fleet without leaving; %d "
                    "entr%s of its inbox went back to the queue",
                    member,
                    count,
                    "y" if count == 1 else "ies",
                )
            if count < RECLAIM_COUNT:
                return

    def _rehome(self, old: Sequence[str], new: Sequence[str]) -> None:
        """Update the known owners from members `old` to `new`.

        Rendezvous hashing makes this cheap: a route whose owner stays a
        member changes owner only to a joining member that outscores it,
        and only the routes of a leaving member need their owner found
        again (when first seen next). Equal to `owner_of` over `new` for
        every route (tests/test_fleet_sim.py).
        """
        joined = set(new).difference(old)
        left = set(old).difference(new)
        if not old or len(joined) > len(new) // 2:
            self._owners.clear()
            return
        owners = self._owners
        for key, (owner, score) in list(owners.items()):
            if owner in left:
                del owners[key]
                continue
            for member in joined:
                other = rendezvous(member, key)
                if other > score:
                    owner, score = member, other
            owners[key] = (owner, score)

    def _forget(self, now: float) -> None:
        """Drop the rates of routes not seen for a while (memory stays bounded)."""
        if len(self._rates) < 1024:
            return
        stale = [
            key
            for key, rate in self._rates.items()
            if now - rate.since > 2 * rate.window and now >= rate.hot_until
        ]
        for key in stale:
            del self._rates[key]
            self._owners.pop(key, None)

    def _warn(self, text: str, kind: str = "beat") -> None:
        """Log `text`, once a minute for each `kind` of trouble."""
        now = time.monotonic()
        if now - self._warned_at.get(kind, -1e9) >= 60:
            self._warned_at[kind] = now
            logger.warning(text)
