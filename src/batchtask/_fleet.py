"""Call limits that hold across a fleet: leases on the broker's server, fenced.

``max_concurrent_calls`` and ``max_concurrent_calls_per_key`` bound the calls
of one worker process by themselves. Under `batchtask.BatchReceiver`, on a
broker whose adapter offers a `LeaseServer` (the Redis stream family), a call
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
from collections.abc import AsyncGenerator, Hashable
from dataclasses import dataclass

from batchtask.brokers._base import LeaseServer

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


class LeaseUnavailable(Exception):
    """The lease server did not answer for longer than a lease lasts."""


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
        self.margin = min(MARGIN, ttl * 0.3)
        self._held = 0
        self._warned_at = -1e9
        self.granted = 0
        """Leases granted so far (for tests and benchmarks)."""
        self.lost = 0
        """Calls stopped because their lease could not be renewed in time."""

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
        ttl_ms = int(self.ttl * 1000)
        while True:
            await asyncio.sleep(self.renew_every)
            for lease in leases:
                while True:
                    left = lease.valid_until - time.monotonic()
                    if left <= 0:
                        self._stop(call, lease, "no renewal in time")
                        return
                    sent = time.monotonic()
                    try:
                        kept = await asyncio.wait_for(
                            self.server.renew(lease.name, lease.holder, ttl_ms),
                            min(ASK_TIMEOUT, left),
                        )
                    except Exception:  # a fault, or no answer in time: again
                        await asyncio.sleep(min(0.05, max(left, 0.0)))
                        continue
                    if not kept:
                        self._stop(call, lease, "the server no longer has it")
                        return
                    lease.valid_until = sent + self.ttl - self.margin
                    break

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
