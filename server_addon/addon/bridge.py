"""The cross-thread bridge between the add-on and the farm server's loop thread. No bpy.

- ServerLink: one started server. On the loop thread it follows the server's changes and publishes a
  FarmView at most every PUBLISH_INTERVAL_S; from other threads it asks the loop for job actions and
  job creation (`run_coroutine_threadsafe`, `ServerThread.call`), with timeouts.
- ServerAdapter: every use of the server core's objects (ServerThread, the FarmService it runs) by the
  add-on, one line each, so that the core's names live in this one class.
What crosses back to Blender's main thread goes through an Outbox (outbox.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocol.manifest import Manifest

from ..core.config import ServerConfig
from ..core.jobs import JobState
from ..core.scheduler import JobActionError
from ..core.service import FarmService
from ..core.storage import PARTIAL_PREFIX, ContentStore, UnsafeName
from ..thread import ServerThread
from .errors import FarmError, sentence
from .outbox import FarmView, Outbox
from .submit import JobSubmission

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The farm's state is snapshotted for the panel at most this often (a busy farm changes many times a second).
PUBLISH_INTERVAL_S = 0.1
#: Worker threads asking the server loop something.
CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ServerSettings:
    """What Start Server was given (from the add-on preferences)."""

    output_dir: Path
    host: str = "0.0.0.0"
    port: int = 9090
    secret: str = ""
    farm_name: str = ""
    discovery: bool = True
    web_port: int | None = None  # None: no web interface
    web_host: str = "127.0.0.1"


@dataclass(frozen=True)
class JobEnd:
    """Where a followed job stands, as plain data: its state ("gone" once deleted), its error, and the path
    of its first frame once it is done."""

    state: str
    error: str = ""
    frame: Path | None = None


class ServerAdapter:
    """The add-on's every use of the server core, the thread that runs it and the server object, one line each
    (the core's names are here alone). "Loop thread": only inside on_loop() or a listener."""

    #: What a refused job action raises; its message is the reason for the user.
    REFUSALS: tuple[type[Exception], ...] = (JobActionError, UnsafeName)
    #: The JobEnd states of a job that ended without rendering its frame (a deleted job's is "gone").
    FAILED = (JobState.FAILED.value, JobState.CANCELLED.value)

    def __init__(self, settings: ServerSettings) -> None:
        config = ServerConfig(output_dir=settings.output_dir, host=settings.host, port=settings.port,
                              secret=settings.secret or None)
        if settings.farm_name:
            config.farm_name = settings.farm_name
        web = {} if settings.web_port is None else {"web_port": settings.web_port, "web_host": settings.web_host}
        self.thread = ServerThread(config, discovery=settings.discovery, **web)

    # --- any thread

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()  # withdraws the zeroconf service, closes every connection, frees the port

    @property
    def started(self) -> bool:
        return self.thread.service is not None

    @property
    def port(self) -> int | None:
        return self.thread.port

    @property
    def web_port(self) -> int | None:
        return self.thread.web_port

    def on_loop(self, fn: Callable[[], T], timeout: float) -> T:
        return self.thread.call(lambda _server: fn(), timeout)

    @property
    def files(self) -> ContentStore:  # the content store may be used from any thread
        return _present(self.thread.service).files

    def drop_path(self) -> Path:
        return self.files.root / f"{PARTIAL_PREFIX}{secrets.token_hex(8)}.blend"

    def job_action(self, action: str, job_id: str, args: dict[str, Any] | None) -> Coroutine[Any, Any, str]:
        return _present(self.thread.service).job_action(action, job_id, args)  # the coroutine runs on the loop

    # --- loop thread

    @property
    def _server(self) -> FarmService:
        return _present(self.thread.service)

    def snapshot(self) -> dict[str, Any]:
        return self._server.snapshot()

    def follow(self, listener: Callable[[], None]) -> None:
        self._server.feed.listen(listener)

    def create_job(self, name: str, manifest: Manifest, job: JobSubmission) -> str:
        return self._server.create_job(name, manifest.main_file.sha256, manifest.main_file.size, job.request,
                                       start=True, priority=job.priority, video=job.video, project=manifest).id

    def job_end(self, job_id: str) -> JobEnd:
        job = self._server.farm.jobs.get(job_id)
        if job is None:
            return JobEnd("gone")
        frame = None
        if job.state is JobState.DONE and job.settings is not None:
            frame = self._server.outputs.frame_path(job.id, job.settings.frames[0], job.settings.ext)
        return JobEnd(job.state.value, job.error, frame)


def _present(server: FarmService | None) -> FarmService:
    if server is None:
        raise FarmError("The farm server is not running; start it first.")
    return server


class ServerLink:
    """A started farm server, seen from the add-on's threads. Made by open(); closed by close()."""

    def __init__(self, adapter: ServerAdapter, outbox: Outbox) -> None:
        self.adapter = adapter
        self._outbox = outbox
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publish_pending = False  # loop thread only
        self._watched: set[str] = set()  # loop thread only: jobs whose frame goes to the Image Editor

    @classmethod
    def open(cls, settings: ServerSettings, outbox: Outbox) -> ServerLink:
        """Start a server (blocks: a worker thread's call). Raises FarmError with the sentence for the user."""
        try:
            settings.output_dir.mkdir(parents=True, exist_ok=True)
            adapter = ServerAdapter(settings)
            adapter.start()
        except Exception as exc:
            # asyncio's bind error repeats the address; the errno's text is the sentence a user needs.
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
            raise FarmError(f"Could not start the farm server on {settings.host}:{settings.port}: {reason}.") from None
        link = cls(adapter, outbox)
        try:
            link._loop = adapter.on_loop(link._attach, CALL_TIMEOUT_S)
        except Exception as exc:  # the loop died under us: leave nothing running
            adapter.stop()
            raise FarmError(f"The farm server stopped while starting: {exc}.") from None
        return link

    def close(self) -> None:
        self._loop = None
        self.adapter.stop()

    @property
    def thread(self) -> ServerThread:
        """The server core's thread (scripts and tests reach the server through its call())."""
        return self.adapter.thread

    @property
    def alive(self) -> bool:
        return self._loop is not None and self.adapter.started

    @property
    def port(self) -> int | None:
        return self.adapter.port

    @property
    def web_port(self) -> int | None:
        return self.adapter.web_port

    @property
    def files(self) -> ContentStore:
        return self.adapter.files

    def drop_path(self) -> Path:
        return self.adapter.drop_path()

    # --- server -> UI (loop thread) ----------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        """Follow the server's changes, and publish a first view."""
        self.adapter.follow(self._on_change)
        self._publish()
        return asyncio.get_running_loop()

    def _on_change(self) -> None:
        """A server listener: publish soon, once for any number of changes."""
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_later(PUBLISH_INTERVAL_S, self._publish)

    def _publish(self) -> None:
        self._publish_pending = False
        if not self.adapter.started:  # stopped while the publication waited
            return
        self._outbox.put_view(FarmView.of(self.adapter.snapshot()))
        if self._watched:
            self._check_watched()

    def _check_watched(self) -> None:
        """Hand the frame of a finished Render Current Frame job to the main thread."""
        for job_id in list(self._watched):
            end = self.adapter.job_end(job_id)
            if end.state == "gone" or end.state in ServerAdapter.FAILED:
                self._watched.discard(job_id)
                if end.state != "gone":
                    reason = f": {end.error}" if end.error else ""
                    self._outbox.post("ERROR", sentence(f"Render Current Frame: job {job_id} {end.state}{reason}"))
            elif end.frame is not None:
                self._watched.discard(job_id)
                if end.frame.is_file():
                    self._outbox.put_result(end.frame)
                else:
                    self._outbox.post("WARNING", f"Job {job_id} ended without its frame.")

    # --- UI -> server ------------------------------------------------------------------------

    def job_action(self, action: str, job_id: str, args: dict[str, Any] | None, wait: float) -> str | None:
        """Ask the loop for a job action. Returns its sentence if it answers within `wait` (None: the answer
        comes later as a Notice). Raises FarmError with the server's reason."""
        loop = self._loop
        if loop is None:
            raise FarmError("The farm server is not running; start it first.")
        coro = self.adapter.job_action(action, job_id, args)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed a moment ago
            coro.close()
            raise FarmError("The farm server is not running; start it first.") from None
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(self._late_answer)
            return None
        except ServerAdapter.REFUSALS as exc:
            raise FarmError(sentence(str(exc))) from None

    def _late_answer(self, future: concurrent.futures.Future[str]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._outbox.post("INFO", sentence(future.result()))
        else:
            self._outbox.post("ERROR", sentence(str(exc)))

    def create_job(self, job: JobSubmission, name: str, manifest: Manifest) -> str:
        """Create the job on the loop (blocks up to CALL_TIMEOUT_S), and follow it when its frame is to be shown."""
        def create() -> str:
            job_id = self.adapter.create_job(name, manifest, job)
            if job.show_result:
                self._watched.add(job_id)
            return job_id
        return self.adapter.on_loop(create, CALL_TIMEOUT_S)
