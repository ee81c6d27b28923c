"""The job database (real SQLite): what is saved comes back after a restart, frames included."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from protocol.settings import JobRequest, SceneInfo
from server_addon.core.database import Database
from server_addon.core.jobs import FrameState, Job, JobState
from server_addon.core.recovery import load_jobs
from server_addon.core.scheduler import Farm
from server_addon.core.storage import OutputStore

pytestmark = pytest.mark.unit


def scene() -> SceneInfo:
    return SceneInfo(scene="S", engine="CYCLES", frame_start=1, frame_end=4, frame_step=1, fps=24.0,
                     resolution_x=64, resolution_y=36, percentage=100, file_format="PNG")


def farm_with_db(path: Path) -> tuple[Farm, Database]:
    db = Database(path / "jobs.sqlite3")
    farm = Farm(store=db)
    farm.connect_client("c", "client", "host")
    farm.client_reported("c", "idle", None, None)
    return farm, db


def run_frames(farm: Farm, outputs: OutputStore, job: Job, frames: list[int]) -> None:
    probe = farm.next_work("c")
    farm.probe_succeeded(probe.id, probe.client_id, scene())
    farm.lease_done(probe.id, probe.client_id)
    lease = farm.next_work("c")
    for n in frames:
        outputs.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        (outputs.job_dir(job.id) / f"frame_{n:04d}.png").write_bytes(b"png")
        farm.frame_stored(job.id, n, "c", 0.5, lease.id)


def test_saving_a_job_keeps_its_frames(tmp_path: Path) -> None:
    outputs = OutputStore(tmp_path / "out")
    farm, db = farm_with_db(tmp_path)
    job = Job(id="job-a", name="a.blend", blend_sha256="0" * 64, blend_size=1, request=JobRequest(chunk=4),
              created=0.0)
    farm.add_job(job)
    run_frames(farm, outputs, job, [1, 2])
    farm.frame_failed(next(iter(farm.leases)), 3, "c", "Blender said no", "render log tail")
    farm.set_priority(job.id, 7)  # another save of the job row, after the frames were saved
    farm.cancel_job(job.id)
    db.close()

    restored = {j.id: j for j in load_jobs(Database(tmp_path / "jobs.sqlite3"), outputs)}
    again = restored["job-a"]
    assert again.state is JobState.CANCELLED and again.priority == 7
    assert sorted(n for n, f in again.frames.items() if f.state is FrameState.DONE) == [1, 2]
    assert again.frames[3].failures == 1 and again.frames[3].log == "render log tail"


def test_resumed_job_after_restart_renders_only_missing_frames(tmp_path: Path) -> None:
    outputs = OutputStore(tmp_path / "out")
    farm, db = farm_with_db(tmp_path)
    job = Job(id="job-b", name="b.blend", blend_sha256="0" * 64, blend_size=1, request=JobRequest(chunk=4),
              created=0.0)
    farm.add_job(job)
    run_frames(farm, outputs, job, [1, 2])
    farm.cancel_job(job.id)
    db.close()

    farm2, _ = farm_with_db(tmp_path)
    for restored in load_jobs(Database(tmp_path / "jobs.sqlite3"), outputs):
        farm2.restore_job(restored)
    farm2.resume_job("job-b")
    assert farm2.next_work("c").frames == [3, 4]


def test_a_job_that_cannot_be_saved_is_not_added(tmp_path: Path) -> None:
    farm, _ = farm_with_db(tmp_path)
    job = Job(id="job-c", name="c.blend", blend_sha256="0" * 64, blend_size=1, request=JobRequest(),
              created=0.0, priority=2**63)  # more than SQLite can hold
    with pytest.raises(OverflowError):
        farm.add_job(job)
    assert "job-c" not in farm.jobs


def test_batched_rows_wait_for_the_flush_but_what_may_not_be_lost_is_written_at_once(tmp_path: Path) -> None:
    """With batching (the server's way), a kill before the next flush loses only what recovery rebuilds: a new job,
    a user's action (here: force-complete, cancel) and a Blender pin are on disk at once."""
    db = Database(tmp_path / "jobs.sqlite3", frame_batch_s=0.5)
    farm = Farm(store=db)
    farm.connect_client("c", "client", "host", blender="5.0.1")
    farm.client_reported("c", "idle", None, None)

    def on_disk() -> dict[str, tuple]:  # what another process reads: the state a kill -9 leaves
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as other:
            return {row[0]: row[1:] for row in other.execute("SELECT id, state, forced FROM jobs")}

    for name in ("forced", "cancelled"):
        farm.add_job(Job(id=f"job-{name}", name=f"{name}.blend", blend_sha256="ab" * 32, blend_size=1,
                         request=JobRequest(chunk=4), created=0.0))
    assert on_disk() == {"job-forced": ("probing", 0), "job-cancelled": ("probing", 0)}  # new jobs: at once
    probe = farm.next_work("c")
    farm.probe_succeeded(probe.id, "c", scene())  # batched: a scene not saved is read again after a kill
    assert on_disk()["job-forced"] == ("probing", 0)
    farm.lease_done(probe.id, "c")
    lease = farm.next_work("c")  # the first frames handed out pin the job to 5.0.1: at once, with the batch before
    assert on_disk()["job-forced"] == ("rendering", 0)
    farm.client_reported("c", "rendering", lease.id, 1)
    farm.frame_stored("job-forced", 1, "c", 0.5, lease.id)  # (so the pin stays: a frame rendered with it)
    farm.force_complete("job-forced")
    assert on_disk()["job-forced"] == ("done", 1)
    farm.cancel_job("job-cancelled")
    assert on_disk()["job-cancelled"] == ("cancelled", 0)
    db.close()
