"""Control connections (the command-line tools): status, submitting jobs with their .blend, watching
a job, job actions and frame logs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgpack

from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.handshake import Peer
from protocol.limits import MAX_BLEND_BYTES, MAX_MESSAGE_BYTES, MAX_STATUS_JOBS
from protocol.names import clean_name
from protocol.settings import JobRequest, SettingsError
from protocol.stream import MessageStream

from .actions import check_priority
from .config import ServerStats
from .feed import ChangeFeed
from .jobs import Job
from .scheduler import Farm, JobActionError
from .storage import ContentStore, StoreFull, UnsafeName
from .tasks import Spawner
from .video import VideoSettings

log = logging.getLogger(__name__)

#: Jobs one control connection may watch at once: each watch is a stream of updates on every change, so that a
#: tool watching thousands would cost the farm megabytes and make every status slow.
MAX_WATCHES_PER_CONNECTION = 8


def _fitting(jobs: list[dict[str, Any]], clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As many of the page's jobs as one message carries (a job shows up to 20 failures with their errors: 1000
    such views do not fit); the tool asks for the rest from where this page ends."""
    budget = MAX_MESSAGE_BYTES - len(msgpack.packb(clients, use_bin_type=True)) - 64 * 1024
    fitted: list[dict[str, Any]] = []
    for view in jobs:
        budget -= len(msgpack.packb(view, use_bin_type=True))
        if budget < 0 and fitted:
            break
        fitted.append(view)
    return fitted


class ControlService(Protocol):
    """What the tools' side needs of the service."""

    farm: Farm
    files: ContentStore
    stats: ServerStats
    feed: ChangeFeed

    def snapshot(self, *, job_offset: int = 0, job_limit: int | None = None) -> dict[str, Any]: ...
    def create_job(self, name: str, blend_sha256: str, blend_size: int, request: JobRequest, *, start: bool = True,
                   priority: int = 0, video: dict[str, Any] | None = None, project: Any = None) -> Job: ...
    def collect_files(self, candidates: Any = None) -> int: ...
    async def job_action(self, action: str, job_id: str = "", args: dict[str, Any] | None = None) -> str: ...


class ControlConnections:
    def __init__(self, service: ControlService, tasks: Spawner,
                 max_watches: int = MAX_WATCHES_PER_CONNECTION) -> None:
        self._service = service
        self._tasks = tasks
        self.max_watches = max_watches

    async def serve(self, stream: MessageStream, peer: Peer, client_id: str) -> None:
        server = self._service
        watchers: dict[str, asyncio.Task[None]] = {}  # by job: one stream of updates per job and connection
        try:
            while True:
                message = await stream.recv()
                if isinstance(message, m.StatusRequest):
                    limit = message.job_limit or MAX_STATUS_JOBS
                    snap = server.snapshot(job_offset=message.job_offset, job_limit=limit)
                    await stream.send(m.Status(jobs=_fitting(snap["jobs"], snap["clients"]), clients=snap["clients"],
                                               jobs_total=snap["jobs_total"], job_offset=message.job_offset))
                elif isinstance(message, m.Submit):
                    await self._submit(stream, peer, message)
                elif isinstance(message, m.JobControl):
                    try:
                        text = await server.job_action(message.action, message.job_id, message.args)
                    except (JobActionError, UnsafeName) as exc:
                        await stream.send(m.Error(reason=str(exc)))
                        continue
                    await stream.send(m.JobControlDone(message=text))
                elif isinstance(message, m.FrameLogRequest):
                    await stream.send(self._frame_log(message))
                elif isinstance(message, m.Watch):
                    if message.job_id not in server.farm.jobs:
                        raise ProtocolError(f"no job {message.job_id!r}")
                    for job_id in [job_id for job_id, task in watchers.items() if task.done()]:
                        del watchers[job_id]
                    old = watchers.pop(message.job_id, None)
                    if old is not None:  # the same job again: this watch replaces that one (it starts afresh)
                        old.cancel()
                    elif len(watchers) >= self.max_watches:
                        log.warning("%s: refused a watch of job %s: already watching %d jobs", peer.name,
                                    message.job_id, len(watchers))
                        await stream.send(m.Error(reason=f"a control connection may watch at most "
                                                         f"{self.max_watches} jobs at once; this one already "
                                                         f"watches {len(watchers)}"))
                        continue
                    watchers[message.job_id] = self._tasks.spawn(self._watch(stream, message.job_id))
                else:
                    raise ProtocolError(f"a control connection may not send {message.TYPE.value}")
        finally:
            for task in watchers.values():
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
        try:
            check_priority(submit.priority)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if not 0 < submit.blend_size <= MAX_BLEND_BYTES:
            raise ProtocolError(f"a .blend of {submit.blend_size} bytes is out of bounds")
        name = clean_name(submit.name) or "untitled.blend"
        sha = submit.blend_sha256
        blends = self._service.files
        blends.path(sha)
        project = submit.manifest()  # validated with the message: safe relative paths, bounded
        wanted = {f.sha256: f.size for f in project.files} if project else {sha: submit.blend_size}
        job = None
        refusal = ""
        try:
            # Pinned before the store is asked: a job deleted during the upload must not take the files it
            # shares with this one (which this submission is then not asked for).
            with blends.pinned(wanted):
                # Each distinct content once, and only what the store lacks: a second job sends its changes.
                need = [digest for digest, size in wanted.items() if not blends.has(digest, size)]
                try:
                    blends.check_room(sum(wanted[digest] for digest in need))
                except StoreFull as exc:
                    log.warning("%s from %s refused: %s", name, peer.name, exc)
                    await stream.send(m.Error(reason=str(exc)))
                    return
                await stream.send(m.UploadReady(need_bytes=bool(need), need=need))
                if request.split is not None and video is not None:
                    raise ProtocolError("a split job renders one frame; it makes no video")
                for digest in need:
                    await self._receive_blend(stream, digest, wanted[digest])
                if need:
                    log.info("%s: received %d of the job's %d files from %s", name, len(need), len(wanted),
                             peer.name)
                try:
                    job = self._service.create_job(name, sha, submit.blend_size, request, start=submit.start,
                                                 priority=submit.priority, video=video, project=project)
                except ValueError as exc:  # e.g. a file that is no .blend: the submitter gets the sentence
                    refusal = str(exc)
        finally:
            if job is None:  # refused, or the submitter went away after some of its files: none of them stay
                self._service.collect_files(wanted)
        if job is None:  # (told only now: by then none of its files is left in the store)
            await stream.send(m.Error(reason=refusal))
            return
        log.info("job %s: submitted by %s (%s)", job.id, peer.name, name)
        await stream.send(m.Submitted(job_id=job.id))

    def _frame_log(self, request: m.FrameLogRequest) -> m.Message:
        job = self._service.farm.jobs.get(request.job_id)
        frame = job.frames.get(request.frame) if job else None
        if frame is None:
            return m.Error(reason=f"there is no frame {request.frame} in job {request.job_id!r}")
        return m.FrameLog(job_id=request.job_id, frame=request.frame, failures=frame.failures, error=frame.error,
                          log=frame.log, clients=sorted(frame.failed_on))

    async def _receive_blend(self, stream: MessageStream, sha: str, size: int) -> None:
        blends = self._service.files
        sink = blends.sink(sha, size)
        try:
            while True:
                message = await stream.recv()
                if isinstance(message, m.Chunk):
                    await asyncio.to_thread(sink.write, message.data)
                elif isinstance(message, m.End):
                    sink.finish(message.sha256)
                    break
                else:
                    raise ProtocolError(f"{message.TYPE.value} inside a file upload")
        except BaseException:
            sink.abort()
            raise
        blends.commit(sink, sha)
        self._service.stats.upload_bytes_received += size
        self._service.stats.files_received += 1

    async def _watch(self, stream: MessageStream, job_id: str) -> None:
        server = self._service
        try:
            while True:
                version = server.feed.version
                job = server.farm.jobs.get(job_id)
                if job is None:
                    await stream.send(m.Error(reason=f"job {job_id} was deleted"))
                    return
                await stream.send(m.JobUpdate(job=job.view()))
                if job.settled:
                    return
                await server.feed.wait_change(version, timeout=5.0)
        except ProtocolError:
            return
