"""Render-client connections: what a client sends (heartbeats, frames, probe results, .blend
requests), what it is sent (one writer task per client, in order), and the watchdog that drops
clients that went silent or hang on a frame. Every change goes through the service's unit of work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from protocol import messages as m
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.handshake import Peer
from protocol.names import printable
from protocol.settings import SceneInfo
from protocol.stream import MessageStream

from .config import ServerConfig, ServerStats
from .finishing import UnitOfWork
from .jobs import JobState
from .scheduler import Farm
from .stitch import jpeg_encoder_available
from .storage import ContentStore, OutputStore, UnsafeName
from .tasks import Spawner
from .uploads import FrameUploads, Incoming

log = logging.getLogger(__name__)

#: Lost clients kept in the status list for the user to see; older ones are forgotten.
MAX_LOST_CLIENTS_SHOWN = 32


class WorkerService(UnitOfWork, Protocol):
    """What the render-client side needs of the service."""

    farm: Farm
    files: ContentStore
    outputs: OutputStore
    stats: ServerStats

    def client_reported(self, client_id: str, state: str, lease_id: int | None, frame: int | None,
                        device: str = "", progress: int | None = None) -> None: ...
    def tick(self) -> None: ...


class WorkerConnection:
    def __init__(self, stream: MessageStream, client_id: str, peer: Peer, stats: ServerStats, now: float) -> None:
        self.stream = stream
        self.client_id = client_id
        self.peer = peer
        self.stats = stats
        self.last_seen = now
        self.last_ping = now
        self.incoming: Incoming | None = None
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
                        await self.stream.send_file(begin, path, counter=counter, sha256=begin.sha256)
                    finally:
                        self.stats.blend_bytes_sent += counter[0]
                        self.stats.files_sent += 1
                    log.info("client %s: sent file %s (%d bytes)", self.peer.name, begin.sha256[:12], counter[0])
                else:
                    await self.stream.send(item)
        except (ProtocolError, OSError) as exc:
            log.info("client %s: send failed: %s", self.peer.name, exc)
            self.stream.close()


class ClientOutboxes:
    """The connected render clients by id: where the service's messages to them go (its Outbox)."""

    def __init__(self) -> None:
        self.connections: dict[str, WorkerConnection] = {}

    def post(self, client_id: str, message: m.Message) -> bool:
        conn = self.connections.get(client_id)
        if conn is None:
            return False
        conn.post(message)
        return True

    def reachable(self, client_id: str) -> bool:
        return client_id in self.connections


class Workers:
    """Serves render-client connections: what they send goes to the service as units of work."""

    def __init__(self, service: WorkerService, outboxes: ClientOutboxes, tasks: Spawner, config: ServerConfig,
                 clock: Callable[[], float]) -> None:
        self._service = service
        self.connections = outboxes.connections
        self._tasks = tasks
        self._config = config
        self._clock = clock
        self._uploads = FrameUploads(service, service.outputs, service.stats)
        self._closing = False

    def close(self) -> None:
        """The server is stopping: a connection that closes from now on is nobody's failure."""
        self._closing = True

    async def serve(self, stream: MessageStream, peer: Peer, client_id: str) -> None:
        service = self._service
        conn = WorkerConnection(stream, client_id, peer, service.stats, self._clock())
        with service.unit() as farm:
            self._forget_lost(farm, peer)
            farm.connect_client(client_id, peer.name, peer.host or stream.peer.rsplit(":", 1)[0], peer.device,
                                peer.devices, peer.blender, peer.allow_scripts)
            self.connections[client_id] = conn
            conn.writer_task = self._tasks.spawn(conn.write_loop())
            log.info("client %s connected from %s as %s (Blender %s)", peer.name, stream.peer, client_id,
                     peer.blender or "?")
        try:
            while conn.client_id in self.connections:  # the watchdog may have dropped it meanwhile
                message = await stream.recv()
                conn.last_seen = self._clock()
                if isinstance(message, m.Chunk):
                    # Bytes of an upload change nothing anyone sees; only its end does. Written off the loop.
                    await self._uploads.chunk(conn, message)
                elif isinstance(message, m.End):
                    await self._uploads.finish(conn, message)  # (closing and checking the file, off the loop)
                    self._uploads.end(conn)
                elif isinstance(message, m.FrameBegin):
                    await self._uploads.begin(conn, message)  # (its file is made off the loop)
                else:
                    self._on_message(conn, message)
        except (ProtocolError, UnsafeName) as exc:
            if not isinstance(exc, ConnectionClosed):
                # Tell the client why, before its connection goes (its log then says what it did wrong).
                log.warning("client %s (%s): closing the connection: %s", peer.name, stream.peer, exc)
                with contextlib.suppress(ProtocolError, OSError, TimeoutError):
                    await asyncio.wait_for(stream.send(m.Error(reason=str(exc))), timeout=1.0)
                return
            raise
        finally:
            self.drop(conn)
            self._uploads.abort(conn)  # here, not in drop(): no write of it runs in a thread any more

    def drop(self, conn: WorkerConnection) -> None:
        if self.connections.pop(conn.client_id, None) is None:
            return
        conn.stream.close()
        if conn.writer_task is not None:
            conn.writer_task.cancel()
        if self._closing:
            return  # the server is going away: nobody's frames are lost, nothing to hand out
        with self._service.unit() as farm:
            record = farm.clients.get(conn.client_id)
            farm.disconnect_client(conn.client_id)
            if record is not None and record.draining:
                # It said it was stopping (a scale-down, a drained or reclaimed node, Ctrl+C), gave back what it
                # had not rendered, and went: gone on purpose, not lost (not shown, not counted as such).
                farm.forget_client(conn.client_id)
                log.info("client %s left (it was told to stop)", record.name)

    @staticmethod
    def _forget_lost(farm: Farm, peer: Peer) -> None:
        lost = [c for c in farm.clients.values() if not c.connected]
        for record in lost:
            if record.name == peer.name and record.host == peer.host:
                farm.forget_client(record.id)
        lost = [c for c in farm.clients.values() if not c.connected]
        for record in lost[:max(0, len(lost) - MAX_LOST_CLIENTS_SHOWN)]:
            farm.forget_client(record.id)

    def _on_message(self, conn: WorkerConnection, message: m.Message) -> None:
        if isinstance(message, m.Heartbeat):
            self._service.client_reported(conn.client_id, message.state, message.lease_id, message.frame,
                                          message.device, message.progress)
            return
        with self._service.unit() as farm:
            if isinstance(message, m.FrameFailed):
                farm.frame_failed(message.lease_id, message.frame, conn.client_id,
                                  m.clip(message.error), m.clip(message.log))
            elif isinstance(message, m.LeaseDone):
                farm.lease_done(message.lease_id, conn.client_id)
            elif isinstance(message, m.HandBack):
                farm.hand_back(message.lease_id, conn.client_id, message.frames)
            elif isinstance(message, m.ProbeResult):
                self._probe_result(farm, conn, message)
            elif isinstance(message, m.BlendRequest):
                self._blend_request(farm, conn, message)
            else:
                raise ProtocolError(f"a render client may not send {message.TYPE.value}")

    def _probe_result(self, farm: Farm, conn: WorkerConnection, message: m.ProbeResult) -> None:
        scene: SceneInfo | None = None
        error = message.error
        if message.ok:
            try:
                scene = SceneInfo.from_wire(message.scene)
            except ProtocolError as exc:
                error = str(exc)
        if scene is not None:
            job = farm.probe_succeeded(message.lease_id, conn.client_id, scene)
        else:
            job = farm.probe_failed(message.lease_id, conn.client_id, m.clip(error))
            if job is not None:  # (logged once it counted: a stranger's spray is refused above, unlogged)
                log.warning("client %s could not read the .blend: %s", conn.peer.name, printable(error))
        if job is not None and job.state is JobState.RENDERING:
            self._service.outputs.job_dir(job.id).mkdir(parents=True, exist_ok=True)
            if job.settings.tiles and job.settings.file_format == "JPEG" and not jpeg_encoder_available():
                farm.fail_job(job, "a split JPEG frame is encoded on the server, which needs Pillow or ffmpeg; "
                                   "install one, or render the frame as PNG or OpenEXR")

    def _blend_request(self, farm: Farm, conn: WorkerConnection, message: m.BlendRequest) -> None:
        """Send a file of the job this client works on; nothing else leaves the store, whatever it asks."""
        path = self._service.files.path(message.sha256)
        record = farm.clients.get(conn.client_id)
        lease = farm.leases.get(record.lease_id) if record is not None and record.lease_id is not None else None
        job = farm.jobs.get(lease.job_id) if lease is not None else None
        wanted = job is not None and job.state.running and message.sha256 in job.manifest.shas()
        if not wanted or not path.is_file():
            # The job was paused, cancelled or deleted since the client was given work: not its fault.
            conn.post(m.BlendRefused(sha256=message.sha256, reason="no running job of this client uses this file"))
            return
        conn.post((m.BlendBegin(sha256=message.sha256, size=path.stat().st_size), path))

    async def watchdog(self) -> None:
        """Close the connections of clients that went silent for longer than the timeout, take back frames
        that hang, and ping the clients so that they notice a server that went silent in turn."""
        loop = asyncio.get_running_loop()
        period = min(1.0, self._config.heartbeat_interval / 2)
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            late = loop.time() - due
            try:
                if late > self._config.heartbeat_interval:  # (not mere jitter: a whole ping period missed)
                    self.forgive(late)
                self.check()
                self._service.tick()
            except Exception:  # one bad round must not end the watchdog
                log.exception("watchdog round failed")

    def forgive(self, late: float) -> None:
        """The server's own loop was held up for `late` seconds (a stall, a burst of work, a suspended
        machine): what clients sent meanwhile may still wait unread in their sockets, so that silence is
        the server's, not theirs: nobody is dropped for it."""
        log.warning("the server was held up for %.1f s; clients' silence during it is not held against them", late)
        for conn in self.connections.values():
            conn.last_seen += late

    def check(self) -> None:
        config = self._config
        now = self._clock()
        for conn in list(self.connections.values()):
            silent = now - conn.last_seen
            if silent > config.heartbeat_timeout:
                log.warning("client %s: no heartbeat for %.1f s, taking its work back", conn.peer.name, silent)
                self.drop(conn)
            elif now - conn.last_ping >= config.heartbeat_interval:
                conn.last_ping = now
                conn.post(m.Heartbeat(state="server"))
        # A frame is hung when its render showed no progress for its job's limit (never sooner than a silent
        # client is lost: progress travels with the heartbeats). The frame fails and is taken back; the client,
        # which is alive, stops that render and stays.
        hung = self._service.farm.hung_clients(config.heartbeat_timeout)
        if hung:
            with self._service.unit() as farm:
                for client_id, silent, limit in hung:
                    farm.frame_hung(client_id, silent, limit)
