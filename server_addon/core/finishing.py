"""What happens to a job once its clients are done: split frames are stitched, videos are built.

Both run off the loop (threads, ffmpeg) as background tasks, one at most per job; the scheduler says when
one is due (effects Stitch and BuildVideo), and its outcome lands on the job through a unit of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from typing import Protocol

from .jobs import Job, VideoState
from .scheduler import Farm
from .stitch import StitchError, stitch
from .storage import OutputStore, UnsafeName
from .tasks import Spawner
from .video import VideoError, VideoSettings, build_video, check_sequence, video_path

log = logging.getLogger(__name__)


class UnitOfWork(Protocol):
    """How a part of the server changes the farm (see service.FarmService.unit)."""

    def unit(self) -> contextlib.AbstractContextManager[Farm]: ...


class Finishing:
    """The stitches and video builds in progress, one at most per job."""

    def __init__(self, work: UnitOfWork, tasks: Spawner, outputs: OutputStore) -> None:
        self._work = work
        self._tasks = tasks
        self._outputs = outputs
        self._videos: dict[str, asyncio.Task[None]] = {}
        self._stitches: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def close(self) -> None:
        """The server is stopping: nothing new starts (what runs is cancelled with the server's tasks)."""
        self._closed = True

    def stitch(self, job: Job) -> None:
        """Stitch the job's tiles, unless that runs already."""
        if job.id not in self._stitches and not self._closed:
            self._stitches[job.id] = self._tasks.spawn(self._stitch(job))

    def build_video(self, job: Job) -> None:
        """Build the job's video, unless that runs already."""
        if job.id not in self._videos and not self._closed:
            self._videos[job.id] = self._tasks.spawn(self._build_video(job))

    def cancel_video(self, job_id: str) -> None:
        building = self._videos.pop(job_id, None)
        if building is not None:
            building.cancel()

    @contextlib.contextmanager
    def _landing(self, running: dict[str, asyncio.Task[None]], job: Job) -> Iterator[None]:
        """Forget the task when it ends (unless it was replaced meanwhile)."""
        task = asyncio.current_task()
        try:
            yield
        finally:
            if running.get(job.id) is task:
                del running[job.id]

    async def _stitch(self, job: Job) -> None:
        """Stitch a split job's tiles into its frame, off the loop; the job is done once the frame is there."""
        outputs = self._outputs
        settings, scene = job.settings, job.scene
        assert settings is not None and settings.split is not None and scene is not None
        spec = settings.split
        with self._landing(self._stitches, job):
            try:
                tiles = [outputs.tile_path(job.id, spec.frame, i, settings.tile_ext) for i in range(spec.tiles)]
                output = outputs.frame_path(job.id, spec.frame, settings.ext)
                started = time.monotonic()
                await asyncio.to_thread(stitch, spec, tiles, output, settings.file_format, quality=scene.quality,
                                        exr_codec=scene.exr_codec)
                log.info("job %s: frame %d stitched from %d tiles in %.2f s -> %s", job.id, spec.frame, spec.tiles,
                         time.monotonic() - started, output.name)
                await asyncio.to_thread(shutil.rmtree, outputs.tiles_dir(job.id), True)
                outcome = ""
            except (StitchError, UnsafeName) as exc:
                log.warning("job %s: stitching failed: %s", job.id, exc)
                outcome = str(exc)
            except Exception as exc:  # a bug: fail the job once instead of stitching again at every change
                log.exception("job %s: stitching failed", job.id)
                outcome = f"internal error ({type(exc).__name__}: {exc})"
        with self._work.unit() as farm:
            if outcome:
                farm.stitch_failed(job.id, outcome)
            else:
                farm.stitch_done(job.id)

    async def _build_video(self, job: Job) -> None:
        """Build a finished job's video with ffmpeg, off the loop; the outcome lands on the job."""
        with self._work.unit() as farm:
            farm.video_started(job)
        state, error, path = VideoState.FAILED, "", ""
        try:
            with self._landing(self._videos, job):
                try:
                    assert job.settings is not None and job.video is not None
                    settings = VideoSettings.from_wire(job.video)
                    job_dir = self._outputs.job_dir(job.id)
                    frames = await asyncio.to_thread(check_sequence, job_dir, list(job.settings.frames),
                                                     job.settings.ext)
                    log.info("job %s: building a %s video from %d frames", job.id, settings.codec, len(frames))
                    built = await build_video(frames, job.settings.fps, settings,
                                              video_path(self._outputs.root, job_dir, job.id, settings))
                    state, path = VideoState.DONE, str(built)
                    log.info("job %s: video ready: %s", job.id, built)
                except (VideoError, ValueError, UnsafeName) as exc:
                    error = str(exc)
                    log.warning("job %s: no video: %s", job.id, error)
        except asyncio.CancelledError:
            state = VideoState.NONE  # stopped with the server or replaced: the next start builds it again
            raise
        finally:
            with self._work.unit() as farm:
                farm.video_ended(job, state, error, path)
