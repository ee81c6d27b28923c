"""The farm server: an asyncio TCP server that speaks the MicroFarm protocol.

One task per connection reads messages; one writer task per render client sends what the
scheduler decides, in order. Everything runs on the server's own event loop (its own thread
inside Blender), so nothing here ever blocks a UI.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import messages as m
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.handshake import Peer, server_handshake
from protocol.limits import (
    HANDSHAKE_MAX_BYTES,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TIMEOUT_S,
    MAX_BLEND_BYTES,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
)
from protocol.messages import Role
from protocol.settings import JobRequest, SceneInfo, SettingsError
from protocol.stream import FileSink, MessageStream

from .database import Database, DatabaseError
from .jobs import Job, JobState, Lease, LeaseKind
from .scheduler import Farm, JobActionError
from .stitch import StitchError, jpeg_encoder_available, stitch
from .storage import BlendStore, OutputStore, UnsafeName, frame_name, new_job_id
from .video import VideoError, VideoSettings, build_video, check_sequence, remove_leftovers, video_path

log = logging.getLogger(__name__)

#: Lost clients kept in the status list for the user to see; older ones are forgotten.
MAX_LOST_CLIENTS_SHOWN = 32
#: A client on one frame for longer than FACTOR times the job's median frame time (and at least
#: MIN_S, and only once MIN_SAMPLES frames were measured) is treated as lost.
HANG_FACTOR = 10.0
HANG_MIN_S = 120.0
HANG_MIN_SAMPLES = 3
#: Job priorities lie within plus or minus this.
MAX_PRIORITY = 1_000_000
#: At most this many connections in all, and this many still in their handshake; more are closed.
MAX_CONNECTIONS = 512
MAX_PENDING_HANDSHAKES = 64
#: How long stop() lets connection handlers finish before it cancels them.
STOP_GRACE_S = 2.0
#: The job actions a control connection (or the add-on) may ask for.
JOB_ACTIONS = ("cancel", "pause", "resume", "force_complete", "delete", "clear_completed", "priority", "video")


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
    blend_bytes_sent: int = 0
    frames_stored: int = 0
    duplicate_frames: int = 0
    connections_refused: int = 0


@dataclass
class _Incoming:
    """A frame upload in progress on one connection."""

    begin: m.FrameBegin
    sink: FileSink | None  # None: the frame is unwanted; its bytes are read and dropped
    received: int = 0


class _WorkerConnection:
    def __init__(self, server: FarmServer, stream: MessageStream, client_id: str, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.client_id = client_id
        self.peer = peer
        self.last_seen = server.clock()
        self.last_ping = self.last_seen
        self.incoming: _Incoming | None = None
        self.outbox: asyncio.Queue[m.Message | tuple[m.BlendBegin, Path]] = asyncio.Queue()
        self.writer_task: asyncio.Task[None] | None = None

    def post(self, message: m.Message | tuple[m.BlendBegin, Path]) -> None:
        self.outbox.put_nowait(message)

    async def write_loop(self) -> None:
        counter = [0]
        try:
            while True:
                item = await self.outbox.get()
                if isinstance(item, tuple):
                    begin, path = item
                    counter[0] = 0
                    try:
                        await self.stream.send_file(begin, path, counter=counter)
                    finally:
                        self.server.stats.blend_bytes_sent += counter[0]
                    log.info("client %s: sent .blend %s (%d bytes)", self.peer.name, begin.sha256[:12], counter[0])
                else:
                    await self.stream.send(item)
        except (ProtocolError, OSError) as exc:
            log.info("client %s: send failed: %s", self.peer.name, exc)
            self.stream.close()


class FarmServer:
    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        try:
            self.outputs = OutputStore(config.output_dir)
            self.blends = BlendStore(config.resolved_data_dir / "blends")
            self.db = Database(config.resolved_data_dir / "jobs.sqlite3")
        except OSError as exc:
            raise ServerStartError(f"cannot use {exc.filename or config.output_dir}: {exc.strerror or exc}") from None
        except DatabaseError as exc:
            raise ServerStartError(str(exc)) from None
        self.farm = Farm(clock, store=self.db)
        self.blends.remove_partials()
        remove_leftovers(self.outputs.root)
        for job in self.db.load(self.outputs):
            self.farm.restore_job(job)
            # What a killed server left half-written: uploads and video builds.
            if self.outputs.job_dir(job.id).is_dir():
                self.outputs.remove_partials(job.id)
                remove_leftovers(self.outputs.job_dir(job.id))
        if self.farm.jobs:
            running = sum(1 for j in self.farm.jobs.values() if j.state.running)
            log.info("restored %d jobs (%d to continue) from %s", len(self.farm.jobs), running, self.db.path)
        self.stats = ServerStats()
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._workers: dict[str, _WorkerConnection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._videos: dict[str, asyncio.Task[None]] = {}
        self._stitches: dict[str, asyncio.Task[None]] = {}
        self._streams: set[MessageStream] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._handshakes = asyncio.Semaphore(MAX_PENDING_HANDSHAKES)
        self._stopping = False
        self._ids = itertools.count(1)
        self._version = 0
        self._changed = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.config.host, self.config.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._watchdog())
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
                   start: bool = True, priority: int = 0, video: dict[str, Any] | None = None) -> Job:
        if not self.blends.has(blend_sha256):
            raise ValueError("the .blend for this job is not on the server")
        if request.split is not None and video is not None:
            raise ValueError("a split job renders one frame; it makes no video")
        job_id = new_job_id(name)
        while job_id in self.farm.jobs:
            job_id = new_job_id(name)
        job = Job(id=job_id, name=name, blend_sha256=blend_sha256, blend_size=blend_size,
                  request=request, created=time.time(), priority=priority, video=video)
        self.farm.add_job(job, start=start)
        self._dispatch()
        self._notify()
        return job

    async def job_action(self, action: str, job_id: str = "", args: dict[str, Any] | None = None) -> str:
        """Carry out a job action; returns a sentence for the user. Raises JobActionError."""
        args = args or {}
        farm = self.farm
        if action == "cancel":
            farm.cancel_job(job_id)
            message = f"job {job_id} cancelled"
        elif action == "pause":
            farm.pause_job(job_id)
            message = f"job {job_id} paused"
        elif action == "resume":
            job = farm.resume_job(job_id)
            message = f"job {job_id} {job.state.value}"
        elif action == "force_complete":
            job = farm.force_complete(job_id)
            message = f"job {job_id} completed with {job.frames_done} of {len(job.frames)} frames"
        elif action == "priority":
            priority = args.get("priority")
            if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
                raise JobActionError(f"priority must be a whole number between -{MAX_PRIORITY} and {MAX_PRIORITY}")
            farm.set_priority(job_id, priority)
            message = f"job {job_id} priority {priority}"
        elif action == "delete":
            job = farm.delete_job(job_id)
            building = self._videos.pop(job_id, None)
            if building is not None:
                building.cancel()
            message = f"job {job_id} deleted"
            if args.get("files"):
                await asyncio.to_thread(self._delete_files, job)
                message += " with its files"
            self._forget_blend(job.blend_sha256)
        elif action == "video":
            job = farm.job(job_id)
            if job.state is not JobState.DONE:
                raise JobActionError(f"job {job_id} is {job.state.value}; a video is built from a finished job")
            try:
                settings = VideoSettings.from_wire(args)
            except ValueError as exc:
                raise JobActionError(str(exc)) from None
            previous = self._videos.pop(job.id, None)
            if previous is not None:
                previous.cancel()
            job.video, job.video_state, job.video_error = settings.to_wire(), "", ""
            farm.store.save_job(job)
            message = f"building a {settings.codec} video of job {job_id}"
        elif action == "clear_completed":
            cleared = farm.clear_finished()
            for job in cleared:
                self._forget_blend(job.blend_sha256)
            message = f"cleared {len(cleared)} finished jobs"
        else:
            raise JobActionError(f"unknown job action {action!r}; known: {', '.join(JOB_ACTIONS)}")
        self._dispatch()
        self._notify()
        return message

    def _delete_files(self, job: Job) -> None:
        job_dir = self.outputs.job_dir(job.id)
        if job_dir.is_dir():
            shutil.rmtree(job_dir)
        if job.video_path:
            with contextlib.suppress(OSError):
                Path(job.video_path).unlink()

    def _forget_blend(self, sha256: str) -> None:
        """Remove a .blend from the store once no job uses it."""
        if any(j.blend_sha256 == sha256 for j in self.farm.jobs.values()):
            return
        with contextlib.suppress(OSError, UnsafeName):
            self.blends.path(sha256).unlink()

    # --- scheduling ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Push work to every idle client at once, and tell clients what is no longer wanted."""
        self._start_videos()
        self._start_stitches()
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

    def _start_stitches(self) -> None:
        for job in self.farm.jobs.values():
            if job.stitch_due and job.id not in self._stitches:
                self._stitches[job.id] = self._spawn(self._stitch(job))

    async def _stitch(self, job: Job) -> None:
        """Stitch a split job's tiles into its frame, off the loop; the job is done once the frame is there."""
        task = asyncio.current_task()
        settings, scene = job.settings, job.scene
        assert settings is not None and settings.split is not None and scene is not None
        spec = settings.split
        try:
            tiles = [self.outputs.tile_path(job.id, spec.frame, i, settings.tile_ext) for i in range(spec.tiles)]
            output = self.outputs.frame_path(job.id, spec.frame, settings.ext)
            started = time.monotonic()
            await asyncio.to_thread(stitch, spec, tiles, output, settings.file_format, quality=scene.quality,
                                    exr_codec=scene.exr_codec)
            log.info("job %s: frame %d stitched from %d tiles in %.2f s -> %s", job.id, spec.frame, spec.tiles,
                     time.monotonic() - started, output.name)
            await asyncio.to_thread(shutil.rmtree, self.outputs.tiles_dir(job.id), True)
            self.farm.stitch_done(job.id)
        except (StitchError, UnsafeName) as exc:
            log.warning("job %s: stitching failed: %s", job.id, exc)
            self.farm.stitch_failed(job.id, str(exc))
        except Exception as exc:  # a bug: fail the job once instead of stitching again at every change
            log.exception("job %s: stitching failed", job.id)
            self.farm.stitch_failed(job.id, f"internal error ({type(exc).__name__}: {exc})")
        finally:
            if self._stitches.get(job.id) is task:
                del self._stitches[job.id]
        self._dispatch()
        self._notify()

    def _start_videos(self) -> None:
        for job in self.farm.jobs.values():
            if (job.state is JobState.DONE and job.video is not None and job.video_state in ("", "building")
                    and job.id not in self._videos):
                self._videos[job.id] = self._spawn(self._build_video(job))

    async def _build_video(self, job: Job) -> None:
        """Build a finished job's video with ffmpeg, off the loop; the outcome lands on the job."""
        task = asyncio.current_task()
        job.video_state, job.video_error = "building", ""
        self.farm.store.save_job(job)
        self._notify()
        state, error, path = "failed", "", ""
        try:
            assert job.settings is not None and job.video is not None
            settings = VideoSettings.from_wire(job.video)
            job_dir = self.outputs.job_dir(job.id)
            frames = await asyncio.to_thread(check_sequence, job_dir, list(job.settings.frames), job.settings.ext)
            log.info("job %s: building a %s video from %d frames", job.id, settings.codec, len(frames))
            built = await build_video(frames, job.settings.fps, settings,
                                      video_path(self.outputs.root, job_dir, job.id, settings))
            state, path = "done", str(built)
            log.info("job %s: video ready: %s", job.id, built)
        except (VideoError, ValueError, UnsafeName) as exc:
            error = str(exc)
            log.warning("job %s: no video: %s", job.id, error)
        except asyncio.CancelledError:
            state = ""  # stopped with the server or replaced: the next start builds it again
            raise
        finally:
            if self._videos.get(job.id) is task:
                del self._videos[job.id]
            if self.farm.jobs.get(job.id) is job:
                job.video_state, job.video_error = state, error
                if path:
                    job.video_path = path
                self.farm.store.save_job(job)
                self._notify()

    def _work_message(self, lease: Lease) -> m.Message:
        job = self.farm.jobs[lease.job_id]
        if lease.kind is LeaseKind.PROBE:
            log.info("job %s: probing the scene on client %s", job.id, lease.client_id)
            return m.Probe(lease_id=lease.id, job_id=job.id, blend_sha256=job.blend_sha256,
                           blend_size=job.blend_size)
        assert job.settings is not None
        log.info("job %s: frames %s to client %s (lease %d)", job.id, ",".join(map(str, lease.frames)),
                 lease.client_id, lease.id)
        return m.Assign(lease_id=lease.id, job_id=job.id, blend_sha256=job.blend_sha256,
                        blend_size=job.blend_size, frames=lease.frames, settings=job.settings.to_assignment())

    async def _watchdog(self) -> None:
        """Close the connections of clients that went silent for longer than the timeout (or hang on a
        frame), and ping the others so that they notice a server that went silent in turn."""
        while True:
            await asyncio.sleep(min(1.0, self.config.heartbeat_interval / 2))
            try:
                self._check_clients()
            except Exception:  # one bad round must not end the watchdog
                log.exception("watchdog round failed")

    def _check_clients(self) -> None:
        now = self.clock()
        for conn in list(self._workers.values()):
            silent = now - conn.last_seen
            if silent > self.config.heartbeat_timeout:
                log.warning("client %s: no heartbeat for %.1f s, taking its work back", conn.peer.name, silent)
                self._drop_worker(conn)
            elif now - conn.last_ping >= self.config.heartbeat_interval:
                conn.last_ping = now
                conn.post(m.Heartbeat(state="server"))
        for client_id, elapsed, limit in self.farm.hung_clients(self.config.hang_factor, self.config.hang_min_s,
                                                                 HANG_MIN_SAMPLES):
            conn = self._workers.get(client_id)
            if conn is not None:
                log.warning("client %s: on one frame for %.0f s (limit %.0f s); treating it as lost",
                            conn.peer.name, elapsed, limit)
                self._drop_worker(conn)

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
                await self._serve_worker(stream, peer, client_id)
            else:
                await self._serve_control(stream, peer, client_id)
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

    # --- render clients -----------------------------------------------------------------

    async def _serve_worker(self, stream: MessageStream, peer: Peer, client_id: str) -> None:
        conn = _WorkerConnection(self, stream, client_id, peer)
        self._forget_lost(peer)
        self.farm.connect_client(client_id, peer.name, peer.host or stream.peer.rsplit(":", 1)[0], peer.device,
                                 peer.devices)
        self._workers[client_id] = conn
        conn.writer_task = self._spawn(conn.write_loop())
        log.info("client %s connected from %s as %s (Blender %s)", peer.name, stream.peer, client_id,
                 peer.blender or "?")
        self._dispatch()
        self._notify()
        try:
            while conn.client_id in self._workers:  # the watchdog may have dropped it meanwhile
                message = await stream.recv()
                conn.last_seen = self.clock()
                self._on_worker_message(conn, message)
        except (ProtocolError, UnsafeName) as exc:
            if not isinstance(exc, ConnectionClosed):
                # Tell the client why, before its connection goes (its log then says what it did wrong).
                log.warning("client %s (%s): closing the connection: %s", peer.name, stream.peer, exc)
                with contextlib.suppress(ProtocolError, OSError, TimeoutError):
                    await asyncio.wait_for(stream.send(m.Error(reason=str(exc))), timeout=1.0)
                return
            raise
        finally:
            self._drop_worker(conn)

    def _drop_worker(self, conn: _WorkerConnection) -> None:
        if self._workers.pop(conn.client_id, None) is None:
            return
        conn.stream.close()
        if conn.writer_task is not None:
            conn.writer_task.cancel()
        if conn.incoming is not None and conn.incoming.sink is not None:
            conn.incoming.sink.abort()
        conn.incoming = None
        if self._stopping:
            return  # the server is going away: nobody's frames are lost, nothing to hand out
        self.farm.disconnect_client(conn.client_id)
        self._dispatch()
        self._notify()

    def _forget_lost(self, peer: Peer) -> None:
        lost = [c for c in self.farm.clients.values() if not c.connected]
        for record in lost:
            if record.name == peer.name and record.host == peer.host:
                self.farm.forget_client(record.id)
        lost = [c for c in self.farm.clients.values() if not c.connected]
        for record in lost[:max(0, len(lost) - MAX_LOST_CLIENTS_SHOWN)]:
            self.farm.forget_client(record.id)

    def _on_worker_message(self, conn: _WorkerConnection, message: m.Message) -> None:
        if isinstance(message, m.Heartbeat):
            if self.farm.client_reported(conn.client_id, message.state, message.lease_id, message.frame,
                                         message.device):
                self._dispatch()
                self._notify()
            return
        if isinstance(message, m.Chunk):
            self._frame_chunk(conn, message)
            return  # bytes of an upload change nothing anyone sees; only its end does
        if isinstance(message, m.End):
            self._frame_end(conn, message)
        elif isinstance(message, m.FrameBegin):
            self._frame_begin(conn, message)
        elif isinstance(message, m.FrameFailed):
            self.farm.frame_failed(message.lease_id, message.frame, conn.client_id,
                                   m.clip(message.error), m.clip(message.log))
        elif isinstance(message, m.LeaseDone):
            self.farm.lease_done(message.lease_id)
        elif isinstance(message, m.ProbeResult):
            self._probe_result(conn, message)
        elif isinstance(message, m.BlendRequest):
            self._blend_request(conn, message)
        else:
            raise ProtocolError(f"a render client may not send {message.TYPE.value}")
        self._dispatch()
        self._notify()

    def _probe_result(self, conn: _WorkerConnection, message: m.ProbeResult) -> None:
        scene: SceneInfo | None = None
        error = message.error
        if message.ok:
            try:
                scene = SceneInfo.from_wire(message.scene)
            except ProtocolError as exc:
                error = str(exc)
        if scene is not None:
            job = self.farm.probe_succeeded(message.lease_id, scene)
        else:
            log.warning("client %s could not read the .blend: %s", conn.peer.name, error)
            job = self.farm.probe_failed(message.lease_id, m.clip(error))
        if job is not None and job.state is JobState.RENDERING:
            self.outputs.job_dir(job.id).mkdir(parents=True, exist_ok=True)
            if job.settings.tiles and job.settings.file_format == "JPEG" and not jpeg_encoder_available():
                self.farm.fail_job(job, "a split JPEG frame is encoded on the server, which needs Pillow or ffmpeg; "
                                        "install one, or render the frame as PNG or OpenEXR")

    def _blend_request(self, conn: _WorkerConnection, message: m.BlendRequest) -> None:
        path = self.blends.path(message.sha256)
        wanted = any(j.blend_sha256 == message.sha256 and j.state.running for j in self.farm.jobs.values())
        if not wanted or not path.is_file():
            # The job was paused, cancelled or deleted since the client was given work: not its fault.
            conn.post(m.BlendRefused(sha256=message.sha256, reason="no running job uses this .blend any more"))
            return
        conn.post((m.BlendBegin(sha256=message.sha256, size=path.stat().st_size), path))

    def _frame_begin(self, conn: _WorkerConnection, begin: m.FrameBegin) -> None:
        if conn.incoming is not None:
            raise ProtocolError("a frame upload began inside another")
        self.outputs.job_dir(begin.job_id)  # refuses an id that could never name a folder of ours
        frame_name(begin.frame, begin.ext)  # and an extension that is not an image format's
        if not 0 < begin.size <= MAX_FRAME_BYTES:
            raise ProtocolError(f"frame size {begin.size} is out of bounds")
        job = self.farm.jobs.get(begin.job_id)
        if job is not None and job.settings is not None:
            if begin.frame not in job.frames:
                raise ProtocolError(f"job {job.id} has no frame {begin.frame}")
            expected = job.settings.tile_ext if job.settings.tiles else job.settings.ext
            if begin.ext != expected:
                raise ProtocolError(f"job {job.id} stores .{expected} {'tiles' if job.settings.tiles else 'frames'}, "
                                    f"not {begin.ext!r}")
        sink = None
        # A frame of a job deleted meanwhile is read and dropped: the client did nothing wrong.
        if job is not None and self.farm.wants_frame(job.id, begin.frame):
            try:
                sink = self.outputs.frame_sink(job.id, begin.size)
            except OSError as exc:
                self._storage_failed(job, exc)
        conn.incoming = _Incoming(begin=begin, sink=sink)

    def _storage_failed(self, job: Job, exc: OSError) -> None:
        """The server cannot write a job's frames (disk full, permissions): pause it with the reason."""
        where = self.outputs.root / job.id
        reason = f"the server cannot write frames to {where}: {exc.strerror or exc}; fix that, then resume the job"
        log.error("job %s: %s", job.id, reason)
        if job.state.running:
            self.farm.pause_job(job.id)
        job.error = reason
        self.farm.store.save_job(job)

    def _frame_chunk(self, conn: _WorkerConnection, chunk: m.Chunk) -> None:
        incoming = conn.incoming
        if incoming is None:
            raise ProtocolError("data chunk outside an upload")
        incoming.received += len(chunk.data)
        if incoming.received > incoming.begin.size:
            raise ProtocolError("upload is larger than announced")
        if incoming.sink is not None:
            try:
                incoming.sink.write(chunk.data)
            except OSError as exc:
                incoming.sink.abort()
                incoming.sink = None
                job = self.farm.jobs.get(incoming.begin.job_id)
                if job is not None:
                    self._storage_failed(job, exc)

    def _frame_end(self, conn: _WorkerConnection, end: m.End) -> None:
        incoming = conn.incoming
        if incoming is None:
            raise ProtocolError("end of an upload that never began")
        conn.incoming = None
        begin, sink = incoming.begin, incoming.sink
        if sink is None:
            self.stats.duplicate_frames += 1
            log.info("job %s: frame %d from %s was already stored; ignored", begin.job_id, begin.frame, conn.peer.name)
            return
        try:
            sink.finish(end.sha256)
        except ProtocolError:
            sink.abort()
            raise
        except OSError as exc:
            sink.abort()
            job = self.farm.jobs.get(begin.job_id)
            if job is not None:
                self._storage_failed(job, exc)
            return
        if not self.farm.wants_frame(begin.job_id, begin.frame):
            sink.abort()
            self.stats.duplicate_frames += 1
            return
        try:
            settings = self.farm.jobs[begin.job_id].settings
            if settings is not None and settings.tiles:  # a tile of a split frame: it waits in .tiles/
                path = self.outputs.commit_tile(sink, begin.job_id, settings.frames[0], begin.frame, begin.ext)
            else:
                path = self.outputs.commit_frame(sink, begin.job_id, begin.frame, begin.ext)
        except OSError as exc:
            sink.abort()
            self._storage_failed(self.farm.jobs[begin.job_id], exc)
            return
        self.farm.frame_stored(begin.job_id, begin.frame, conn.client_id, begin.render_s, begin.lease_id)
        self.stats.frames_stored += 1
        log.info("job %s: frame %d stored from %s (%.2f s) -> %s", begin.job_id, begin.frame, conn.peer.name,
                 begin.render_s, path.name)

    # --- control tools ------------------------------------------------------------------

    async def _serve_control(self, stream: MessageStream, peer: Peer, client_id: str) -> None:
        watchers: list[asyncio.Task[None]] = []
        try:
            while True:
                message = await stream.recv()
                if isinstance(message, m.StatusRequest):
                    snap = self.snapshot()
                    await stream.send(m.Status(jobs=snap["jobs"], clients=snap["clients"]))
                elif isinstance(message, m.Submit):
                    await self._submit(stream, peer, message)
                elif isinstance(message, m.JobControl):
                    try:
                        text = await self.job_action(message.action, message.job_id, message.args)
                    except (JobActionError, UnsafeName) as exc:
                        await stream.send(m.Error(reason=str(exc)))
                        continue
                    await stream.send(m.JobControlDone(message=text))
                elif isinstance(message, m.FrameLogRequest):
                    await stream.send(self._frame_log(message))
                elif isinstance(message, m.Watch):
                    if message.job_id not in self.farm.jobs:
                        raise ProtocolError(f"no job {message.job_id!r}")
                    watchers.append(self._spawn(self._watch(stream, message.job_id)))
                else:
                    raise ProtocolError(f"a control connection may not send {message.TYPE.value}")
        finally:
            for task in watchers:
                task.cancel()

    async def _submit(self, stream: MessageStream, peer: Peer, submit: m.Submit) -> None:
        try:
            request = JobRequest.from_wire(submit.settings)
        except SettingsError as exc:
            raise ProtocolError(f"invalid job settings: {exc}") from None
        video = None
        if submit.video is not None:
            try:
                video = VideoSettings.from_wire(submit.video).to_wire()  # only known keys are kept
            except ValueError as exc:
                raise ProtocolError(f"invalid video settings: {exc}") from None
        if abs(submit.priority) > MAX_PRIORITY:
            raise ProtocolError(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
        if not 0 < submit.blend_size <= MAX_BLEND_BYTES:
            raise ProtocolError(f"a .blend of {submit.blend_size} bytes is out of bounds")
        name = "".join(ch for ch in submit.name if ch.isprintable())[:MAX_NAME_CHARS] or "untitled.blend"
        sha = submit.blend_sha256
        self.blends.path(sha)
        need = not self.blends.has(sha)
        await stream.send(m.UploadReady(need_bytes=need))
        if request.split is not None and video is not None:
            raise ProtocolError("a split job renders one frame; it makes no video")
        if need:
            await self._receive_blend(stream, sha, submit.blend_size)
        job = self.create_job(name, sha, submit.blend_size, request, start=submit.start, priority=submit.priority,
                              video=video)
        log.info("job %s: submitted by %s (%s)", job.id, peer.name, name)
        await stream.send(m.Submitted(job_id=job.id))

    def _frame_log(self, request: m.FrameLogRequest) -> m.Message:
        job = self.farm.jobs.get(request.job_id)
        frame = job.frames.get(request.frame) if job else None
        if frame is None:
            return m.Error(reason=f"there is no frame {request.frame} in job {request.job_id!r}")
        return m.FrameLog(job_id=request.job_id, frame=request.frame, failures=frame.failures, error=frame.error,
                          log=frame.log, clients=sorted(frame.failed_on))

    async def _receive_blend(self, stream: MessageStream, sha: str, size: int) -> None:
        sink = self.blends.sink(sha, size)
        try:
            while True:
                message = await stream.recv()
                if isinstance(message, m.Chunk):
                    await asyncio.to_thread(sink.write, message.data)
                elif isinstance(message, m.End):
                    sink.finish(message.sha256)
                    break
                else:
                    raise ProtocolError(f"{message.TYPE.value} inside a .blend upload")
        except BaseException:
            sink.abort()
            raise
        self.blends.commit(sink, sha)

    async def _watch(self, stream: MessageStream, job_id: str) -> None:
        try:
            while True:
                version = self._version
                job = self.farm.jobs.get(job_id)
                if job is None:
                    await stream.send(m.Error(reason=f"job {job_id} was deleted"))
                    return
                await stream.send(m.JobUpdate(job=job.view()))
                if job.settled:
                    return
                await self.wait_change(version, timeout=5.0)
        except ProtocolError:
            return
