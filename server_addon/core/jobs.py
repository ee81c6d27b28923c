"""The farm's data model: jobs, frames, leases and clients, and how each is shown. Pure data."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from protocol.blendfile import BlenderVersion
from protocol.limits import MAX_RENDER_S
from protocol.manifest import Manifest, safe_blend_name
from protocol.settings import JobRequest, RenderSettings, SceneInfo


class JobState(StrEnum):
    QUEUED = "queued"        # submitted, not started yet
    PROBING = "probing"      # waiting for a client to read the scene's settings
    RENDERING = "rendering"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    @property
    def running(self) -> bool:
        return self in (JobState.PROBING, JobState.RENDERING)


class FrameState(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"


class VideoState(StrEnum):
    NONE = ""            # none asked for, or asked for and not started yet (see Job.video)
    BUILDING = "building"
    DONE = "done"
    FAILED = "failed"


class LeaseKind(StrEnum):
    PROBE = "probe"
    RENDER = "render"


@dataclass
class FrameRecord:
    number: int
    state: FrameState = FrameState.PENDING
    lease_id: int | None = None
    failures: int = 0
    failed_on: set[str] = field(default_factory=set)  # client names
    error: str = ""
    log: str = ""
    rendered_by: str = ""  # client name
    render_s: float | None = None
    # Every lease that covered it: lease id -> client id. Only these may store it (not saved: a server
    # restart ends every lease, and clients drop what they rendered for an earlier connection).
    held_by: dict[int, str] = field(default_factory=dict)
    # A second lease on it, given to an idle client when its first holder is late at the job's tail: whichever
    # copy lands first is stored, the other holder is told to stop.
    spare_lease: int | None = None


def _usable_time(frame: FrameRecord) -> float | None:
    """A finished frame's render time, unless it is no usable number (0, negative, NaN, infinite: from an older
    database or a client before the protocol refused them)."""
    s = frame.render_s
    return s if frame.state is FrameState.DONE and s is not None and 0 < s <= MAX_RENDER_S else None


class FrameIndex:
    """What the scheduler asks of a job's frames on every event, kept up to date as frames move (core.states
    calls moved()) instead of scanned for: the pending frames in order, how many are done, the render times.

    It belongs to one frames dict: Job.index builds a new one when the job's frames are replaced."""

    def __init__(self, frames: dict[int, FrameRecord]) -> None:
        self.frames = frames
        self.pending = {n for n, f in frames.items() if f.state is FrameState.PENDING}
        self._heap = sorted(self.pending)  # (a sorted list is a heap) lowest number first; entries not in
        #                                    `pending` any more are stale and skipped when they come up
        self.done = sum(1 for f in frames.values() if f.state is FrameState.DONE)
        self.times = sorted(t for f in frames.values() if (t := _usable_time(f)) is not None)
        self.time_sum = sum(self.times)
        self.failed = {n for n, f in frames.items() if f.failures}  # frames that failed at least once
        self.leased = {n for n, f in frames.items() if f.state is FrameState.LEASED}

    def moved(self, frame: FrameRecord, old: FrameState) -> None:
        new = frame.state
        if old is new:
            return
        if old is FrameState.DONE:
            self.done -= 1
            self._forget_time(frame)
        elif new is FrameState.DONE:
            self.done += 1
        if new is FrameState.PENDING:
            self.pending.add(frame.number)
            heapq.heappush(self._heap, frame.number)
        else:
            self.pending.discard(frame.number)
        if new is FrameState.LEASED:
            self.leased.add(frame.number)
        else:
            self.leased.discard(frame.number)

    def timed(self, frame: FrameRecord) -> None:
        """A done frame's render time was set."""
        if (t := _usable_time(frame)) is not None:
            bisect.insort(self.times, t)
            self.time_sum += t

    def _forget_time(self, frame: FrameRecord) -> None:
        t = frame.render_s
        if t is None:
            return
        i = bisect.bisect_left(self.times, t)
        if i < len(self.times) and self.times[i] == t:
            del self.times[i]
            self.time_sum -= t

    def pick(self, limit: int, skip: Callable[[int], bool]) -> list[int]:
        """Up to `limit` pending frames, lowest first, leaving out those `skip` says no to. The caller leases
        every frame returned (which takes it out of `pending`)."""
        picked: list[int] = []
        passed: list[int] = []
        while self._heap and len(picked) < limit:
            number = heapq.heappop(self._heap)
            if number not in self.pending or (picked and picked[-1] == number) or (passed and passed[-1] == number):
                continue  # stale, or a second entry of one already seen
            (passed if skip(number) else picked).append(number)
        for number in passed:
            heapq.heappush(self._heap, number)
        return picked


@dataclass
class Job:
    id: str
    name: str
    blend_sha256: str
    blend_size: int
    request: JobRequest
    created: float
    seq: int = 0
    priority: int = 0
    state: JobState = JobState.PROBING
    scene: SceneInfo | None = None
    settings: RenderSettings | None = None
    frames: dict[int, FrameRecord] = field(default_factory=dict)
    error: str = ""
    forced: bool = False
    probe_lease: int | None = None
    probe_failures: int = 0
    probe_failed_on: dict[str, str] = field(default_factory=dict)  # client name -> "Blender 4.2.23: error"
    file_blender: BlenderVersion | None = None  # the version that saved the .blend (major.minor), if readable
    pinned_blender: str = ""  # the exact Blender version all of the job's frames are rendered with
    client_failures: dict[str, int] = field(default_factory=dict)  # client name -> failed frames
    finished_at: float | None = None
    video: dict[str, Any] | None = None  # requested video settings (wire form)
    video_state: VideoState = VideoState.NONE
    video_path: str = ""
    video_error: str = ""
    waiting: str = ""  # why no client can take the job's frames now, for the user
    stitched: bool = False  # a split job: its tiles were stitched into the frame, which is on disk
    project: Manifest | None = None  # the files it needs (None: the .blend alone, see manifest)
    _index: FrameIndex | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def index(self) -> FrameIndex:
        """The index of this job's frames (built again when `frames` is another dict than it was built for)."""
        if self._index is None or self._index.frames is not self.frames:
            self._index = FrameIndex(self.frames)
        return self._index

    @property
    def has_pending(self) -> bool:
        return bool(self.index.pending)

    @property
    def manifest(self) -> Manifest:
        """Every file the job needs, with the .blend's relative path; a job of a bare .blend names it after
        the job (its file name), so that a client lays it out like the artist's file."""
        if self.project is not None:
            return self.project
        return Manifest.single(safe_blend_name(self.name), self.blend_sha256, self.blend_size)
    # What the user must know about frames that rendered: files missing (allowed by the submitter, or seen in
    # Blender's output), scripts the clients do not run. Carried to the end, shown with the job.
    warnings: list[str] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        """Finished, and no video on the way: nothing about this job will change by itself."""
        if not self.state.finished or self.video_state is VideoState.BUILDING:
            return False
        return not self.video_due

    @property
    def video_due(self) -> bool:
        """A finished job whose video was asked for and is not built yet (or was cut off by a stop)."""
        return (self.state is JobState.DONE and self.video is not None
                and self.video_state in (VideoState.NONE, VideoState.BUILDING))

    @property
    def complete(self) -> bool:
        """Every work item is on disk, and a split frame's tiles are stitched."""
        if self.settings is None or self.index.done < len(self.frames):
            return False
        return not self.settings.tiles or self.stitched

    @property
    def stitch_due(self) -> bool:
        """A split job whose tiles are all on disk, waiting for the server to stitch them."""
        return (self.state is JobState.RENDERING and self.settings is not None and bool(self.settings.tiles)
                and not self.stitched and self.index.done >= len(self.frames))

    @property
    def frames_done(self) -> int:
        return self.index.done

    def typical_frame_s(self, min_samples: int) -> float | None:
        """Median render time of this job's finished frames, once there are enough of them."""
        times = self.index.times
        n = len(times)
        if n < max(1, min_samples):
            return None
        return times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2

    def mean_frame_s(self) -> float | None:
        """Mean render time of this job's finished frames (None before the first); the web page's ETA."""
        index = self.index
        return index.time_sum / len(index.times) if index.times else None

    def view(self) -> dict[str, Any]:
        s = self.settings
        failed = [self.frames[n] for n in sorted(self.index.failed)]
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "settled": self.settled,
            "priority": self.priority,
            "created": self.created,
            "frames_done": self.frames_done,
            "frames_total": len(self.frames),
            "frames_failed": len(failed),
            "mean_frame_s": self.mean_frame_s(),
            "forced": self.forced,
            "device": self.request.device,
            "files": len(self.project.files) if self.project else 1,
            "files_bytes": self.project.total_bytes if self.project else self.blend_size,
            "blender_file": str(self.file_blender) if self.file_blender else None,
            "blender_request": self.request.blender,
            "blender": self.pinned_blender or None,
            "waiting": self.waiting,
            "error": self.error,
            "warnings": list(self.warnings),
            "allow_missing": self.request.allow_missing,
            "needs_scripts": self.request.needs_scripts,
            "persistent_data": self.request.persistent_data,
            "file_format": s.file_format if s else None,
            "fps": s.fps if s else None,
            "resolution": [s.resolution_x, s.resolution_y] if s else None,
            "frame_range": [s.frames[0], s.frames[-1]] if s and s.frames else None,
            "frame_step": s.frames[1] - s.frames[0] if s and len(s.frames) > 1 else 1,
            "chunk": self.request.chunk,
            "tiles": s.tiles if s else 0,  # a split frame: frames_done/frames_total count its tiles
            "stitched": self.stitched,
            "failures": [{"frame": f.number, "count": f.failures, "error": f.error, "clients": sorted(f.failed_on)}
                         for f in failed[:20]],
            "excluded_clients": sorted(self.excluded_clients()),
            "video": self.video,
            "video_state": self.video_state.value,
            "video_path": self.video_path,
            "video_error": self.video_error,
        }

    def excluded_clients(self, limit: int = 3) -> set[str]:
        return {name for name, count in self.client_failures.items() if count >= limit}


@dataclass
class Lease:
    id: int
    job_id: str
    client_id: str
    kind: LeaseKind
    frames: list[int]
    started: float
    spare: bool = False  # a second copy of a late frame at a job's tail (see FrameRecord.spare_lease)


@dataclass
class ClientRecord:
    id: str
    name: str
    host: str
    lease_id: int | None = None
    frame: int | None = None
    frame_started: float | None = None
    progress: int | None = None  # the frame's last progress count (client heartbeats), and when it changed
    progress_at: float | None = None
    frames_rendered: int = 0
    failures: int = 0
    connected: bool = True
    device: str = "CPU"  # what it renders on: CPU, OPTIX, CUDA, ...
    blender: str = ""  # its Blender version as it reports it: "4.2.23 LTS", "5.0.1"
    devices: tuple[str, ...] = ()
    ready: bool = False  # has reported its state since it connected
    busy: bool = False  # still finishing work from before a reconnect, or stopping (see draining)
    draining: bool = False  # told to stop by its machine: it finishes the frame in hand and takes nothing new
    allow_scripts: bool = False  # started with --allow-scripts: it runs the scripts of the files it opens

    def view(self, leases: dict[int, Lease], excluded_from: list[str]) -> dict[str, Any]:
        lease = leases.get(self.lease_id) if self.lease_id is not None else None
        if not self.connected:
            state = "lost"
        elif self.busy:
            state = "stopping" if self.draining else "busy"
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
            "excluded_from": excluded_from, "device": self.device, "devices": list(self.devices),
            "blender": self.blender, "allow_scripts": self.allow_scripts,
        }


@dataclass(frozen=True)
class Revocation:
    client_id: str
    lease_id: int
    frames: tuple[int, ...]  # empty: the whole lease
