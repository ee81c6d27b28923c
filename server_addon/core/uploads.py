"""Frames that a render client streams in: begin, chunks, end; a frame is stored exactly once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import messages as m
from protocol.assets import MAX_LOG_WARNINGS, MAX_WARNING_CHARS, clip_text
from protocol.errors import ProtocolError
from protocol.limits import MAX_FRAME_BYTES
from protocol.stream import FileSink

from .jobs import Job
from .storage import frame_name

if TYPE_CHECKING:
    from .server import FarmServer
    from .workers import WorkerConnection

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    """A frame upload in progress on one connection."""

    begin: m.FrameBegin
    sink: FileSink | None  # None: the frame is unwanted; its bytes are read and dropped
    received: int = 0


class FrameUploads:
    def __init__(self, server: FarmServer) -> None:
        self.server = server

    def begin(self, conn: WorkerConnection, begin: m.FrameBegin) -> None:
        server = self.server
        if conn.incoming is not None:
            raise ProtocolError("a frame upload began inside another")
        server.outputs.job_dir(begin.job_id)  # refuses an id that could never name a folder of ours
        frame_name(begin.frame, begin.ext)  # and an extension that is not an image format's
        if not 0 < begin.size <= MAX_FRAME_BYTES:
            raise ProtocolError(f"frame size {begin.size} is out of bounds")
        job = server.farm.jobs.get(begin.job_id)
        if job is not None and job.settings is not None:
            if begin.frame not in job.frames:
                raise ProtocolError(f"job {job.id} has no frame {begin.frame}")
            expected = job.settings.tile_ext if job.settings.tiles else job.settings.ext
            if begin.ext != expected:
                raise ProtocolError(f"job {job.id} stores .{expected} {'tiles' if job.settings.tiles else 'frames'}, "
                                    f"not {begin.ext!r}")
        server.farm.check_frame_holder(begin.job_id, begin.frame, conn.client_id, begin.lease_id)
        sink = None
        # A frame of a job deleted meanwhile is read and dropped: the client did nothing wrong. One it was
        # never leased is refused before a byte of it is written (NotLeaseHolder closes the connection).
        if job is not None and server.farm.wants_frame(job.id, begin.frame, conn.client_id, begin.lease_id):
            try:
                sink = server.outputs.frame_sink(job.id, begin.size)
            except OSError as exc:
                self._storage_failed(job, exc)
        conn.incoming = Incoming(begin=begin, sink=sink)

    def _storage_failed(self, job: Job, exc: OSError) -> None:
        """The server cannot write a job's frames (disk full, permissions): pause it with the reason."""
        farm = self.server.farm
        where = self.server.outputs.root / job.id
        reason = f"the server cannot write frames to {where}: {exc.strerror or exc}; fix that, then resume the job"
        log.error("job %s: %s", job.id, reason)
        if job.state.running:
            farm.pause_job(job.id)
        job.error = reason
        farm.store.save_job(job)

    def chunk(self, conn: WorkerConnection, chunk: m.Chunk) -> None:
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
                job = self.server.farm.jobs.get(incoming.begin.job_id)
                if job is not None:
                    self._storage_failed(job, exc)

    def end(self, conn: WorkerConnection, end: m.End) -> None:
        server = self.server
        incoming = conn.incoming
        if incoming is None:
            raise ProtocolError("end of an upload that never began")
        conn.incoming = None
        begin, sink = incoming.begin, incoming.sink
        if sink is None:
            server.stats.duplicate_frames += 1
            log.info("job %s: frame %d from %s was already stored; ignored", begin.job_id, begin.frame, conn.peer.name)
            return
        try:
            sink.finish(end.sha256)
        except ProtocolError:
            sink.abort()
            raise
        except OSError as exc:
            sink.abort()
            job = server.farm.jobs.get(begin.job_id)
            if job is not None:
                self._storage_failed(job, exc)
            return
        try:
            wanted = server.farm.wants_frame(begin.job_id, begin.frame, conn.client_id, begin.lease_id)
        except ProtocolError:
            sink.abort()
            raise
        if not wanted:
            sink.abort()
            server.stats.duplicate_frames += 1
            return
        try:
            settings = server.farm.jobs[begin.job_id].settings
            if settings is not None and settings.tiles:  # a tile of a split frame: it waits in .tiles/
                path = server.outputs.commit_tile(sink, begin.job_id, settings.frames[0], begin.frame, begin.ext)
            else:
                path = server.outputs.commit_frame(sink, begin.job_id, begin.frame, begin.ext)
        except OSError as exc:
            sink.abort()
            self._storage_failed(server.farm.jobs[begin.job_id], exc)
            return
        server.farm.frame_stored(begin.job_id, begin.frame, conn.client_id, begin.render_s, begin.lease_id,
                                 [clip_text(w, MAX_WARNING_CHARS) for w in begin.warnings[:MAX_LOG_WARNINGS + 1]])
        server.stats.frames_stored += 1
        log.info("job %s: frame %d stored from %s (%.2f s) -> %s", begin.job_id, begin.frame, conn.peer.name,
                 begin.render_s, path.name)
