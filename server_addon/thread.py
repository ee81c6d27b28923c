"""Run a FarmApp on its own event loop in a daemon thread (how the Blender add-on runs the server).

The thin thread-safe side of the server: everything the server does runs on its loop; other threads
(Blender's UI) reach it only through call() and submit(), which wait with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from protocol.discovery import Advertiser, interface_addresses

from .app import FarmApp
from .core.config import ServerConfig
from .core.service import FarmService

if TYPE_CHECKING:
    from .web import WebServer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long start() and stop() wait for the server thread before giving up.
THREAD_START_TIMEOUT_S = 10.0
THREAD_STOP_TIMEOUT_S = 10.0


class ServerThread:
    """Owns the loop thread. Calls from other threads go through call()/submit().

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
        # Checked here, so that a wrong interface is an error of the caller, not a log line.
        checked = interface_addresses(interfaces) if discovery and interfaces else None
        self._app = FarmApp(config, discovery=discovery, interfaces=checked, web_port=web_port, web_host=web_host)
        self.service: FarmService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int | None:
        return self._app.port if self.service else None

    @property
    def web(self) -> WebServer | None:
        return self._app.web if self.service else None

    @property
    def web_port(self) -> int | None:
        return self.web.port if self.web else None

    @property
    def advertiser(self) -> Advertiser | None:
        """The zeroconf advertisement, once it is out."""
        return self._app.advertiser

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
            await self._app.start()  # may fail with a reason to show (folders, database, web port)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        self.service = self._app.service
        ready.set_result(None)
        await self._stopped.wait()
        await self._app.stop()

    def call(self, fn: Callable[[FarmService], T], timeout: float = 5.0) -> T:
        """Run fn(service) on the loop thread and return its result."""
        async def runner() -> T:
            assert self.service is not None
            return fn(self.service)
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
        self.service = None
