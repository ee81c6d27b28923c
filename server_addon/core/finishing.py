"""What happens to a job once its clients are done: split frames are stitched, videos are built.

Both run off the loop (threads, ffmpeg) as server tasks; their outcome lands on the job.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import TYPE_CHECKING

from .jobs import Job, JobState
from .stitch import StitchError, stitch
from .storage import UnsafeName
from .video import VideoError, VideoSettings, build_video, check_sequence, video_path

if TYPE_CHECKING:
    from .server import FarmServer

log = logging.getLogger(__name__)


class Finishing:
    """The stitches and video builds in progress, one at most per job."""

    def __init__(self, server: FarmServer) -> None:
        self.server = server
        self._videos: dict[str, asyncio.Task[None]] = {}
        self._stitches: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        """Start the stitches and video builds that are due and not running yet."""
        self._start_videos()
        self._start_stitches()

    def cancel_video(self, job_id: str) -> None:
        building = self._videos.pop(job_id, None)
        if building is not None:
            building.cancel()

    def _start_stitches(self) -> None:
        for job in self.server.farm.jobs.values():
            if job.stitch_due and job.id not in self._stitches:
                self._stitches[job.id] = self.server._spawn(self._stitch(job))

    async def _stitch(self, job: Job) -> None:
        """Stitch a split job's tiles into its frame, off the loop; the job is done once the frame is there."""
        server = self.server
        task = asyncio.current_task()
        settings, scene = job.settings, job.scene
        assert settings is not None and settings.split is not None and scene is not None
        spec = settings.split
        try:
            tiles = [server.outputs.tile_path(job.id, spec.frame, i, settings.tile_ext) for i in range(spec.tiles)]
            output = server.outputs.frame_path(job.id, spec.frame, settings.ext)
            started = time.monotonic()
            await asyncio.to_thread(stitch, spec, tiles, output, settings.file_format, quality=scene.quality,
                                    exr_codec=scene.exr_codec)
            log.info("job %s: frame %d stitched from %d tiles in %.2f s -> %s", job.id, spec.frame, spec.tiles,
                     time.monotonic() - started, output.name)
            await asyncio.to_thread(shutil.rmtree, server.outputs.tiles_dir(job.id), True)
            server.farm.stitch_done(job.id)
        except (StitchError, UnsafeName) as exc:
            log.warning("job %s: stitching failed: %s", job.id, exc)
            server.farm.stitch_failed(job.id, str(exc))
        except Exception as exc:  # a bug: fail the job once instead of stitching again at every change
            log.exception("job %s: stitching failed", job.id)
            server.farm.stitch_failed(job.id, f"internal error ({type(exc).__name__}: {exc})")
        finally:
            if self._stitches.get(job.id) is task:
                del self._stitches[job.id]
        server._dispatch()
        server._notify()

    def _start_videos(self) -> None:
        for job in self.server.farm.jobs.values():
            if (job.state is JobState.DONE and job.video is not None and job.video_state in ("", "building")
                    and job.id not in self._videos):
                self._videos[job.id] = self.server._spawn(self._build_video(job))

    async def _build_video(self, job: Job) -> None:
        """Build a finished job's video with ffmpeg, off the loop; the outcome lands on the job."""
        server = self.server
        task = asyncio.current_task()
        job.video_state, job.video_error = "building", ""
        server.farm.store.save_job(job)
        server._notify()
        state, error, path = "failed", "", ""
        try:
            assert job.settings is not None and job.video is not None
            settings = VideoSettings.from_wire(job.video)
            job_dir = server.outputs.job_dir(job.id)
            frames = await asyncio.to_thread(check_sequence, job_dir, list(job.settings.frames), job.settings.ext)
            log.info("job %s: building a %s video from %d frames", job.id, settings.codec, len(frames))
            built = await build_video(frames, job.settings.fps, settings,
                                      video_path(server.outputs.root, job_dir, job.id, settings))
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
            if server.farm.jobs.get(job.id) is job:
                job.video_state, job.video_error = state, error
                if path:
                    job.video_path = path
                server.farm.store.save_job(job)
                server._notify()
