"""The composition root: the one place that builds the farm server's parts, starts them in one order and
stops them in the reverse one. The headless server (server_addon.__main__) and the add-on's server thread
(server_addon.thread) both run a FarmApp.

    open the stores -> recover jobs -> service -> render-client and tool sides -> TCP port
    -> watchdog and first dispatch -> web interface (optional) -> metrics port (optional)
    -> zeroconf advertisement (optional)

Constructing a FarmApp does no I/O; start() does all of it, and a part that cannot start stops the ones
started before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from protocol.auth import farm_key
from protocol.discovery import Advertiser
from protocol.errors import DiscoveryError
from protocol.secret import SecretError, refuse_example

from .core.config import ServerConfig, ServerStartError, ServerStats
from .core.control import ControlConnections
from .core.database import Database, DatabaseError, GuardedStore
from .core.listener import Listener
from .core.recovery import recover
from .core.scheduler import Farm
from .core.service import FarmService
from .core.storage import ContentStore, OutputStore
from .core.tasks import Tasks
from .core.workers import ClientOutboxes, Workers

if TYPE_CHECKING:
    from .web import WebServer
    from .web.metrics import MetricsServer

__all__ = ["FarmApp", "ServerStartError", "WebStartError"]

log = logging.getLogger(__name__)

#: Frame rows reach SQLite in batches at most this long after they change (see core.database.Database).
FRAME_BATCH_S = 0.5


class WebStartError(ServerStartError, OSError):
    """The web interface could not listen where it was told; the message is one line for the user."""


class FarmApp:
    """One farm server. With `web_port` (0: a free one) the web interface runs on `web_host` (loopback unless
    told otherwise); with `discovery` the farm is advertised over zeroconf once it listens (on `interfaces`,
    checked addresses; by default the interface of `config.host`, or all for 0.0.0.0). With `metrics_port`
    the Prometheus metrics (also on the web port) are served on a port of their own, on `metrics_host`."""

    def __init__(self, config: ServerConfig, *, discovery: bool = False, interfaces: Sequence[str] | None = None,
                 web_port: int | None = None, web_host: str = "127.0.0.1",
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._discovery = discovery
        self._interfaces = interfaces
        self._web_port = web_port
        self._web_host = web_host
        self._metrics_port = metrics_port
        self._metrics_host = metrics_host
        self._clock = clock
        self.service: FarmService | None = None
        self.web: WebServer | None = None
        self.metrics: MetricsServer | None = None
        self.advertiser: Advertiser | None = None
        self._db: Database | None = None
        self._tasks = Tasks()
        self._auth: Any = None  # web.auth.Auth: the web's and the metrics' one line of wrong guesses, made with either
        self._workers: Workers | None = None
        self._listener: Listener | None = None
        self._advertising: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        return self._listener.port if self._listener else None

    async def start(self) -> None:
        config = self.config
        try:  # (the command line refuses it too; the add-on's setting comes this way only)
            refuse_example(config.secret or "")
        except SecretError as exc:
            raise ServerStartError(str(exc)) from None
        try:
            outputs = OutputStore(config.output_dir)
            # Every file of every job by sha256 (.blends, textures, caches, ...).
            files = ContentStore(config.resolved_data_dir / "files", legacy=config.resolved_data_dir / "blends")
            self._db = Database(config.resolved_data_dir / "jobs.sqlite3", frame_batch_s=FRAME_BATCH_S)
        except OSError as exc:
            raise ServerStartError(f"cannot use {exc.filename or config.output_dir}: {exc.strerror or exc}") from None
        except DatabaseError as exc:
            raise ServerStartError(str(exc)) from None
        store = GuardedStore(self._db)
        farm = Farm(self._clock, store=store)  # SQLite's refusals pause jobs, not the farm
        try:
            recover(farm, self._db, files, outputs)
            stats = ServerStats()
            outboxes = ClientOutboxes()
            service = FarmService(config, farm, files, outputs, outbox=outboxes, tasks=self._tasks, stats=stats,
                                  clock=self._clock)
            self._workers = Workers(service, outboxes, self._tasks, config, self._clock)
            control = ControlConnections(service, self._tasks)
            self._listener = Listener(config, stats, self._tasks, workers=self._workers, control=control)
            if config.secret:  # the stretched key (a tenth of a second) made before the first handshake needs it
                await asyncio.to_thread(farm_key, config.secret)
            await self._listener.start()
            self._tasks.spawn(self._workers.watchdog())
            self._tasks.spawn(self._flush_frames(service, store))
            service.start()
            self.service = service
            log.info("farm %r listening on %s:%d, output in %s", config.farm_name, config.host, self.port,
                     outputs.root)
            if self._web_port is not None:
                self.web = await self._start_web(service)
            if self._metrics_port is not None:
                self.metrics = await self._start_metrics(service)
        except BaseException:
            await self.stop()
            raise
        if self._discovery:
            # In the background: a caller (the add-on's UI) does not wait for zeroconf.
            self._advertising = asyncio.get_running_loop().create_task(self._advertise())

    @staticmethod
    async def _flush_frames(service: FarmService, store: GuardedStore) -> None:
        while True:
            await asyncio.sleep(FRAME_BATCH_S)
            if store.flush():  # refused (a full disk): their jobs pause with the reason, the rows wait
                with service.unit():
                    pass

    def _web_auth(self) -> Any:
        if self._auth is None:
            from .web.auth import Auth
            self._auth = Auth(self.config.secret)
        return self._auth

    async def _start_web(self, service: FarmService) -> WebServer:
        from .web import start_web  # aiohttp is needed only for the web interface

        try:
            return await start_web(service, self._web_host, self._web_port or 0, self.config.secret,
                                   auth=self._web_auth())
        except OSError as exc:
            raise WebStartError(f"cannot start the web interface on {self._web_host}:{self._web_port}: "
                                f"{exc.strerror or exc}") from None

    async def _start_metrics(self, service: FarmService) -> MetricsServer:
        from .web.metrics import start_metrics

        try:
            return await start_metrics(service, self._metrics_host, self._metrics_port or 0, self.config.secret,
                                         auth=self._web_auth())
        except OSError as exc:
            raise WebStartError(f"cannot serve the metrics on {self._metrics_host}:{self._metrics_port}: "
                                f"{exc.strerror or exc}") from None

    async def _advertise(self) -> None:
        assert self.port is not None
        try:
            advertiser = Advertiser(self.config.farm_name, self.port, self.config.host,
                                    auth_required=bool(self.config.secret), interfaces=self._interfaces)
            await advertiser.start()
            self.advertiser = advertiser
        except DiscoveryError as exc:
            # The farm still works for clients given its address; only finding it is lost.
            log.error("%s; clients must be given the server's address (--server)", exc)

    async def advertised(self) -> None:
        """Wait until the advertisement is out (or failed, which is logged)."""
        if self._advertising is not None:
            await asyncio.gather(self._advertising, return_exceptions=True)

    async def stop(self) -> None:
        """Stop in the reverse order: withdrawn first (clients must not find a server that is going away),
        then the web, the port and its connections, background work, and the database last."""
        if self._advertising is not None:
            self._advertising.cancel()
            await asyncio.gather(self._advertising, return_exceptions=True)
            self._advertising = None
        if self.advertiser is not None:
            await self.advertiser.close()
            self.advertiser = None
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self._workers is not None:
            self._workers.close()  # from here on a closing connection is no client's failure
        if self.service is not None:
            self.service.finishing.close()
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
        await self._tasks.cancel_all()
        if self._listener is not None:
            await self._listener.wait_server_closed()
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None
            log.info("farm %r stopped", self.config.farm_name)
