"""Recovery: the step between opening the server's stores and taking connections. Jobs come back from the
database, repaired against what is on disk (a frame is done exactly when its file is there: frame files
only appear by an atomic rename after their sha256 was checked), and what a killed server left
half-written goes: partial uploads, half-built videos, files no job uses."""

from __future__ import annotations

import contextlib
import logging
import os

from protocol.blendfile import BlendHeaderError, read_version

from .database import Database
from .jobs import FrameState, Job
from .scheduler import Farm
from .states import move_frame
from .storage import ContentStore, OutputStore, UnsafeName, frame_name, tile_name
from .video import remove_leftovers

log = logging.getLogger(__name__)


def load_jobs(db: Database, outputs: OutputStore) -> list[Job]:
    """Every stored job, with its frames checked against the files in the output folder."""
    jobs = db.load()
    for job in jobs:
        _check_frames(job, db, outputs)
    return jobs


def recover(farm: Farm, db: Database, files: ContentStore, outputs: OutputStore) -> None:
    files.remove_partials()
    remove_leftovers(outputs.root)
    for job in load_jobs(db, outputs):
        if job.file_blender is None and not job.state.finished:
            # A job stored before versions were kept: read its file's header now, so that no older
            # client is given it.
            with contextlib.suppress(BlendHeaderError, OSError):
                job.file_blender = read_version(files.path(job.blend_sha256))
        farm.restore_job(job)
        # What a killed server left half-written: uploads and video builds.
        if outputs.job_dir(job.id).is_dir():
            outputs.remove_partials(job.id)
            remove_leftovers(outputs.job_dir(job.id))
    if farm.jobs:
        running = sum(1 for j in farm.jobs.values() if j.state.running)
        log.info("restored %d jobs (%d to continue) from %s", len(farm.jobs), running, db.path)
    # Once the jobs are back: what failed or abandoned submissions left in the store goes, unless a job
    # could not be restored (its files are not known, and nothing of a job may be lost).
    if db.unrestored:
        log.warning("%d jobs could not be restored; no stored file is removed", db.unrestored)
        return
    used: set[str] = set()
    for job in farm.jobs.values():
        used |= job.manifest.shas()
    if removed := files.collect(used):
        log.info("removed %d stored files that no job uses from %s", removed, files.root)


def _check_frames(job: Job, db: Database, outputs: OutputStore) -> None:
    """A split job is stitched when its frame is there; an unfinished job's frames are done exactly when
    their files are (a frame saved as done but missing from disk is rendered again)."""
    settings = job.settings
    if settings is None:
        return
    if settings.tiles:  # a split frame: stitched when the frame is there; its tiles wait in .tiles/
        with contextlib.suppress(OSError, UnsafeName):
            job.stitched = outputs.frame_path(job.id, settings.frames[0], settings.ext).is_file()
    if job.state.finished:
        return
    try:
        folder = outputs.tiles_dir(job.id) if settings.tiles else outputs.job_dir(job.id)
        present = set(os.listdir(folder))
    except (OSError, UnsafeName):
        present = set()
    if settings.tiles and job.stitched:
        present = {tile_name(settings.frames[0], n, settings.tile_ext) for n in job.frames}  # tiles cleared
    for frame in job.frames.values():
        if settings.tiles:
            on_disk = tile_name(settings.frames[0], frame.number, settings.tile_ext) in present
        else:
            on_disk = frame_name(frame.number, settings.ext) in present
        if on_disk and frame.state is not FrameState.DONE:
            move_frame(job, frame, FrameState.DONE)
            db.save_frame(job, frame)
        elif not on_disk and frame.state is FrameState.DONE:
            log.warning("job %s: frame %d is missing from disk; it will be rendered again", job.id, frame.number)
            move_frame(job, frame, FrameState.PENDING)
            db.save_frame(job, frame)
