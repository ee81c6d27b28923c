"""Job actions that a control connection or the add-on asks for: cancel, pause, delete, video, ..."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jobs import Job, JobState
from .scheduler import JobActionError
from .video import VideoSettings

if TYPE_CHECKING:
    from .server import FarmServer

#: Job priorities lie within plus or minus this.
MAX_PRIORITY = 1_000_000
#: The job actions a control connection (or the add-on) may ask for.
JOB_ACTIONS = ("cancel", "pause", "resume", "force_complete", "delete", "clear_completed", "priority", "video")


class JobActions:
    def __init__(self, server: FarmServer) -> None:
        self.server = server

    async def run(self, action: str, job_id: str = "", args: dict[str, Any] | None = None) -> str:
        """Carry out a job action; returns a sentence for the user. Raises JobActionError."""
        args = args or {}
        farm = self.server.farm
        if action == "cancel":
            farm.cancel_job(job_id)
            message = f"job {job_id} cancelled"
        elif action == "pause":
            farm.pause_job(job_id)
            message = f"job {job_id} paused"
        elif action == "resume":
            job = farm.resume_job(job_id)
            message = f"job {job_id} {job.state.value}"
        elif action == "force_complete":
            job = farm.force_complete(job_id)
            message = f"job {job_id} completed with {job.frames_done} of {len(job.frames)} frames"
        elif action == "priority":
            priority = args.get("priority")
            if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
                raise JobActionError(f"priority must be a whole number between -{MAX_PRIORITY} and {MAX_PRIORITY}")
            farm.set_priority(job_id, priority)
            message = f"job {job_id} priority {priority}"
        elif action == "delete":
            job = farm.delete_job(job_id)
            self.server._finishing.cancel_video(job_id)
            message = f"job {job_id} deleted"
            if args.get("files"):
                await asyncio.to_thread(self._delete_files, job)
                message += " with its files"
            self._forget_files(job)
        elif action == "video":
            job = farm.job(job_id)
            if job.state is not JobState.DONE:
                raise JobActionError(f"job {job_id} is {job.state.value}; a video is built from a finished job")
            try:
                settings = VideoSettings.from_wire(args)
            except ValueError as exc:
                raise JobActionError(str(exc)) from None
            self.server._finishing.cancel_video(job.id)
            job.video, job.video_state, job.video_error = settings.to_wire(), "", ""
            farm.store.save_job(job)
            message = f"building a {settings.codec} video of job {job_id}"
        elif action == "clear_completed":
            cleared = farm.clear_finished()
            for job in cleared:
                self._forget_files(job)
            message = f"cleared {len(cleared)} finished jobs"
        else:
            raise JobActionError(f"unknown job action {action!r}; known: {', '.join(JOB_ACTIONS)}")
        self.server._dispatch()
        self.server._notify()
        return message

    def _delete_files(self, job: Job) -> None:
        job_dir = self.server.outputs.job_dir(job.id)
        if job_dir.is_dir():
            shutil.rmtree(job_dir)
        if job.video_path:
            with contextlib.suppress(OSError):
                Path(job.video_path).unlink()

    def _forget_files(self, job: Job) -> None:
        """Remove a job's files from the store once no other job uses them and no submission in progress
        counts on them."""
        self.server.collect_files(job.manifest.shas())
