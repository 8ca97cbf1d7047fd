"""Fault injection for the fault tests: a TCP proxy between a worker and a server.

A worker reaches its broker (and, where a test says so, its result backend)
through a `Proxy` running in the test process; the test's own measuring
connections go to the server directly, so a fault hits the worker only.

- `Proxy.drop()` closes every connection passing through now (the server and
  the client each see the other hang up); new connections are let through.
- `Proxy.drop_on(pattern)` closes a connection, instead of forwarding, the
  first time the client sends bytes containing `pattern` (an ``XACK``, an
  AMQP ``basic.ack`` frame, a NATS ack): the ack is lost in flight.
- `Proxy.refuse(seconds)` closes every connection and refuses new ones for a
  while: the server is unreachable, then back.

Where no proxy can stand between a worker and its servers (a Redis Cluster
announces its nodes' own addresses, a Sentinel the master's), `kill_clients`
drops the worker's connections from the server side instead: ``CLIENT KILL
ID`` for each connection ``CLIENT LIST`` shows whose two ends are a socket of
the worker's processes (from ``/proc``). Other clients of those servers (the
test's own, other tests' workers) keep theirs.

`OwnRedis` is a redis-server of the test's own (stopped and started by pid),
for a test that restarts its server or counts the commands it received.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import redis.asyncio as redis

from tests.conftest import server_answers
from tests.workers import until

AMQP_BASIC_ACK = b"\x00\x3c\x00\x50"
"""An AMQP method frame's class 60 (basic), method 80 (ack)."""


class Proxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`, faults on request."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        """Connections accepted so far."""
        self.dropped = 0
        """Connections closed by a fault so far."""
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._refuse_until = 0.0
        self._pattern: bytes | None = None
        self.pattern_seen = asyncio.Event()

    async def __aenter__(self) -> "Proxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self._close_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def url(self, scheme: str, auth: str = "") -> str:
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def drop(self) -> int:
        """Close every connection passing through now; how many there were."""
        count = len(self._pairs)
        self._close_all()
        self.dropped += count
        return count

    def drop_on(self, pattern: bytes) -> None:
        """Drop a connection the first time its client sends `pattern`."""
        self._pattern = pattern
        self.pattern_seen.clear()

    def refuse(self, seconds: float) -> None:
        """Drop everything now and refuse connections for `seconds`."""
        self._refuse_until = time.monotonic() + seconds
        self.drop()

    def _close_all(self) -> None:
        for client, server in list(self._pairs):
            for writer in (client, server):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        self._pairs.clear()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if time.monotonic() < self._refuse_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.target
            )
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, pair, upstream=True),
                self._pipe(up_reader, writer, pair, upstream=False),
            )
        finally:
            self._pairs.discard(pair)
            for each in pair:
                with contextlib.suppress(Exception):
                    each.transport.abort()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        upstream: bool,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                pattern = self._pattern
                if upstream and pattern is not None and pattern in chunk:
                    self._pattern = None
                    self.dropped += 1
                    self.pattern_seen.set()
                    for each in pair:
                        each.transport.abort()
                    return
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for each in pair:
                with contextlib.suppress(Exception):
                    each.transport.abort()


class OwnRedis:
    """A redis-server of the test's own that keeps its data (AOF, fsync always).

    Started and stopped by pid; killed on the way out whatever its state.
    """

    def __init__(self, port: int, data: Path) -> None:
        self.port = port
        self.data = data
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self._spawn()
        await until(
            lambda: asyncio.to_thread(server_answers, self.port), 30, "own Redis up"
        )

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.data), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.process.wait, 30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Pair = tuple[str, str]
"""A TCP connection as (client ``host:port``, server ``host:port``)."""


def connections_of(pgid: int) -> set[Pair]:
    """The IPv4 TCP connections open in the processes of process group `pgid`
    (a ``taskiq worker`` started in its own session and its worker processes),
    each as seen from its own end: (its address, the peer's)."""
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # state, ppid, pgrp
                continue
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    pairs: set[Pair] = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        columns = row.split()
        if columns[9] in inodes:
            pairs.add((_address(columns[1]), _address(columns[2])))
    return pairs


def _address(hexed: str) -> str:
    """``0100007F:1B59`` (/proc/net/tcp) as ``127.0.0.1:7001``."""
    host, port = hexed.split(":")
    octets = bytes.fromhex(host)[::-1]
    return f"{'.'.join(map(str, octets))}:{int(port, 16)}"


async def kill_clients(pgid: int, ports: Iterable[int]) -> dict[int, int]:
    """Kill, on the Redis servers at 127.0.0.1:`ports`, every connection of
    the processes of group `pgid` (``CLIENT KILL ID``); how many on each port.

    The connections are listed on every server first, then killed on all of
    them at once: the worker loses them together, as with `Proxy.drop`.
    """
    ports = tuple(ports)
    ours = connections_of(pgid)
    clients = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
    try:
        listed = await asyncio.gather(*(client.client_list() for client in clients))
        doomed = [
            [
                entry["id"]
                for entry in entries
                if (entry["addr"], entry.get("laddr", "")) in ours
            ]
            for entries in listed
        ]

        async def kill(client: redis.Redis, ids: list[str]) -> int:
            killed = 0
            for id_ in ids:
                with contextlib.suppress(redis.ResponseError):  # gone meanwhile
                    reply = await client.execute_command("CLIENT", "KILL", "ID", id_)
                    killed += int(reply)
            return killed

        counts = await asyncio.gather(
            *(kill(client, ids) for client, ids in zip(clients, doomed, strict=True))
        )
    finally:
        for client in clients:
            await client.aclose()
    return dict(zip(ports, counts, strict=True))
