"""Frames that a render client streams in: begin, chunks, end; a frame is stored exactly once.

The bytes go to disk off the loop (chunk, finish); the decisions (is the frame wanted, is it stored) are
made on the loop inside a unit of work, where nothing can interleave between the check and the commit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import messages as m
from protocol.assets import MAX_LOG_WARNINGS, MAX_WARNING_CHARS, clip_text
from protocol.errors import ProtocolError
from protocol.limits import MAX_FRAME_BYTES
from protocol.stream import FileSink

from .config import ServerStats
from .storage import OutputStore, frame_name
from .tally import Tally

if TYPE_CHECKING:
    from .finishing import UnitOfWork
    from .scheduler import Farm
    from .workers import WorkerConnection

log = logging.getLogger(__name__)

#: Frames up to this size are written and closed on the loop (into the page cache: a thread's hand-over costs
#: more than the write); bigger ones in a worker thread, so that a slow disk never holds up the farm.
INLINE_WRITE_BYTES = 64 * 1024
#: The server ran out of file descriptors (its own, or the machine's): a passing state, unlike a full disk.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
#: Uploads dropped for want of descriptors are logged as one counted line per job per this interval.
DROPPED_LOG_INTERVAL_S = 10.0


@dataclass
class Incoming:
    """A frame upload in progress on one connection."""

    begin: m.FrameBegin
    sink: FileSink | None  # None: the frame is unwanted (its bytes are read and dropped), or writing it failed
    received: int = 0
    failed: bool = False  # the server could not write it (its job was paused with the reason)


class FrameUploads:
    def __init__(self, work: UnitOfWork, outputs: OutputStore, stats: ServerStats) -> None:
        self._work = work
        self._outputs = outputs
        self._stats = stats
        self._dropped = Tally(log, "job {address}: a frame upload was dropped: {reason}",
                              "job {address}: {count} more frame uploads dropped in the last {seconds} s: {reason}",
                              DROPPED_LOG_INTERVAL_S)

    async def begin(self, conn: WorkerConnection, begin: m.FrameBegin) -> None:
        with self._work.unit() as farm:
            wanted = self._begin(farm, conn, begin)
        sink = None
        if wanted:
            try:
                # (making a file waits on the disk's journal: always off the loop)
                sink = await asyncio.to_thread(self._outputs.frame_sink, begin.job_id, begin.size)
            except OSError as exc:
                self._storage_failed(begin.job_id, exc)
                conn.incoming = Incoming(begin=begin, sink=None, failed=True)
                return
        conn.incoming = Incoming(begin=begin, sink=sink)

    def _begin(self, farm: Farm, conn: WorkerConnection, begin: m.FrameBegin) -> bool:
        """Check the upload; whether its frame is wanted (else its bytes are read and dropped)."""
        if conn.incoming is not None:
            raise ProtocolError("a frame upload began inside another")
        self._outputs.job_dir(begin.job_id)  # refuses an id that could never name a folder of ours
        frame_name(begin.frame, begin.ext)  # and an extension that is not an image format's
        if not 0 < begin.size <= MAX_FRAME_BYTES:
            raise ProtocolError(f"frame size {begin.size} is out of bounds")
        job = farm.jobs.get(begin.job_id)
        if job is not None and job.settings is not None:
            if begin.frame not in job.frames:
                raise ProtocolError(f"job {job.id} has no frame {begin.frame}")
            expected = job.settings.tile_ext if job.settings.tiles else job.settings.ext
            if begin.ext != expected:
                raise ProtocolError(f"job {job.id} stores .{expected} {'tiles' if job.settings.tiles else 'frames'}, "
                                    f"not {begin.ext!r}")
        farm.check_frame_holder(begin.job_id, begin.frame, conn.client_id, begin.lease_id)
        # A frame of a job deleted meanwhile is read and dropped: the client did nothing wrong. One it was
        # never leased is refused before a byte of it is written (NotLeaseHolder closes the connection).
        return job is not None and farm.wants_frame(job.id, begin.frame, conn.client_id, begin.lease_id)

    def _storage_failed(self, job_id: str, exc: OSError) -> None:
        """The server cannot write a job's frames (disk full, permissions): the job pauses with the reason.
        Out of file descriptors (a flood of connections, for a moment) it does not: the one upload is dropped,
        its frame stays with its lease, and goes back to the queue to be rendered again when the lease ends."""
        if exc.errno in OUT_OF_DESCRIPTORS:
            self._dropped.note(job_id, f"the server is out of open files ({exc.strerror or exc}); the frame will "
                                       "be rendered again")
            return
        where = self._outputs.root / job_id
        reason = f"the server cannot write frames to {where}: {exc.strerror or exc}; fix that, then resume the job"
        with self._work.unit() as farm:
            farm.storage_failed(job_id, reason)

    def _write_failed(self, incoming: Incoming, exc: OSError) -> None:
        assert incoming.sink is not None
        incoming.sink.abort()
        incoming.sink = None
        incoming.failed = True
        self._storage_failed(incoming.begin.job_id, exc)

    async def chunk(self, conn: WorkerConnection, chunk: m.Chunk) -> None:
        incoming = conn.incoming
        if incoming is None:
            raise ProtocolError("data chunk outside an upload")
        incoming.received += len(chunk.data)
        if incoming.received > incoming.begin.size:
            raise ProtocolError("upload is larger than announced")
        if incoming.sink is not None:
            try:
                if incoming.begin.size <= INLINE_WRITE_BYTES:
                    incoming.sink.write(chunk.data)
                else:
                    await asyncio.to_thread(incoming.sink.write, chunk.data)
            except OSError as exc:
                self._write_failed(incoming, exc)

    async def finish(self, conn: WorkerConnection, end: m.End) -> None:
        """Close the upload's file and check its size and sha256, off the loop (end() then stores it)."""
        incoming = conn.incoming
        if incoming is None or incoming.sink is None:
            return
        try:
            if incoming.begin.size <= INLINE_WRITE_BYTES:
                incoming.sink.finish(end.sha256)
            else:
                await asyncio.to_thread(incoming.sink.finish, end.sha256)
        except ProtocolError:
            self.abort(conn)
            raise
        except OSError as exc:
            self._write_failed(incoming, exc)

    def abort(self, conn: WorkerConnection) -> None:
        """Throw away the connection's upload in progress, if any (its connection ended)."""
        if conn.incoming is not None and conn.incoming.sink is not None:
            conn.incoming.sink.abort()
        conn.incoming = None

    def end(self, conn: WorkerConnection) -> None:
        """The upload ended (and finish() checked its file): store the frame if it is still wanted."""
        with self._work.unit() as farm:
            self._end(farm, conn)

    def _end(self, farm: Farm, conn: WorkerConnection) -> None:
        incoming = conn.incoming
        if incoming is None:
            raise ProtocolError("end of an upload that never began")
        conn.incoming = None
        begin, sink = incoming.begin, incoming.sink
        if sink is None:
            if not incoming.failed:
                self._stats.duplicate_frames += 1
                log.info("job %s: frame %d from %s was already stored; ignored", begin.job_id, begin.frame,
                         conn.peer.name)
            return
        try:
            wanted = farm.wants_frame(begin.job_id, begin.frame, conn.client_id, begin.lease_id)
        except ProtocolError:
            sink.abort()
            raise
        if not wanted:
            sink.abort()
            self._stats.duplicate_frames += 1
            return
        try:
            settings = farm.jobs[begin.job_id].settings
            if settings is not None and settings.tiles:  # a tile of a split frame: it waits in .tiles/
                path = self._outputs.commit_tile(sink, begin.job_id, settings.frames[0], begin.frame, begin.ext)
            else:
                path = self._outputs.commit_frame(sink, begin.job_id, begin.frame, begin.ext)
        except OSError as exc:
            sink.abort()
            self._storage_failed(begin.job_id, exc)
            return
        if farm.frame_stored(begin.job_id, begin.frame, conn.client_id, begin.render_s, begin.lease_id,
                             [clip_text(w, MAX_WARNING_CHARS) for w in begin.warnings[:MAX_LOG_WARNINGS + 1]]):
            self._stats.render_times.observe(begin.render_s)
        self._stats.frames_stored += 1
        log.info("job %s: frame %d stored from %s (%.2f s) -> %s", begin.job_id, begin.frame, conn.peer.name,
                 begin.render_s, path.name)
