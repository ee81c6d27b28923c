"""The farm's TCP port: connections accepted, bounded and handshaken, then served as a render client
(core.workers) or a tool (core.control). Speaks the MicroFarm protocol; changes nothing itself."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Protocol

from protocol import messages as m
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.handshake import Peer, server_handshake
from protocol.limits import HANDSHAKE_MAX_BYTES, MAX_MESSAGE_BYTES
from protocol.messages import Role
from protocol.stream import MessageStream

from .config import ServerConfig, ServerStats
from .storage import UnsafeName
from .tasks import Tasks

__all__ = ["MAX_CONNECTIONS", "MAX_PENDING_HANDSHAKES", "STOP_GRACE_S", "Listener"]

log = logging.getLogger(__name__)

#: At most this many connections in all, and this many still in their handshake; more are closed.
MAX_CONNECTIONS = 512
MAX_PENDING_HANDSHAKES = 64
#: How long stop() lets connection handlers finish before it cancels them.
STOP_GRACE_S = 2.0


class Side(Protocol):
    """One side of the farm's port: render clients or tools."""

    async def serve(self, stream: MessageStream, peer: Peer, client_id: str) -> None: ...


class Listener:
    def __init__(self, config: ServerConfig, stats: ServerStats, tasks: Tasks, *, workers: Side,
                 control: Side) -> None:
        self._config = config
        self._stats = stats
        self._tasks = tasks
        self._workers = workers
        self._control = control
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._streams: set[MessageStream] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._handshakes = asyncio.Semaphore(MAX_PENDING_HANDSHAKES)
        self._stopping = False
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self._config.host, self._config.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Take no more connections and close the open ones (their handlers then end by themselves)."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for stream in list(self._streams):
            stream.close()

    async def wait_closed(self) -> None:
        """Let connection handlers finish (for a moment: the rest is cancelled with the server's tasks)."""
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=STOP_GRACE_S)

    async def wait_server_closed(self) -> None:
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)

    # --- connections ----------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        stream = MessageStream(reader, writer, max_bytes=HANDSHAKE_MAX_BYTES)
        address = stream.peer
        if self._stopping or len(self._streams) >= MAX_CONNECTIONS or self._handshakes.locked():
            self._stats.connections_refused += 1
            log.warning("connection from %s refused: too many connections", address)
            await stream.aclose()
            return
        assert task is not None
        self._tasks.adopt(task)
        self._handlers.add(task)
        self._streams.add(stream)
        task.add_done_callback(self._handlers.discard)
        try:
            await self._handle(stream, address)
        finally:
            self._streams.discard(stream)
            await stream.aclose()

    async def _handle(self, stream: MessageStream, address: str) -> None:
        try:
            async with self._handshakes:
                # Until a peer has proven itself, its messages are small: no megabytes held for strangers.
                peer, client_id = await server_handshake(
                    stream, farm=self._config.farm_name, secret=self._config.secret,
                    assign_id=self._new_client_id, heartbeat_s=self._config.heartbeat_interval)
        except (TimeoutError, ProtocolError, OSError) as exc:
            self._stats.connections_refused += 1
            reason = "handshake timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            log.warning("connection from %s refused: %s", address, reason)
            return
        stream.max_bytes = MAX_MESSAGE_BYTES
        try:
            if peer.role is Role.WORKER:
                await self._workers.serve(stream, peer, client_id)
            else:
                await self._control.serve(stream, peer, client_id)
        except ConnectionClosed as exc:
            log.info("%s %s (%s) disconnected: %s", peer.role.value, peer.name, address, exc)
        except (ProtocolError, UnsafeName) as exc:
            log.warning("%s %s (%s): closing the connection: %s", peer.role.value, peer.name, address, exc)
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
