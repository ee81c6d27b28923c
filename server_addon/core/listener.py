"""The farm's TCP port: connections accepted, bounded and handshaken, then served as a render client
(core.workers) or a tool (core.control). Speaks the MicroFarm protocol; changes nothing itself."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol import messages as m
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.handshake import Peer, server_handshake
from protocol.limits import HANDSHAKE_MAX_BYTES, MAX_MESSAGE_BYTES
from protocol.messages import Role
from protocol.names import printable
from protocol.stream import MessageStream
from protocol.tls import ServerTls, short

from .acceptor import Acceptor
from .certificate import ensure_identity
from .config import MAX_CONNECTIONS, MAX_PENDING_HANDSHAKES, ServerConfig, ServerStartError, ServerStats
from .fdlimit import connection_budget
from .storage import UnsafeName
from .tally import Tally
from .tasks import Tasks

__all__ = ["MAX_CONNECTIONS", "MAX_PENDING_HANDSHAKES", "STOP_GRACE_S", "FarmFull", "Listener"]

log = logging.getLogger(__name__)

#: How long stop() lets connection handlers finish before it cancels them.
STOP_GRACE_S = 2.0
#: How long a refused peer is given to read the Error that says why, before its connection closes.
REFUSAL_SEND_S = 0.5
#: The read buffer of a connection's stream (as asyncio.start_server's).
STREAM_LIMIT = 64 * 1024


class FarmFull(ProtocolError):
    """A peer passed the handshake but its kind of connection is at its limit: it is told why, and retries."""


@dataclass(eq=False)
class _Pending:
    """A connection in its handshake."""

    address: str
    stream: MessageStream
    since: float
    evicted: bool = field(default=False)
    holds_gate: bool = field(default=True)  # until its handshake ends: one of its address's slots


#: An address's connections in or waiting for a handshake, at most this many times its handshake slots; more are
#: refused at once (they retry): silent connections from one address never fill the port for everyone else.
WAITING_PER_ADDRESS_FACTOR = 4


class _Gate:
    """An address's handshakes at once (max_handshakes_per_address), shared by its connections."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore = semaphore
        self.users = 0  # its connections, whatever they do (the gate goes with the last)
        self.waiting = 0  # those waiting for one of its slots


class Side(Protocol):
    """One side of the farm's port: render clients or tools."""

    async def serve(self, stream: MessageStream, peer: Peer, client_id: str) -> None: ...


class Listener:
    """Handshake slots are bounded in all (config.max_pending_handshakes) and per address
    (config.max_handshakes_per_address), and each lasts config.handshake_timeout at most. When all are taken, the
    address holding the most gives way (its oldest handshake is closed), so a newcomer from an address of its
    own always gets its handshake, however many silent connections a few addresses keep open. Render clients
    (up to max_connections, fewer where the open-files limit has no room) and tools (max_tool_connections) are
    counted apart: a full farm still lets its operator in. Refusals are logged as counted lines."""

    def __init__(self, config: ServerConfig, stats: ServerStats, tasks: Tasks, *, workers: Side,
                 control: Side, clock: Any = time.monotonic) -> None:
        self._config = config
        self._stats = stats
        self._tasks = tasks
        self._workers = workers
        self._control = control
        self._clock = clock
        self.port: int | None = None
        self.max_workers = max(1, config.max_connections)
        self._streams: set[MessageStream] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._pending: dict[str, list[_Pending]] = {}  # by address, oldest first
        self._pending_count = 0
        self._gates: dict[str, _Gate] = {}  # per address with connections in (or waiting for) a handshake
        self._roles: Counter[Role] = Counter()  # connections past their handshake, by role
        self._stopping = False
        self._ids = itertools.count(1)
        interval = config.refusal_log_interval
        self._refusals = Tally(log, "connection from {address} refused: {reason}",
                               "refused {count} more connections from {address} in the last {seconds} s: {reason}",
                               interval)
        self._accept_errors = Tally(log, "cannot accept connections on {address}: {reason}; retrying",
                                    "accept() failed {count} more times on {address} in the last {seconds} s: "
                                    "{reason}", interval, level=logging.ERROR)
        self._acceptor: Acceptor | None = None
        self.tls: ServerTls | None = None  # a farm with a secret speaks TLS (protocol.handshake)

    async def start(self) -> None:
        if self._config.secret:
            self.tls = await asyncio.to_thread(self._load_tls)
        self.max_workers = connection_budget(self._config)
        # The backlog holds a burst of connecting clients (a farm's worth starting at once) while the loop is busy.
        self._acceptor = Acceptor.listen(self._config.host, self._config.port, min(4096, self.max_workers + 128),
                                         self._protocol, self._accept_errors, "the farm's port")
        self.port = self._acceptor.sockets[0].getsockname()[1]

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=STREAM_LIMIT), self._on_connect)

    def _load_tls(self) -> ServerTls:
        directory = self._config.resolved_data_dir
        try:
            tls = ServerTls.load(*ensure_identity(directory))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ServerStartError(f"cannot use the farm's TLS certificate in {directory}: {exc}") from None
        log.info("TLS certificate %s (sha256), from %s", short(tls.fingerprint), directory)
        return tls

    def close(self) -> None:
        """Take no more connections and close the open ones (their handlers then end by themselves)."""
        self._stopping = True
        if self._acceptor is not None:
            self._acceptor.close()
        for stream in list(self._streams):
            stream.close()
        self._refusals.close()
        self._accept_errors.close()

    async def wait_closed(self) -> None:
        """Let connection handlers finish (for a moment: the rest is cancelled with the server's tasks)."""
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=STOP_GRACE_S)

    async def wait_server_closed(self) -> None:
        if self._acceptor is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._acceptor.wait_closed(), timeout=2.0)

    # --- connections ----------------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        return self.max_workers + self._config.max_tool_connections + self._config.max_pending_handshakes

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        stream = MessageStream(reader, writer, max_bytes=HANDSHAKE_MAX_BYTES)
        address = stream.peer
        host = _host(writer)
        if self._stopping:
            await stream.aclose()
            return
        if len(self._streams) >= self._capacity:
            await self._refuse(stream, address, host, "too many connections")
            return
        gate = self._gates.get(host)
        in_handshake = len(self._pending.get(host, ())) + (gate.waiting if gate is not None else 0)
        if in_handshake >= WAITING_PER_ADDRESS_FACTOR * self._config.max_handshakes_per_address:
            # One address may not fill the port with connections that wait for its handshake slots.
            await self._refuse(stream, address, host, "too many connections from this address in their handshake")
            return
        assert task is not None
        self._tasks.adopt(task)
        self._handlers.add(task)
        self._streams.add(stream)
        task.add_done_callback(self._handlers.discard)
        if gate is None:
            gate = self._gates[host] = _Gate(asyncio.Semaphore(self._config.max_handshakes_per_address))
        gate.users += 1
        pending: _Pending | None = None
        try:
            try:
                # Beyond its share of handshakes at once, an address waits (a farm's clients behind one NAT, or
                # a benchmark's on one host, all starting together), never longer than a handshake may take.
                gate.waiting += 1
                try:
                    async with asyncio.timeout(self._config.handshake_timeout):
                        await gate.semaphore.acquire()
                finally:
                    gate.waiting -= 1
            except TimeoutError:
                self._stats.connections_refused += 1
                self._refusals.note(host, "waited too long for a handshake slot of its address")
                return
            if self._pending_count >= self._config.max_pending_handshakes:
                self._evict()
            pending = _Pending(host, stream, self._clock())
            self._pending.setdefault(host, []).append(pending)
            self._pending_count += 1
            try:
                await self._handle(stream, address, pending, gate)
            finally:
                if pending.holds_gate:
                    gate.semaphore.release()
        finally:
            if pending is not None:
                self._end_pending(pending)
            gate.users -= 1
            if gate.users == 0:
                self._gates.pop(host, None)
            self._streams.discard(stream)
            await stream.aclose()

    def _evict(self) -> None:
        """All handshake slots are taken: the address that holds the most gives up its oldest one."""
        host = max(self._pending, key=lambda h: (len(self._pending[h]), -self._pending[h][0].since))
        victim = self._pending[host][0]
        self._end_pending(victim)
        victim.evicted = True
        victim.stream.close()  # its handshake ends with the connection; its handler counts the refusal

    def _end_pending(self, pending: _Pending) -> None:
        mine = self._pending.get(pending.address)
        if mine is None or pending not in mine:
            return
        mine.remove(pending)
        self._pending_count -= 1
        if not mine:
            del self._pending[pending.address]

    async def _refuse(self, stream: MessageStream, address: str, host: str, reason: str) -> None:
        """Tell the peer why (if it reads it at once), count it, close."""
        self._stats.connections_refused += 1
        self._refusals.note(host, reason)
        with contextlib.suppress(ProtocolError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(stream.send(m.Error(reason=f"connection refused: {reason}")), REFUSAL_SEND_S)
        await stream.aclose()

    async def _handle(self, stream: MessageStream, address: str, pending: _Pending, gate: _Gate) -> None:
        role: Role | None = None

        def admit(peer: Peer) -> str:
            nonlocal role
            self._check_room(peer.role)
            role = peer.role
            self._roles[role] += 1  # held from here, so that handshakes ending together cannot overshoot
            return self._new_client_id(peer)

        try:
            try:
                # Until a peer has proven itself, its messages are small: no megabytes held for strangers.
                peer, client_id = await server_handshake(
                    stream, farm=self._config.farm_name, secret=self._config.secret, assign_id=admit,
                    heartbeat_s=self._config.heartbeat_interval, timeout=self._config.handshake_timeout,
                    tls=self.tls)
            except FarmFull as exc:
                await self._refuse(stream, address, pending.address, str(exc))
                return
            except (TimeoutError, ProtocolError, OSError) as exc:
                self._stats.connections_refused += 1
                if pending.evicted:
                    reason = "handshake slots full; gave way to a newer connection"
                elif isinstance(exc, asyncio.TimeoutError):
                    reason = "handshake timed out"
                else:
                    reason = printable(exc)
                self._refusals.note(pending.address, reason)
                return
            self._end_pending(pending)
            gate.semaphore.release()
            pending.holds_gate = False
            await self._serve(stream, address, peer, client_id)
        finally:
            if role is not None:
                self._roles[role] -= 1

    def _check_room(self, role: Role) -> None:
        if role is Role.WORKER:
            if self._roles[Role.WORKER] >= self.max_workers:
                raise FarmFull(f"the farm is full: {self.max_workers} render clients are connected, its limit; "
                               "try again later")
        elif self._roles[role] >= self._config.max_tool_connections:
            raise FarmFull(f"too many tool connections ({self._config.max_tool_connections}); try again later")

    async def _serve(self, stream: MessageStream, address: str, peer: Peer, client_id: str) -> None:
        stream.max_bytes = MAX_MESSAGE_BYTES
        try:
            if peer.role is Role.WORKER:
                await self._workers.serve(stream, peer, client_id)
            else:
                await self._control.serve(stream, peer, client_id)
        except ConnectionClosed as exc:
            log.info("%s %s (%s) disconnected: %s", peer.role.value, peer.name, address, exc)
        except (ProtocolError, UnsafeName) as exc:
            log.warning("%s %s (%s): closing the connection: %s", peer.role.value, peer.name, address,
                        printable(exc))
            with contextlib.suppress(ProtocolError, OSError):
                await asyncio.wait_for(stream.send(m.Error(reason=str(exc))), timeout=1.0)
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("%s %s (%s) connection error: %s", peer.role.value, peer.name, address, exc)
        except Exception:
            # A bug must cost this one connection only, never the server.
            log.exception("%s %s (%s): internal error; closing the connection", peer.role.value, peer.name, address)

    def _new_client_id(self, peer: Peer) -> str:
        prefix = "c" if peer.role is Role.WORKER else "t"
        return f"{prefix}{next(self._ids)}"


def _host(writer: asyncio.StreamWriter) -> str:
    """The peer's address without its port: what per-address bounds count by."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")
