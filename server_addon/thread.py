"""Run a FarmServer on its own event loop in a daemon thread (how the Blender add-on runs it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from protocol.discovery import Advertiser, interface_addresses
from protocol.errors import DiscoveryError

from .server import FarmServer, ServerConfig

if TYPE_CHECKING:
    from ..web import WebServer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long start() and stop() wait for the server thread before giving up.
THREAD_START_TIMEOUT_S = 10.0
THREAD_STOP_TIMEOUT_S = 10.0


class ServerThread:
    """Owns the loop thread. Calls from other threads go through call()/call_soon().

    With `discovery`, the farm is advertised over zeroconf once it listens (on `interfaces`,
    addresses or names; by default the interface of `config.host`, or all for 0.0.0.0) and
    withdrawn in stop(). Advertising runs on the server's loop, so start() does not wait for it.

    With `web_port` (0: a free one), the web interface runs on the same loop, on `web_host`
    (loopback unless told otherwise); start() fails when it cannot listen there.
    """

    def __init__(self, config: ServerConfig, *, discovery: bool = False,
                 interfaces: Sequence[str] | None = None, web_port: int | None = None,
                 web_host: str = "127.0.0.1") -> None:
        self.config = config
        self.web_port_wanted = web_port
        self.web_host = web_host
        self.web: WebServer | None = None
        self.discovery = discovery
        # Checked here, so that a wrong interface is an error of the caller, not a log line.
        self.interfaces = interface_addresses(interfaces) if discovery and interfaces else None
        self.server: FarmServer | None = None
        self.advertiser: Advertiser | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    @property
    def web_port(self) -> int | None:
        return self.web.port if self.web else None

    def start(self) -> None:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="microfarm-server", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=THREAD_START_TIMEOUT_S)
        except BaseException:
            self._thread.join(timeout=THREAD_STOP_TIMEOUT_S)
            self._thread = None
            raise

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._stopped = asyncio.Event()
        try:
            server = FarmServer(self.config)  # opens the job database: may fail with a reason to show
            await server.start()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        if self.web_port_wanted is not None:
            try:
                from ..web import start_web  # aiohttp is needed only for the web interface

                self.web = await start_web(server, self.web_host, self.web_port_wanted, self.config.secret)
            except BaseException as exc:
                await server.stop()
                ready.set_exception(exc)
                return
        self.server = server
        ready.set_result(None)
        advertising = asyncio.create_task(self._advertise(server)) if self.discovery else None
        await self._stopped.wait()
        if advertising is not None:
            advertising.cancel()
            await asyncio.gather(advertising, return_exceptions=True)
        if self.advertiser is not None:
            await self.advertiser.close()  # withdrawn first: clients must not find a server that is going away
        if self.web is not None:
            await self.web.stop()
        await server.stop()

    async def _advertise(self, server: FarmServer) -> None:
        assert server.port is not None
        try:
            self.advertiser = Advertiser(self.config.farm_name, server.port, self.config.host,
                                         auth_required=bool(self.config.secret), interfaces=self.interfaces)
            await self.advertiser.start()
        except DiscoveryError as exc:
            self.advertiser = None
            # The farm still works for clients given its address; only finding it is lost.
            log.error("%s; clients must be given the server's address", exc)

    def call(self, fn: Callable[[FarmServer], T], timeout: float = 5.0) -> T:
        """Run fn(server) on the loop thread and return its result."""
        async def runner() -> T:
            assert self.server is not None
            return fn(self.server)
        return self.submit(runner(), timeout)

    def submit(self, coro: Any, timeout: float = 5.0) -> Any:
        if self._loop is None or not self.running:
            coro.close()
            raise RuntimeError("the server is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self.running:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=THREAD_STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("the server thread did not stop within %.0f s", THREAD_STOP_TIMEOUT_S)
        self._thread = None
        self.server = None
        self.advertiser = None
        self.web = None
