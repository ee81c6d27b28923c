"""The farm service: the one way through the server.

Every event passes through here: a render client's message (core.workers), a tool's request (core.control),
a web request (server_addon.web), an add-on call (server_addon.addon), a timer (the watchdog), the end of a
stitch or a video build (core.finishing). Each runs as a unit of work:

    with service.unit() as farm:
        farm.frame_failed(...)          # change the scheduler's state

When the outermost unit ends, the service asks the scheduler what is due now (Farm.decide: stitches and
videos to start, leases to revoke, work to assign), carries it out (messages into client outboxes, tasks
into the spawner) and bumps the change feed. Nothing else in the server does any of that, so no caller can
forget it. A unit of work never spans an await: it is a synchronous block on the server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from protocol import messages as m
from protocol.blendfile import BlenderVersion, BlendHeaderError, HeaderUnreadable, read_version
from protocol.manifest import Manifest
from protocol.settings import BLENDER_FILE, JobRequest

from .actions import run_action
from .config import ServerConfig, ServerStats
from .database import pause_failed_jobs
from .effects import Assign, BuildVideo, Effect, Revocation, Stitch
from .feed import ChangeFeed
from .finishing import Finishing
from .jobs import Job, LeaseKind
from .scheduler import Farm, add_warning
from .storage import ContentStore, OutputStore, new_job_id
from .tasks import Spawner

log = logging.getLogger(__name__)


class Outbox(Protocol):
    """Where messages to connected render clients go (core.workers keeps one queue per client)."""

    def post(self, client_id: str, message: m.Message) -> bool: ...
    def reachable(self, client_id: str) -> bool: ...


class FarmService:
    def __init__(self, config: ServerConfig, farm: Farm, files: ContentStore, outputs: OutputStore, *,
                 outbox: Outbox, tasks: Spawner, stats: ServerStats | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.farm = farm
        self.files = files  # every file of every job, by sha256
        self.outputs = outputs
        self.stats = stats or ServerStats()
        self.clock = clock
        self.feed = ChangeFeed()
        self._outbox = outbox
        self.finishing = Finishing(self, tasks, outputs)
        self._depth = 0
        self._owner: asyncio.Task[Any] | None = None

    # --- the unit of work ---------------------------------------------------------------

    @contextlib.contextmanager
    def unit(self) -> Iterator[Farm]:
        """Change the farm; when the outermost unit ends, what the change made due is carried out."""
        task = _current_task()
        if self._depth and self._owner is not task:
            raise RuntimeError("a unit of work may not span an await (another task is inside one)")
        self._depth += 1
        self._owner = task
        try:
            yield self.farm
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._settle()

    def client_reported(self, client_id: str, state: str, lease_id: int | None, frame: int | None,
                        device: str = "", progress: int | None = None) -> None:
        """A client's heartbeat: a unit of work only when it changed what the scheduler or a viewer sees."""
        if self.farm.client_reported(client_id, state, lease_id, frame, device, progress):
            with self.unit():
                pass

    def tick(self) -> None:
        """Each watchdog round: time alone makes a frame at a job's tail late (see Farm.tail_waiting)."""
        if self.farm.tail_waiting():
            with self.unit():
                pass

    def _settle(self) -> None:
        pause_failed_jobs(self.farm)  # what the job database refused during this unit
        for effect in self.farm.decide(self._outbox.reachable):
            self._carry_out(effect)
        self.feed.bump()

    def _carry_out(self, effect: Effect) -> None:
        if isinstance(effect, Assign):
            self._outbox.post(effect.lease.client_id, self._work_message(effect))
        elif isinstance(effect, Revocation):
            self._outbox.post(effect.client_id, m.Revoke(lease_id=effect.lease_id, frames=list(effect.frames)))
        elif isinstance(effect, Stitch):
            self.finishing.stitch(self.farm.jobs[effect.job_id])
        elif isinstance(effect, BuildVideo):
            self.finishing.build_video(self.farm.jobs[effect.job_id])
        else:  # pragma: no cover - a new effect without a way to carry it out is a bug
            raise TypeError(f"unknown effect {effect!r}")

    def _work_message(self, assign: Assign) -> m.Message:
        lease = assign.lease
        job = self.farm.jobs[lease.job_id]
        if lease.kind is LeaseKind.PROBE:
            log.info("job %s: probing the scene on client %s", job.id, lease.client_id)
            return m.Probe.of(job.manifest, lease_id=lease.id, job_id=job.id)
        assert job.settings is not None
        log.debug("job %s: frames %s to client %s (lease %d)", job.id, ",".join(map(str, lease.frames)),
                 lease.client_id, lease.id)
        # The job's manifest was checked when it arrived: it is not checked again for every chunk it is sent with.
        return m.Assign.of(job.manifest, lease_id=lease.id, job_id=job.id, frames=lease.frames,
                           settings=job.settings.to_assignment())

    def start(self) -> None:
        """Restored jobs: hand out their work, build the videos a stop interrupted."""
        with self.unit():
            pass

    # --- what viewers read --------------------------------------------------------------

    def snapshot(self, *, job_offset: int = 0, job_limit: int | None = None) -> dict[str, Any]:
        """The farm as viewers see it: unfinished jobs first, by priority then submission; a page of them
        (`job_limit` from `job_offset`) if asked, with how many there are in all."""
        jobs = sorted(self.farm.jobs.values(), key=lambda j: (j.state.finished, -j.priority, j.seq))
        page = jobs[job_offset:] if job_limit is None else jobs[job_offset:job_offset + job_limit]
        return {
            "farm": self.config.farm_name,
            "jobs": [job.view() for job in page],
            "jobs_total": len(jobs),
            "clients": self.farm.client_views(),
        }

    # --- jobs (tools, the web page, the add-on) ------------------------------------------

    def create_job(self, name: str, blend_sha256: str, blend_size: int, request: JobRequest, *,
                   start: bool = True, priority: int = 0, video: dict[str, Any] | None = None,
                   project: Manifest | None = None, warnings: Sequence[str] = ()) -> Job:
        """A new job of files already in the store; `warnings` are known at submission (files left behind)."""
        if not self.files.has(blend_sha256):
            raise ValueError("the .blend for this job is not on the server")
        if project is not None:
            main = project.main_file
            if (main.sha256, main.size) != (blend_sha256, blend_size):
                raise ValueError("the project's main file is not the job's .blend")
            lacking = [f.relpath for f in project.files if not self.files.has(f.sha256, f.size)]
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
        with self.unit() as farm:
            farm.add_job(job, start=start)
        return job

    def _file_version(self, name: str, blend_sha256: str, request: JobRequest) -> BlenderVersion | None:
        """The Blender that saved the job's file (its header: a few bytes, decompressed if need be)."""
        try:
            saved = read_version(self.files.path(blend_sha256))
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

    def collect_files(self, candidates: Iterable[str] | None = None) -> int:
        """Delete the stored files (all, or `candidates`) that no job uses and no submission in progress pins."""
        used: set[str] = set()
        for job in self.farm.jobs.values():
            used |= job.manifest.shas()
        return self.files.collect(used, candidates)

    async def job_action(self, action: str, job_id: str = "", args: dict[str, Any] | None = None) -> str:
        """Carry out a job action; returns a sentence for the user. Raises JobActionError."""
        return await run_action(self, action, job_id, args or {})


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: a plain call (a test of the scheduler's service without a loop)
        return None
