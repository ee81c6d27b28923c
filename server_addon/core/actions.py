"""Job actions (cancel, pause, delete, video, ...): the one table of them, their argument checks, and how each
is carried out. Tools (JOB_CONTROL), the web page and the add-on all come through run_action."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jobs import Job
from .scheduler import JobActionError
from .video import VideoSettings

if TYPE_CHECKING:
    from .service import FarmService

__all__ = ["ACTIONS", "JOB_ACTIONS", "MAX_PRIORITY", "JobActionError", "check_priority", "resolve_action",
           "run_action"]

#: Job priorities lie within plus or minus this.
MAX_PRIORITY = 1_000_000


def check_priority(value: object) -> int:
    """A job priority, or ValueError saying what one must be."""
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_PRIORITY:
        raise ValueError(f"priority must be a whole number between -{MAX_PRIORITY} and {MAX_PRIORITY}, "
                         f"not {value!r}")
    return value


Handler = Callable[["FarmService", str, dict[str, Any]], Awaitable[str]]


@dataclass(frozen=True)
class Action:
    name: str
    run: Handler
    on_job: bool = True  # names one job (clear_completed names none)
    spellings: tuple[str, ...] = ()  # other names it is known by (URLs use dashes)


async def _cancel(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    with service.unit() as farm:
        farm.cancel_job(job_id)
    return f"job {job_id} cancelled"


async def _pause(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    with service.unit() as farm:
        farm.pause_job(job_id)
    return f"job {job_id} paused"


async def _resume(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    with service.unit() as farm:
        job = farm.resume_job(job_id)
    return f"job {job_id} {job.state.value}"


async def _force_complete(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    with service.unit() as farm:
        job = farm.force_complete(job_id)
    return f"job {job_id} completed with {job.frames_done} of {len(job.frames)} frames"


async def _priority(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    try:
        priority = check_priority(args.get("priority"))
    except ValueError as exc:
        raise JobActionError(str(exc)) from None
    with service.unit() as farm:
        farm.set_priority(job_id, priority)
    return f"job {job_id} priority {priority}"


async def _delete(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    with service.unit() as farm:
        job = farm.delete_job(job_id)
        service.finishing.cancel_video(job_id)
    message = f"job {job_id} deleted"
    if args.get("files"):
        await asyncio.to_thread(_delete_files, service, job)
        message += " with its files"
    # Its files leave the store once no other job uses them and no submission in progress counts on them.
    service.collect_files(job.manifest.shas())
    return message


async def _video(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    service.farm.check_video(job_id)  # a job that is not done is told so before its settings are looked at
    try:
        settings = VideoSettings.from_wire(args)
    except ValueError as exc:
        raise JobActionError(str(exc)) from None
    with service.unit() as farm:
        service.finishing.cancel_video(job_id)
        farm.request_video(job_id, settings.to_wire())
    return f"building a {settings.codec} video of job {job_id}"


async def _clear_completed(service: FarmService, job_id: str, args: dict[str, Any]) -> str:
    with service.unit() as farm:
        cleared = farm.clear_finished()
    for job in cleared:
        service.collect_files(job.manifest.shas())
    return f"cleared {len(cleared)} finished jobs"


ACTIONS: dict[str, Action] = {action.name: action for action in (
    Action("cancel", _cancel),
    Action("pause", _pause),
    Action("resume", _resume),
    Action("force_complete", _force_complete, spellings=("force-complete",)),
    Action("delete", _delete),
    Action("clear_completed", _clear_completed, on_job=False),
    Action("priority", _priority),
    Action("video", _video),
)}
#: The job actions a control connection (or the add-on, or the web page) may ask for.
JOB_ACTIONS = tuple(ACTIONS)
_SPELLINGS = {spelling: action for action in ACTIONS.values() for spelling in (action.name, *action.spellings)}


def resolve_action(name: str) -> Action:
    """The action of this name (or spelling); JobActionError naming the known ones otherwise."""
    action = _SPELLINGS.get(name)
    if action is None:
        raise JobActionError(f"unknown job action {name!r}; known: {', '.join(JOB_ACTIONS)}")
    return action


async def run_action(service: FarmService, name: str, job_id: str, args: dict[str, Any]) -> str:
    """Carry out a job action; returns a sentence for the user. Raises JobActionError."""
    return await resolve_action(name).run(service, job_id, args)


def _delete_files(service: FarmService, job: Job) -> None:
    job_dir = service.outputs.job_dir(job.id)
    if job_dir.is_dir():
        shutil.rmtree(job_dir)
    if job.video_path:
        with contextlib.suppress(OSError):
            Path(job.video_path).unlink()
