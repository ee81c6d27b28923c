"""A listening socket with an accept loop of its own, which survives running out of file descriptors.

asyncio's own accept loop (loop.create_server), when accept() fails with EMFILE, logs the error with a traceback
and schedules a retry for every connection still waiting in the backlog, each failing and logging again: hundreds
of lines a second, and stray retries that fire after the server closed. Here a failed accept() is counted (one
line per interval, through a Tally), the loop waits a moment and tries again, and connections that waited in the
backlog are taken as soon as descriptors are free. Used for the farm's port and the web interface's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from .tally import Tally

__all__ = ["ACCEPT_RETRY_S", "Acceptor"]

log = logging.getLogger(__name__)

#: How long the loop waits after accept() failed for want of descriptors (or memory) before it tries again.
ACCEPT_RETRY_S = 0.25
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Failures that concern one connection only (it was reset while waiting in the backlog).
_ONE_CONNECTION = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO, errno.EPERM})


class Acceptor:
    """Serves `sock` (listening, non-blocking): each accepted connection gets a protocol from `factory`. Has
    `sockets` and `close()` like an asyncio Server, so aiohttp's site can hold it too."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol], errors: Tally,
                 where: str, retry_s: float = ACCEPT_RETRY_S) -> None:
        self.sockets = [sock]
        self._factory = factory
        self._errors = errors
        self._where = where
        self._retry_s = retry_s
        self._closed = False
        self._opening: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    def listen(cls, host: str | None, port: int, backlog: int, factory: Callable[[], asyncio.BaseProtocol],
               errors: Tally, where: str) -> Acceptor:
        """Bind host:port (the first address `host` resolves to; all IPv4 interfaces for '' or None)."""
        family, _, _, _, address = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address[:2], family=family, backlog=backlog)
        sock.setblocking(False)
        return cls(sock, factory, errors, where)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, *self._opening, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sockets[0]
        while not self._closed:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno in _ONE_CONNECTION:
                    continue
                if exc.errno in _OUT_OF_RESOURCES:
                    self._errors.note(self._where, exc.strerror or str(exc))
                else:
                    log.error("accepting a connection on %s failed: %s", self._where, exc)
                await asyncio.sleep(self._retry_s)
                continue
            task = loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._factory, conn)
        except OSError as exc:
            log.debug("a connection on %s closed before it was served: %s", self._where, exc)
            with contextlib.suppress(OSError):
                conn.close()
