"""The farm server: an asyncio TCP server that speaks the MicroFarm protocol.

One task per connection reads messages; one writer task per render client sends what the
scheduler decides, in order. Everything runs on the server's own event loop (its own thread
inside Blender), so nothing here ever blocks a UI.

This module holds the server's lifecycle, connection acceptance and handshake, change notification
and dispatch; render clients live in workers (frames in uploads), tools in control, job actions in
actions, and stitching and videos in finishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import messages as m
from protocol.blendfile import BlenderVersion, BlendHeaderError, HeaderUnreadable, read_version
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.handshake import Peer, server_handshake
from protocol.limits import HANDSHAKE_MAX_BYTES, HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, MAX_MESSAGE_BYTES
from protocol.manifest import Manifest
from protocol.messages import Role
from protocol.settings import BLENDER_FILE, JobRequest
from protocol.stream import MessageStream

from .actions import JOB_ACTIONS, MAX_PRIORITY, JobActions
from .control import ControlConnections
from .database import Database, DatabaseError
from .finishing import Finishing
from .jobs import Job, Lease, LeaseKind
from .scheduler import Farm, add_warning
from .storage import ContentStore, OutputStore, UnsafeName, new_job_id
from .video import remove_leftovers
from .workers import HANG_FACTOR, HANG_MIN_S, HANG_MIN_SAMPLES, MAX_LOST_CLIENTS_SHOWN, Workers

__all__ = [
    "HANG_FACTOR", "HANG_MIN_S", "HANG_MIN_SAMPLES", "JOB_ACTIONS", "MAX_CONNECTIONS", "MAX_LOST_CLIENTS_SHOWN",
    "MAX_PENDING_HANDSHAKES", "MAX_PRIORITY", "STOP_GRACE_S", "FarmServer", "ServerConfig", "ServerStartError",
    "ServerStats",
]

log = logging.getLogger(__name__)

#: At most this many connections in all, and this many still in their handshake; more are closed.
MAX_CONNECTIONS = 512
MAX_PENDING_HANDSHAKES = 64
#: How long stop() lets connection handlers finish before it cancels them.
STOP_GRACE_S = 2.0


class ServerStartError(Exception):
    """The server cannot start: its folders or its job database are unusable (the message says which)."""


@dataclass
class ServerConfig:
    output_dir: Path
    host: str = "0.0.0.0"
    port: int = 9090
    data_dir: Path | None = None
    secret: str | None = None
    farm_name: str = field(default_factory=socket.gethostname)
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S
    hang_factor: float = HANG_FACTOR
    hang_min_s: float = HANG_MIN_S

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.output_dir / ".microfarm"


@dataclass
class ServerStats:
    blend_bytes_sent: int = 0  # job files (the .blend and what it needs) sent to render clients
    files_sent: int = 0
    upload_bytes_received: int = 0  # job files received from submitters (only what the store lacked)
    files_received: int = 0
    frames_stored: int = 0
    duplicate_frames: int = 0
    connections_refused: int = 0


class FarmServer:
    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        try:
            self.outputs = OutputStore(config.output_dir)
            # Every file of every job by sha256 (the name stays: the add-on and the web upload store .blends in it).
            self.blends = ContentStore(config.resolved_data_dir / "files", legacy=config.resolved_data_dir / "blends")
            self.db = Database(config.resolved_data_dir / "jobs.sqlite3")
        except OSError as exc:
            raise ServerStartError(f"cannot use {exc.filename or config.output_dir}: {exc.strerror or exc}") from None
        except DatabaseError as exc:
            raise ServerStartError(str(exc)) from None
        self.farm = Farm(clock, store=self.db)
        self.blends.remove_partials()
        remove_leftovers(self.outputs.root)
        for job in self.db.load(self.outputs):
            if job.file_blender is None and not job.state.finished:
                # A job stored before versions were kept: read its file's header now, so that no older
                # client is given it.
                with contextlib.suppress(BlendHeaderError, OSError):
                    job.file_blender = read_version(self.blends.path(job.blend_sha256))
            self.farm.restore_job(job)
            # What a killed server left half-written: uploads and video builds.
            if self.outputs.job_dir(job.id).is_dir():
                self.outputs.remove_partials(job.id)
                remove_leftovers(self.outputs.job_dir(job.id))
        if self.farm.jobs:
            running = sum(1 for j in self.farm.jobs.values() if j.state.running)
            log.info("restored %d jobs (%d to continue) from %s", len(self.farm.jobs), running, self.db.path)
        # Once the jobs are back: what failed or abandoned submissions left in the store goes, unless a job
        # could not be restored (its files are not known, and nothing of a job may be lost).
        if self.db.unrestored:
            log.warning("%d jobs could not be restored; no stored file is removed", self.db.unrestored)
        elif removed := self.collect_files():
            log.info("removed %d stored files that no job uses from %s", removed, self.blends.root)
        self.stats = ServerStats()
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._streams: set[MessageStream] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._handshakes = asyncio.Semaphore(MAX_PENDING_HANDSHAKES)
        self._stopping = False
        self._ids = itertools.count(1)
        self._version = 0
        self._changed = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        # The parts that serve one side each; they hold this server and call back into it.
        self._workers = Workers(self)
        self._control = ControlConnections(self)
        self._actions = JobActions(self)
        self._finishing = Finishing(self)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.config.host, self.config.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._workers.watchdog())
        self._dispatch()  # restored jobs: hand out their work, build the videos a stop interrupted
        log.info("farm %r listening on %s:%d, output in %s", self.config.farm_name, self.config.host,
                 self.port, self.outputs.root)

    async def stop(self) -> None:
        self._stopping = True  # from here on a closing connection is no client's failure
        if self._server is not None:
            self._server.close()
        for stream in list(self._streams):
            stream.close()
        # Connection handlers end by themselves once their streams are closed; the rest is cancelled.
        handlers = [t for t in self._tasks if t in self._handlers]
        if handlers:
            await asyncio.wait(handlers, timeout=STOP_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
        self.db.close()
        log.info("farm %r stopped", self.config.farm_name)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=task.exception())

    # --- change notification ------------------------------------------------------------

    def _notify(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a broken listener must not take the server down
                log.exception("change listener failed")

    @property
    def version(self) -> int:
        """The state version: it moves on every change (see wait_change)."""
        return self._version

    async def wait_change(self, version: int, timeout: float) -> int:
        """Wait until the state version moves past `version`; returns the current version."""
        if self._version == version:
            event = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        return self._version

    def snapshot(self) -> dict[str, Any]:
        jobs = sorted(self.farm.jobs.values(), key=lambda j: (j.state.finished, -j.priority, j.seq))
        return {
            "farm": self.config.farm_name,
            "jobs": [job.view() for job in jobs],
            "clients": self.farm.client_views(),
        }

    # --- job operations (used by control connections and by the add-on) ------------------

    def create_job(self, name: str, blend_sha256: str, blend_size: int, request: JobRequest, *,
                   start: bool = True, priority: int = 0, video: dict[str, Any] | None = None,
                   project: Manifest | None = None, warnings: Sequence[str] = ()) -> Job:
        """A new job of files already in the store; `warnings` are known at submission (files left behind)."""
        if not self.blends.has(blend_sha256):
            raise ValueError("the .blend for this job is not on the server")
        if project is not None:
            main = project.main_file
            if (main.sha256, main.size) != (blend_sha256, blend_size):
                raise ValueError("the project's main file is not the job's .blend")
            lacking = [f.relpath for f in project.files if not self.blends.has(f.sha256, f.size)]
            if lacking:
                raise ValueError(f"files of this job are not on the server: {', '.join(lacking[:5])}")
        if request.split is not None and video is not None:
            raise ValueError("a split job renders one frame; it makes no video")
        job_id = new_job_id(name)
        while job_id in self.farm.jobs:
            job_id = new_job_id(name)
        file_blender = self._file_version(name, blend_sha256, request)
        job = Job(id=job_id, name=name, blend_sha256=blend_sha256, blend_size=blend_size,
                  request=request, created=time.time(), priority=priority, video=video, file_blender=file_blender,
                  project=project)
        for warning in warnings:
            add_warning(job, warning)
        self.farm.add_job(job, start=start)
        self._dispatch()
        self._notify()
        return job

    def collect_files(self, candidates: Iterable[str] | None = None) -> int:
        """Delete the stored files (all, or `candidates`) that no job uses and no submission in progress pins."""
        used: set[str] = set()
        for job in self.farm.jobs.values():
            used |= job.manifest.shas()
        return self.blends.collect(used, candidates)

    def _file_version(self, name: str, blend_sha256: str, request: JobRequest) -> BlenderVersion | None:
        """The Blender that saved the job's file (its header: a few bytes, decompressed if need be)."""
        try:
            saved = read_version(self.blends.path(blend_sha256))
        except HeaderUnreadable as exc:
            if request.blender == BLENDER_FILE:
                raise ValueError(f"{name}: {exc}, so --blender file cannot be honoured") from None
            # Without zstandard the version stays unknown: clients that cannot open the file say so.
            log.warning("%s: %s; the version that saved it is unknown", name, exc)
            return None
        except BlendHeaderError as exc:
            raise ValueError(f"{name}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"{name}: the stored .blend cannot be read: {exc}") from None
        wanted = BlenderVersion.parse(request.blender or "")
        if wanted is not None and wanted.line < saved.line:
            raise ValueError(f"{name} was saved by Blender {saved}; Blender {request.blender} cannot open it")
        return saved

    async def job_action(self, action: str, job_id: str = "", args: dict[str, Any] | None = None) -> str:
        """Carry out a job action; returns a sentence for the user. Raises JobActionError."""
        return await self._actions.run(action, job_id, args)

    # --- scheduling ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Push work to every idle client at once, and tell clients what is no longer wanted."""
        self._finishing.start()
        self.farm.note_waiting()
        for revocation in self.farm.drain_revocations():
            conn = self._workers.get(revocation.client_id)
            if conn is not None:
                conn.post(m.Revoke(lease_id=revocation.lease_id, frames=list(revocation.frames)))
        for client_id in self.farm.idle_clients():
            conn = self._workers.get(client_id)
            if conn is None:
                continue
            lease = self.farm.next_work(client_id)
            if lease is not None:
                conn.post(self._work_message(lease))

    def _work_message(self, lease: Lease) -> m.Message:
        job = self.farm.jobs[lease.job_id]
        if lease.kind is LeaseKind.PROBE:
            log.info("job %s: probing the scene on client %s", job.id, lease.client_id)
            return m.Probe.of(job.manifest, lease_id=lease.id, job_id=job.id)
        assert job.settings is not None
        log.info("job %s: frames %s to client %s (lease %d)", job.id, ",".join(map(str, lease.frames)),
                 lease.client_id, lease.id)
        # The job's manifest was checked when it arrived: it is not checked again for every chunk it is sent with.
        return m.Assign.of(job.manifest, lease_id=lease.id, job_id=job.id, frames=lease.frames,
                           settings=job.settings.to_assignment())

    # --- connections ----------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        stream = MessageStream(reader, writer, max_bytes=HANDSHAKE_MAX_BYTES)
        address = stream.peer
        if self._stopping or len(self._streams) >= MAX_CONNECTIONS or self._handshakes.locked():
            self.stats.connections_refused += 1
            log.warning("connection from %s refused: too many connections", address)
            await stream.aclose()
            return
        assert task is not None
        self._tasks.add(task)
        self._handlers.add(task)
        self._streams.add(stream)
        task.add_done_callback(self._tasks.discard)
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
                    stream, farm=self.config.farm_name, secret=self.config.secret,
                    assign_id=self._new_client_id, heartbeat_s=self.config.heartbeat_interval)
        except (TimeoutError, ProtocolError, OSError) as exc:
            self.stats.connections_refused += 1
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
