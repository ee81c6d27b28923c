"""Bounds on the web interface's connections, which aiohttp does not set by itself: how many are open at once,
how long a request's headers may take to arrive, and how long its body may stall.

Every connection's protocol (aiohttp's request handler) is wrapped by a `_Watched` that sees each byte arrive;
the outermost middleware marks when a request's headers were complete and when its answer ended. A watchdog
closes connections whose headers do not arrive within the header timeout (counted from the connection's start
or from the end of its last answer, so it also ends idle kept-alive connections) and requests whose body stops
arriving for the body timeout. When all connections are taken, the oldest one still waiting for its headers gives
way to the newcomer; when none is waiting, the newcomer is told 503. What is closed or refused is logged as
counted lines per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..core.acceptor import Acceptor
from ..core.tally import Tally

__all__ = ["Slots", "SlotsSite"]

log = logging.getLogger(__name__)

_BUSY_TEXT = b"too many connections; try again in a while\n"
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\nRetry-After: 5\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT))

#: How long a refused connection may stay open for its peer to read the 503 (it takes no slot meanwhile).
REFUSED_LINGER_S = 1.0


class _Watched(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the times the watchdog needs."""

    def __init__(self, slots: Slots, inner: Any) -> None:
        self._slots = slots
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.host = "unknown"
        self.since = slots.clock()  # start of the wait for headers (connection opened, or last answer sent)
        self.last_read = self.since
        self.requests = 0  # requests of this connection inside the application now
        self.request: web.BaseRequest | None = None
        self.dropped = False  # refused at once: aiohttp never saw it

    # The protocol's events, handed on to aiohttp's handler.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "unknown")
        if not self._slots.admit(self):
            self.dropped = True
            # Said, then the connection closes from our side at once: closing it with the request unread
            # would reset it before the peer could read why. A peer that never closes is cut off soon after.
            with contextlib.suppress(Exception):
                transport.write(_BUSY)
                if transport.can_write_eof():
                    transport.write_eof()
            asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)
            return
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._slots.forget(self)
        if not self.dropped:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.dropped:
            return
        self.last_read = self._slots.clock()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.dropped:
            return None
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        if not self.dropped:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.dropped:
            self.inner.resume_writing()

    # What the watchdog decides on.

    def overdue(self, now: float, header_s: float, body_s: float) -> str | None:
        if self.requests == 0:
            if now - self.since > header_s:
                return f"request headers not complete within {header_s:g} s"
            return None
        request = self.request
        if request is not None and not request.content.is_eof() and now - self.last_read > body_s:
            return f"request body stalled for {body_s:g} s"
        return None


class Slots:
    """The web's connections: counted, bounded, watched. `middleware` must be the application's outermost."""

    def __init__(self, max_connections: int, header_timeout: float, body_timeout: float, log_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max(1, max_connections)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.clock = clock
        self._open: dict[asyncio.BaseTransport, _Watched] = {}  # in the order they came
        self._closed = Tally(log, "web: closed a connection from {address}: {reason}",
                             "web: closed {count} more connections from {address} in the last {seconds} s: "
                             "{reason}", log_interval)
        self._refused = Tally(log, "web: refused a connection from {address}: {reason}",
                              "web: refused {count} more connections from {address} in the last {seconds} s: "
                              "{reason}", log_interval)
        self.accept_errors = Tally(log, "web: cannot accept connections on {address}: {reason}; retrying",
                                   "web: accept() failed {count} more times on {address} in the last {seconds} s: "
                                   "{reason}", log_interval, level=logging.ERROR)
        self._watchdog: asyncio.Task[None] | None = None
        self.acceptor: Acceptor | None = None  # the site's accept loop, closed by aiohttp's runner

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def busy_count(self) -> int:
        """Connections with a request inside the application (the rest wait for their headers)."""
        return sum(1 for conn in self._open.values() if conn.requests)

    def factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Watched(self, inner())

    def start(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self.acceptor is not None:
            self.acceptor.close()
            await self.acceptor.wait_closed()
        self._closed.close()
        self._refused.close()
        self.accept_errors.close()

    def admit(self, conn: _Watched) -> bool:
        if len(self._open) >= self.max_connections:
            waiting = next((c for c in self._open.values() if c.requests == 0), None)
            if waiting is None:
                self._refused.note(conn.host, f"all {self.max_connections} connections are busy")
                return False
            self._drop(waiting, "gave way to a newer connection: all connections were taken")
        assert conn.transport is not None
        self._open[conn.transport] = conn
        return True

    def forget(self, conn: _Watched) -> None:
        if conn.transport is not None:
            self._open.pop(conn.transport, None)

    def _drop(self, conn: _Watched, reason: str) -> None:
        self.forget(conn)
        self._closed.note(conn.host, reason)
        if conn.transport is not None:
            conn.transport.abort()

    async def _watch(self) -> None:
        period = max(0.05, min(self.header_timeout, self.body_timeout) / 4)
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            for conn in list(self._open.values()):
                reason = conn.overdue(now, self.header_timeout, self.body_timeout)
                if reason is not None:
                    self._drop(conn, reason)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        conn = self._open.get(request.transport) if request.transport is not None else None
        task = asyncio.current_task()
        if conn is not None and task is not None:
            conn.requests += 1
            conn.request = request
            conn.last_read = self.clock()
            # aiohttp sends the answer in this same task, after the handler returns: the request ends with it.
            task.add_done_callback(lambda _: self._answered(conn))
        try:
            return await handler(request)
        except ConnectionError:
            transport = request.transport
            if transport is not None and not transport.is_closing():
                raise
            # The peer went away mid-request, or the watchdog closed it (which counted it): nobody is left to
            # answer, and aiohttp would log a traceback for each. This reply is dropped without a word.
            return web.Response(status=400)

    def _answered(self, conn: _Watched) -> None:
        conn.requests -= 1
        conn.request = None
        conn.since = self.clock()  # the next request's headers are waited for from now


class SlotsSite(web.TCPSite):
    """aiohttp's TCP site, on an accept loop that survives running out of descriptors (core.acceptor), with every
    connection's protocol watched by `slots`."""

    __slots__ = ("_slots",)

    def __init__(self, runner: web.BaseRunner, host: str, port: int, slots: Slots) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._slots = slots

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        acceptor = Acceptor.listen(self._host, self._port, self._backlog, self._slots.factory(server),
                                   self._slots.accept_errors, "the web interface's port")
        self._server = acceptor  # type: ignore[assignment]  # (aiohttp needs its sockets and close())
        self._slots.acceptor = acceptor
        self._bound_port = acceptor.sockets[0].getsockname()[1]


class SlotServer:
    """An aiohttp application served on host:port behind Slots (the web interface, the metrics port); stop() ends it.
    `what` names it in the log."""

    what = "web server"

    def __init__(self, runner: web.AppRunner, slots: Slots, host: str, port: int) -> None:
        self._runner = runner
        self.slots = slots
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self.slots.close()
        log.info("%s on %s stopped", self.what, self.url)


async def serve(app: web.Application, host: str, port: int, slots: Slots, **runner_options: Any) -> web.AppRunner:
    """Serve `app` on host:port (0: a free port; the runner's addresses say which) behind `slots`."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await SlotsSite(runner, host, port, slots).start()
    except BaseException:
        await runner.cleanup()
        raise
    slots.start()
    return runner
