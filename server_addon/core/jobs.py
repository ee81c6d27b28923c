"""Jobs, frames, leases and the scheduler that hands work to clients. Pure logic: no I/O.

The server layer feeds events in (a client connected, a frame arrived, a client went silent)
and sends out what the scheduler decides (assignments, revocations). Every decision here is
testable without sockets or Blender.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from protocol.settings import JobRequest, RenderSettings, SceneInfo, SettingsError, resolve

log = logging.getLogger(__name__)

#: A frame that fails this many times (on different clients where there are any) fails its job.
MAX_FRAME_ATTEMPTS = 3
#: A .blend that no client could open this many times fails its job.
MAX_PROBE_ATTEMPTS = 2


class JobState(str, Enum):
    PROBING = "probing"      # waiting for a client to read the scene's settings
    RENDERING = "rendering"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class FrameState(str, Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"


class LeaseKind(str, Enum):
    PROBE = "probe"
    RENDER = "render"


@dataclass
class FrameRecord:
    number: int
    state: FrameState = FrameState.PENDING
    lease_id: int | None = None
    failures: int = 0
    failed_on: set[str] = field(default_factory=set)
    error: str = ""
    log: str = ""
    rendered_by: str = ""
    render_s: float | None = None


@dataclass
class Job:
    id: str
    name: str
    blend_sha256: str
    blend_size: int
    request: JobRequest
    created: float
    state: JobState = JobState.PROBING
    scene: SceneInfo | None = None
    settings: RenderSettings | None = None
    frames: dict[int, FrameRecord] = field(default_factory=dict)
    error: str = ""
    probe_lease: int | None = None
    probe_failures: int = 0
    finished_at: float | None = None

    @property
    def frames_done(self) -> int:
        return sum(1 for f in self.frames.values() if f.state is FrameState.DONE)

    def view(self) -> dict[str, Any]:
        s = self.settings
        failed = [f for f in self.frames.values() if f.failures]
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "frames_done": self.frames_done,
            "frames_total": len(self.frames),
            "frames_failed": sum(1 for f in failed),
            "error": self.error,
            "file_format": s.file_format if s else None,
            "fps": s.fps if s else None,
            "resolution": [s.resolution_x, s.resolution_y] if s else None,
            "frame_range": [s.frames[0], s.frames[-1]] if s and s.frames else None,
            "chunk": self.request.chunk,
            "failures": [{"frame": f.number, "count": f.failures, "error": f.error} for f in failed[:20]],
        }


@dataclass
class Lease:
    id: int
    job_id: str
    client_id: str
    kind: LeaseKind
    frames: list[int]
    started: float


@dataclass
class ClientRecord:
    id: str
    name: str
    host: str
    lease_id: int | None = None
    frame: int | None = None
    frames_rendered: int = 0
    failures: int = 0
    connected: bool = True

    def view(self, leases: dict[int, Lease]) -> dict[str, Any]:
        lease = leases.get(self.lease_id) if self.lease_id is not None else None
        if not self.connected:
            state = "lost"
        elif lease is None:
            state = "idle"
        elif lease.kind is LeaseKind.PROBE:
            state = "probing"
        else:
            state = "rendering"
        return {
            "id": self.id, "name": self.name, "host": self.host, "state": state,
            "job_id": lease.job_id if lease else None, "frame": self.frame,
            "frames_rendered": self.frames_rendered, "failures": self.failures,
        }


@dataclass(frozen=True)
class Revocation:
    client_id: str
    lease_id: int
    frames: tuple[int, ...]  # empty: the whole lease


class Farm:
    """The scheduler: which client renders which frames of which job, and what happens on failure."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.leases: dict[int, Lease] = {}
        self._next_lease = 1
        self._revocations: list[Revocation] = []

    # --- jobs -----------------------------------------------------------------------------

    def add_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        log.info("job %s: added (%s)", job.id, job.name)

    def active_jobs(self) -> Iterator[Job]:
        return (j for j in self.jobs.values() if not j.state.finished)

    def fail_job(self, job: Job, error: str) -> None:
        if job.state.finished:
            return
        job.state = JobState.FAILED
        job.error = error
        job.finished_at = self.clock()
        log.warning("job %s: failed: %s", job.id, error.splitlines()[0] if error else "")
        self._end_leases_of(job)

    def cancel_job(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        if not job.state.finished:
            job.state = JobState.CANCELLED
            job.finished_at = self.clock()
            log.info("job %s: cancelled", job.id)
            self._end_leases_of(job)
        return job

    def _end_leases_of(self, job: Job) -> None:
        for lease in [l for l in self.leases.values() if l.job_id == job.id]:
            self._revocations.append(Revocation(lease.client_id, lease.id, ()))
            self._drop_lease(lease)

    # --- clients --------------------------------------------------------------------------

    def connect_client(self, client_id: str, name: str, host: str) -> ClientRecord:
        record = ClientRecord(id=client_id, name=name, host=host)
        self.clients[client_id] = record
        return record

    def disconnect_client(self, client_id: str) -> list[Lease]:
        """The client is gone: its leases are taken back and its frames become pending again."""
        record = self.clients.get(client_id)
        if record is None:
            return []
        record.connected = False
        record.frame = None
        taken = [l for l in self.leases.values() if l.client_id == client_id]
        for lease in taken:
            log.info("job %s: lease %d of client %s taken back (%s)", lease.job_id, lease.id,
                     record.name, ",".join(map(str, lease.frames)) or "probe")
            self._drop_lease(lease)
        return taken

    def forget_client(self, client_id: str) -> None:
        self.disconnect_client(client_id)
        self.clients.pop(client_id, None)

    def idle_clients(self) -> list[str]:
        return [c.id for c in self.clients.values() if c.connected and c.lease_id is None]

    def _drop_lease(self, lease: Lease) -> None:
        self.leases.pop(lease.id, None)
        job = self.jobs.get(lease.job_id)
        if job is not None:
            if job.probe_lease == lease.id:
                job.probe_lease = None
            for number in lease.frames:
                frame = job.frames.get(number)
                if frame is not None and frame.state is FrameState.LEASED and frame.lease_id == lease.id:
                    frame.state = FrameState.PENDING
                    frame.lease_id = None
        client = self.clients.get(lease.client_id)
        if client is not None and client.lease_id == lease.id:
            client.lease_id = None
            client.frame = None

    def drain_revocations(self) -> list[Revocation]:
        out, self._revocations = self._revocations, []
        return out

    # --- handing out work -----------------------------------------------------------------

    def next_work(self, client_id: str) -> Lease | None:
        """Give an idle client its next piece of work, or None if there is nothing it may do."""
        client = self.clients[client_id]
        if not client.connected or client.lease_id is not None:
            return None
        connected = {c.id for c in self.clients.values() if c.connected}
        for job in self.active_jobs():
            if job.state is JobState.PROBING:
                if job.probe_lease is None:
                    return self._lease(job, client, LeaseKind.PROBE, [])
                continue
            frames = self._eligible_frames(job, client_id, connected)
            if frames:
                return self._lease(job, client, LeaseKind.RENDER, frames)
        return None

    def _eligible_frames(self, job: Job, client_id: str, connected: set[str]) -> list[int]:
        assert job.settings is not None
        picked: list[int] = []
        for frame in job.frames.values():
            if frame.state is not FrameState.PENDING:
                continue
            # A frame that failed on this client goes elsewhere, unless every client failed it.
            if client_id in frame.failed_on and not connected <= frame.failed_on:
                continue
            picked.append(frame.number)
            if len(picked) >= job.settings.chunk:
                break
        return picked

    def _lease(self, job: Job, client: ClientRecord, kind: LeaseKind, frames: list[int]) -> Lease:
        lease = Lease(id=self._next_lease, job_id=job.id, client_id=client.id, kind=kind,
                      frames=frames, started=self.clock())
        self._next_lease += 1
        self.leases[lease.id] = lease
        client.lease_id = lease.id
        if kind is LeaseKind.PROBE:
            job.probe_lease = lease.id
        for number in frames:
            record = job.frames[number]
            record.state = FrameState.LEASED
            record.lease_id = lease.id
        return lease

    # --- results --------------------------------------------------------------------------

    def probe_succeeded(self, lease_id: int, scene: SceneInfo) -> Job | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.kind is not LeaseKind.PROBE:
            return None
        job = self.jobs[lease.job_id]
        self._drop_lease(lease)
        if job.state is not JobState.PROBING:
            return job
        try:
            settings = resolve(job.request, scene)
        except SettingsError as exc:
            self.fail_job(job, f"the job's settings do not fit the scene: {exc}")
            return job
        if not scene.has_camera:
            self.fail_job(job, f"scene {scene.scene!r} has no camera to render from")
            return job
        job.scene = scene
        job.settings = settings
        job.frames = {n: FrameRecord(n) for n in settings.frames}
        job.state = JobState.RENDERING
        log.info("job %s: %d frames, %s, %dx%d at %g fps", job.id, len(job.frames), settings.file_format,
                 settings.resolution_x, settings.resolution_y, settings.fps)
        return job

    def probe_failed(self, lease_id: int, error: str) -> Job | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.kind is not LeaseKind.PROBE:
            return None
        job = self.jobs[lease.job_id]
        self._drop_lease(lease)
        job.probe_failures += 1
        if job.probe_failures >= MAX_PROBE_ATTEMPTS:
            self.fail_job(job, f"the .blend could not be opened: {error}")
        return job

    def wants_frame(self, job_id: str, number: int) -> bool:
        """Is a result for this frame still wanted? (Not stored yet, job still running.)"""
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.RENDERING:
            return False
        frame = job.frames.get(number)
        return frame is not None and frame.state is not FrameState.DONE

    def frame_stored(self, job_id: str, number: int, client_id: str, render_s: float | None = None) -> bool:
        """Record that a frame's file is on disk. Returns False if it was already stored."""
        if not self.wants_frame(job_id, number):
            return False
        job = self.jobs[job_id]
        frame = job.frames[number]
        holder = self.leases.get(frame.lease_id) if frame.lease_id is not None else None
        if holder is not None and holder.client_id != client_id:
            # Another client holds this frame (it was reassigned); it need not render it now.
            self._revocations.append(Revocation(holder.client_id, holder.id, (number,)))
        frame.state = FrameState.DONE
        frame.lease_id = None
        frame.rendered_by = client_id
        frame.render_s = render_s
        client = self.clients.get(client_id)
        if client is not None:
            client.frames_rendered += 1
        if all(f.state is FrameState.DONE for f in job.frames.values()):
            job.state = JobState.DONE
            job.finished_at = self.clock()
            log.info("job %s: done, %d frames", job.id, len(job.frames))
        return True

    def frame_failed(self, lease_id: int, number: int, client_id: str, error: str, render_log: str = "") -> None:
        lease = self.leases.get(lease_id)
        client = self.clients.get(client_id)
        if client is not None:
            client.failures += 1
        if lease is None or number not in lease.frames:
            return
        job = self.jobs[lease.job_id]
        frame = job.frames[number]
        if frame.state is FrameState.DONE:
            return
        frame.failures += 1
        frame.failed_on.add(client_id)
        frame.error = error
        frame.log = render_log
        frame.state = FrameState.PENDING
        frame.lease_id = None
        log.warning("job %s: frame %d failed on %s (%d/%d): %s", job.id, number,
                    client.name if client else client_id, frame.failures, MAX_FRAME_ATTEMPTS, error)
        if frame.failures >= MAX_FRAME_ATTEMPTS:
            self.fail_job(job, f"frame {number} failed {frame.failures} times: {error}")

    def lease_done(self, lease_id: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None:
            self._drop_lease(lease)

    def set_client_frame(self, client_id: str, frame: int | None) -> bool:
        """Note the frame a client reports working on; True if that changed."""
        client = self.clients.get(client_id)
        if client is None or client.frame == frame:
            return False
        client.frame = frame
        return True
