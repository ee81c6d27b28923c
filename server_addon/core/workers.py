"""Render-client connections: what a client sends (heartbeats, frames, probe results, .blend
requests), what it is sent (one writer task per client, in order), and the watchdog that drops
clients that went silent or hang on a frame."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from protocol import messages as m
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.handshake import Peer
from protocol.settings import SceneInfo
from protocol.stream import MessageStream

from .jobs import JobState
from .stitch import jpeg_encoder_available
from .storage import UnsafeName
from .uploads import FrameUploads, Incoming

if TYPE_CHECKING:
    from .server import FarmServer

log = logging.getLogger(__name__)

#: Lost clients kept in the status list for the user to see; older ones are forgotten.
MAX_LOST_CLIENTS_SHOWN = 32
#: A client on one frame for longer than FACTOR times the job's median frame time (and at least
#: MIN_S, and only once MIN_SAMPLES frames were measured) is treated as lost.
HANG_FACTOR = 10.0
HANG_MIN_S = 120.0
HANG_MIN_SAMPLES = 3


class WorkerConnection:
    def __init__(self, server: FarmServer, stream: MessageStream, client_id: str, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.client_id = client_id
        self.peer = peer
        self.last_seen = server.clock()
        self.last_ping = self.last_seen
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
                        await self.stream.send_file(begin, path, counter=counter)
                    finally:
                        self.server.stats.blend_bytes_sent += counter[0]
                        self.server.stats.files_sent += 1
                    log.info("client %s: sent file %s (%d bytes)", self.peer.name, begin.sha256[:12], counter[0])
                else:
                    await self.stream.send(item)
        except (ProtocolError, OSError) as exc:
            log.info("client %s: send failed: %s", self.peer.name, exc)
            self.stream.close()


class Workers:
    """The connected render clients, by client id."""

    def __init__(self, server: FarmServer) -> None:
        self.server = server
        self.connections: dict[str, WorkerConnection] = {}
        self._uploads = FrameUploads(server)

    def get(self, client_id: str) -> WorkerConnection | None:
        return self.connections.get(client_id)

    async def serve(self, stream: MessageStream, peer: Peer, client_id: str) -> None:
        server = self.server
        conn = WorkerConnection(server, stream, client_id, peer)
        self._forget_lost(peer)
        server.farm.connect_client(client_id, peer.name, peer.host or stream.peer.rsplit(":", 1)[0], peer.device,
                                   peer.devices, peer.blender, peer.allow_scripts)
        self.connections[client_id] = conn
        conn.writer_task = server._spawn(conn.write_loop())
        log.info("client %s connected from %s as %s (Blender %s)", peer.name, stream.peer, client_id,
                 peer.blender or "?")
        server._dispatch()
        server._notify()
        try:
            while conn.client_id in self.connections:  # the watchdog may have dropped it meanwhile
                message = await stream.recv()
                conn.last_seen = server.clock()
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

    def drop(self, conn: WorkerConnection) -> None:
        if self.connections.pop(conn.client_id, None) is None:
            return
        conn.stream.close()
        if conn.writer_task is not None:
            conn.writer_task.cancel()
        if conn.incoming is not None and conn.incoming.sink is not None:
            conn.incoming.sink.abort()
        conn.incoming = None
        server = self.server
        if server._stopping:
            return  # the server is going away: nobody's frames are lost, nothing to hand out
        server.farm.disconnect_client(conn.client_id)
        server._dispatch()
        server._notify()

    def _forget_lost(self, peer: Peer) -> None:
        farm = self.server.farm
        lost = [c for c in farm.clients.values() if not c.connected]
        for record in lost:
            if record.name == peer.name and record.host == peer.host:
                farm.forget_client(record.id)
        lost = [c for c in farm.clients.values() if not c.connected]
        for record in lost[:max(0, len(lost) - MAX_LOST_CLIENTS_SHOWN)]:
            farm.forget_client(record.id)

    def _on_message(self, conn: WorkerConnection, message: m.Message) -> None:
        server, farm = self.server, self.server.farm
        if isinstance(message, m.Heartbeat):
            if farm.client_reported(conn.client_id, message.state, message.lease_id, message.frame, message.device):
                server._dispatch()
                server._notify()
            return
        if isinstance(message, m.Chunk):
            self._uploads.chunk(conn, message)
            return  # bytes of an upload change nothing anyone sees; only its end does
        if isinstance(message, m.End):
            self._uploads.end(conn, message)
        elif isinstance(message, m.FrameBegin):
            self._uploads.begin(conn, message)
        elif isinstance(message, m.FrameFailed):
            farm.frame_failed(message.lease_id, message.frame, conn.client_id,
                              m.clip(message.error), m.clip(message.log))
        elif isinstance(message, m.LeaseDone):
            farm.lease_done(message.lease_id, conn.client_id)
        elif isinstance(message, m.ProbeResult):
            self._probe_result(conn, message)
        elif isinstance(message, m.BlendRequest):
            self._blend_request(conn, message)
        else:
            raise ProtocolError(f"a render client may not send {message.TYPE.value}")
        server._dispatch()
        server._notify()

    def _probe_result(self, conn: WorkerConnection, message: m.ProbeResult) -> None:
        farm = self.server.farm
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
                log.warning("client %s could not read the .blend: %s", conn.peer.name, error)
        if job is not None and job.state is JobState.RENDERING:
            self.server.outputs.job_dir(job.id).mkdir(parents=True, exist_ok=True)
            if job.settings.tiles and job.settings.file_format == "JPEG" and not jpeg_encoder_available():
                farm.fail_job(job, "a split JPEG frame is encoded on the server, which needs Pillow or ffmpeg; "
                                   "install one, or render the frame as PNG or OpenEXR")

    def _blend_request(self, conn: WorkerConnection, message: m.BlendRequest) -> None:
        """Send a file of the job this client works on; nothing else leaves the store, whatever it asks."""
        farm = self.server.farm
        path = self.server.blends.path(message.sha256)
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
        """Close the connections of clients that went silent for longer than the timeout (or hang on a
        frame), and ping the others so that they notice a server that went silent in turn."""
        while True:
            await asyncio.sleep(min(1.0, self.server.config.heartbeat_interval / 2))
            try:
                self.check()
            except Exception:  # one bad round must not end the watchdog
                log.exception("watchdog round failed")

    def check(self) -> None:
        config = self.server.config
        now = self.server.clock()
        for conn in list(self.connections.values()):
            silent = now - conn.last_seen
            if silent > config.heartbeat_timeout:
                log.warning("client %s: no heartbeat for %.1f s, taking its work back", conn.peer.name, silent)
                self.drop(conn)
            elif now - conn.last_ping >= config.heartbeat_interval:
                conn.last_ping = now
                conn.post(m.Heartbeat(state="server"))
        for client_id, elapsed, limit in self.server.farm.hung_clients(config.hang_factor, config.hang_min_s,
                                                                       HANG_MIN_SAMPLES):
            conn = self.connections.get(client_id)
            if conn is not None:
                log.warning("client %s: on one frame for %.0f s (limit %.0f s); treating it as lost",
                            conn.peer.name, elapsed, limit)
                self.drop(conn)
