"""Every state a job, a frame and a job's video can be in, and the moves between them: the only code that
changes a state. The scheduler decides when to move; this module says whether the move is allowed.

A move the tables below do not allow is a bug in the caller (never a peer's doing: peers' messages are
checked before they reach the scheduler), so it raises IllegalTransition instead of corrupting a job.
"""

from __future__ import annotations

from .jobs import FrameRecord, FrameState, Job, JobState, VideoState

__all__ = ["FRAME_MOVES", "JOB_MOVES", "VIDEO_MOVES", "IllegalTransition", "move_frame", "move_job", "move_video"]

_J = JobState
#: Where a job may go from each state. Finished jobs go back to work when the user resumes them (a forced
#: DONE too, which may land on DONE again when every frame turns out to be there).
JOB_MOVES: dict[JobState, frozenset[JobState]] = {
    _J.QUEUED: frozenset({_J.PROBING, _J.RENDERING, _J.DONE, _J.FAILED, _J.CANCELLED}),
    _J.PROBING: frozenset({_J.RENDERING, _J.PAUSED, _J.DONE, _J.FAILED, _J.CANCELLED}),
    # RENDERING -> PROBING: repaired on load, a job saved rendering without the scene it was probed for.
    _J.RENDERING: frozenset({_J.PROBING, _J.PAUSED, _J.DONE, _J.FAILED, _J.CANCELLED}),
    _J.PAUSED: frozenset({_J.PROBING, _J.RENDERING, _J.DONE, _J.FAILED, _J.CANCELLED}),
    _J.DONE: frozenset({_J.PROBING, _J.RENDERING, _J.DONE}),
    _J.FAILED: frozenset({_J.PROBING, _J.RENDERING, _J.DONE}),
    _J.CANCELLED: frozenset({_J.PROBING, _J.RENDERING, _J.DONE}),
}

_F = FrameState
#: A frame is leased and handed back; stored; found missing from disk on load (DONE -> PENDING).
FRAME_MOVES: dict[FrameState, frozenset[FrameState]] = {
    _F.PENDING: frozenset({_F.LEASED, _F.DONE}),
    _F.LEASED: frozenset({_F.PENDING, _F.DONE}),
    _F.DONE: frozenset({_F.PENDING}),
}

_V = VideoState
#: A video is asked for (NONE), built, and ends DONE or FAILED; asking again, or a stop while it builds,
#: goes back to NONE (the next start builds it again).
VIDEO_MOVES: dict[VideoState, frozenset[VideoState]] = {
    _V.NONE: frozenset({_V.NONE, _V.BUILDING}),
    _V.BUILDING: frozenset({_V.NONE, _V.BUILDING, _V.DONE, _V.FAILED}),
    _V.DONE: frozenset({_V.NONE}),
    _V.FAILED: frozenset({_V.NONE}),
}


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow: a bug, not a peer's mistake."""


def move_job(job: Job, to: JobState) -> None:
    if to not in JOB_MOVES[job.state]:
        raise IllegalTransition(f"job {job.id}: {job.state.value} -> {to.value} is not a move a job makes")
    job.state = to


def move_frame(job: Job, frame: FrameRecord, to: FrameState, lease_id: int | None = None) -> None:
    """Move a frame; a LEASED frame names its lease, any other has none."""
    if to is not frame.state and to not in FRAME_MOVES[frame.state]:
        raise IllegalTransition(f"job {job.id}: frame {frame.number} {frame.state.value} -> {to.value}")
    if (to is FrameState.LEASED) != (lease_id is not None):
        raise IllegalTransition(f"job {job.id}: frame {frame.number} {to.value} with lease {lease_id}")
    index = job.index  # (first: an index built now is built from the frames as they were before this move)
    old = frame.state
    frame.state = to
    frame.lease_id = lease_id
    if index.frames.get(frame.number) is frame:
        index.moved(frame, old)


def move_video(job: Job, to: VideoState, error: str = "") -> None:
    if to not in VIDEO_MOVES[job.video_state]:
        raise IllegalTransition(f"job {job.id}: video {job.video_state.value or 'none'} -> {to.value or 'none'}")
    job.video_state = to
    job.video_error = error
