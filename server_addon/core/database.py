"""Jobs kept in SQLite under the server's data directory, written as they change (by the scheduler, its
JobStore), read back as they were saved on start-up (core.recovery repairs them against the disk).

The frames on disk are the truth about which frames are done; the database keeps everything else:
jobs, settings, failures and logs.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from protocol.blendfile import BlenderVersion
from protocol.errors import ProtocolError
from protocol.manifest import Manifest
from protocol.settings import JobRequest, SceneInfo, SettingsError, resolve

from .jobs import FrameRecord, FrameState, Job, JobState, VideoState

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
#: Columns added after the first schema, with the statement that adds them to an older database.
_MIGRATIONS = {
    2: "ALTER TABLE jobs ADD COLUMN versions TEXT NOT NULL DEFAULT '{}'",  # Blender versions (issue: one per job)
    3: "ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'",  # missing files, scripts (issue 10)
    4: "ALTER TABLE jobs ADD COLUMN project TEXT NOT NULL DEFAULT ''",  # the job's files (protocol.manifest)
}
#: The column each migration adds, to tell which an older database lacks.
_MIGRATION_COLUMNS = {2: "versions", 3: "warnings", 4: "project"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    blend_sha256 TEXT NOT NULL,
    blend_size INTEGER NOT NULL,
    request TEXT NOT NULL,
    scene TEXT,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    error TEXT NOT NULL,
    forced INTEGER NOT NULL,
    probe_failures INTEGER NOT NULL,
    client_failures TEXT NOT NULL,
    created REAL NOT NULL,
    finished_at REAL,
    video TEXT,
    video_state TEXT NOT NULL,
    video_path TEXT NOT NULL,
    video_error TEXT NOT NULL,
    versions TEXT NOT NULL DEFAULT '{}',
    warnings TEXT NOT NULL DEFAULT '[]',
    project TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS frames (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    done INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    failed_on TEXT NOT NULL,
    error TEXT NOT NULL,
    log TEXT NOT NULL,
    rendered_by TEXT NOT NULL,
    render_s REAL,
    PRIMARY KEY (job_id, number)
);
"""


_JOB_COLUMNS = ("seq", "name", "blend_sha256", "blend_size", "request", "scene", "state", "priority", "error",
                "forced", "probe_failures", "client_failures", "created", "finished_at", "video", "video_state",
                "video_path", "video_error", "versions", "warnings", "project")
_JOB_UPDATE = ", ".join(f"{column} = excluded.{column}" for column in _JOB_COLUMNS)


def _versions(job: Job) -> dict:
    return {"file": str(job.file_blender) if job.file_blender else None, "pinned": job.pinned_blender,
            "probe_failed_on": job.probe_failed_on}


# An upsert, not INSERT OR REPLACE: a REPLACE deletes the row first, and the cascade would take the job's frame
# rows with it.
_JOB_UPSERT = ("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
               f"ON CONFLICT(id) DO UPDATE SET {_JOB_UPDATE}")


def _job_row(job: Job) -> tuple:
    return (job.id, job.seq, job.name, job.blend_sha256, job.blend_size, json.dumps(job.request.to_wire()),
            json.dumps(job.scene.to_wire()) if job.scene else None, job.state.value, job.priority, job.error,
            int(job.forced), job.probe_failures, json.dumps(job.client_failures), job.created, job.finished_at,
            json.dumps(job.video) if job.video is not None else None, job.video_state.value, job.video_path,
            job.video_error, json.dumps(_versions(job)), json.dumps(job.warnings),
            json.dumps(job.project.to_wire()) if job.project else "")


class DatabaseError(Exception):
    """The job database cannot be opened or is from a newer MicroFarm."""


class Database:
    """With `frame_batch_s`, frame rows and most job rows are written together at most that long after they change
    (flush(), which the server calls on a timer): a stored frame costs no SQLite statement of its own, and a job
    that changes several times in that while is written once, as it is then. What such a batch holds is safe to
    lose in a kill: the frame files on disk say which frames are done and a job saved rendering with all of them is
    done (core.recovery), a scene not saved is read again, and a failure not counted yet only gives its frame one
    more try. What may not be lost is written at once (save_job's `at_once`): a new job, what a user asked for,
    the Blender version a job's frames are rendered with, a job's failure."""

    def __init__(self, path: Path, *, frame_batch_s: float = 0.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frame_batch_s = frame_batch_s
        self._frame_rows: dict[tuple[str, int], tuple] = {}
        self._job_rows: dict[str, Job] = {}  # written as they are when flushed
        try:
            # The server's event loop thread creates and uses the connection; nothing else does.
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; only a power cut may lose the last commits.
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"cannot open the job database {path}: {exc}") from None
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"the job database {path} was written by a newer MicroFarm (schema {version})")
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(jobs)")}
        self.conn.executescript(_SCHEMA)
        for number, column in _MIGRATION_COLUMNS.items():
            if columns and column not in columns:  # a database from before that schema
                self.conn.execute(_MIGRATIONS[number])
        self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    #: Jobs the last load() could not restore: their rows stay, and so must the files they may use.
    unrestored = 0

    def close(self) -> None:
        self.flush()
        self.conn.close()

    def flush(self) -> None:
        """Write the job and frame rows that wait in the batch (kept for the next try if SQLite refuses them)."""
        if not self._job_rows and not self._frame_rows:
            return
        jobs, self._job_rows = self._job_rows, {}
        frames, self._frame_rows = self._frame_rows, {}
        try:  # one transaction: the batch is written whole or not at all (and one commit costs less than many)
            self.conn.execute("BEGIN")
            self.conn.executemany(_JOB_UPSERT, [_job_row(job) for job in jobs.values()])
            self.conn.executemany("INSERT OR REPLACE INTO frames VALUES (?,?,?,?,?,?,?,?,?)", frames.values())
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self._job_rows = {**jobs, **self._job_rows}
            self._frame_rows = {**frames, **self._frame_rows}
            raise

    def waiting_jobs(self) -> set[str]:
        """The jobs whose rows wait in the batch."""
        return {job_id for job_id, _ in self._frame_rows} | set(self._job_rows)

    # --- JobStore --------------------------------------------------------------------------

    def save_job(self, job: Job, at_once: bool = False) -> None:
        if self.frame_batch_s > 0 and not at_once:
            self._job_rows[job.id] = job
            return
        self.flush()  # (its own batched row too, if any: a refused flush keeps it for the next try)
        self.conn.execute(_JOB_UPSERT, _job_row(job))

    def save_frame(self, job: Job, frame: FrameRecord) -> None:
        row = (job.id, frame.number, int(frame.state is FrameState.DONE), frame.failures,
               json.dumps(sorted(frame.failed_on)) if frame.failed_on else "[]", frame.error, frame.log,
               frame.rendered_by, frame.render_s)
        if self.frame_batch_s > 0:
            self._frame_rows[(job.id, frame.number)] = row
        else:
            self.conn.execute("INSERT OR REPLACE INTO frames VALUES (?,?,?,?,?,?,?,?,?)", row)  # nothing refers to it

    def delete_job(self, job_id: str) -> None:
        self._job_rows.pop(job_id, None)
        self.flush()
        self.conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # --- loading ---------------------------------------------------------------------------

    def load(self) -> list[Job]:
        """Every stored job as it was saved (core.recovery checks its frames against the disk)."""
        self.flush()
        jobs = []
        self.unrestored = 0
        rows = self.conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        names = [d[0] for d in self.conn.execute("SELECT * FROM jobs LIMIT 0").description]
        for row in rows:
            record = dict(zip(names, row, strict=True))
            try:
                job = self._job(record)
            except (ValueError, KeyError, TypeError, SettingsError, ProtocolError) as exc:
                log.error("job %s: cannot be restored (%s); it stays in the database untouched", record["id"], exc)
                self.unrestored += 1
                continue
            self._frames(job)
            jobs.append(job)
        return jobs

    def _job(self, r: dict) -> Job:
        request = JobRequest.from_wire(json.loads(r["request"]))
        scene = SceneInfo.from_wire(json.loads(r["scene"])) if r["scene"] else None
        job = Job(id=r["id"], name=r["name"], blend_sha256=r["blend_sha256"], blend_size=r["blend_size"],
                  request=request, created=r["created"], seq=r["seq"], priority=r["priority"],
                  state=JobState(r["state"]), scene=scene, error=r["error"], forced=bool(r["forced"]),
                  probe_failures=r["probe_failures"], client_failures=json.loads(r["client_failures"]),
                  finished_at=r["finished_at"], video=json.loads(r["video"]) if r["video"] else None,
                  video_state=VideoState(r["video_state"]), video_path=r["video_path"],
                  video_error=r["video_error"])
        if r.get("project"):
            project = json.loads(r["project"])
            job.project = Manifest.from_wire(project.get("files"), project.get("main"))
        versions = json.loads(r["versions"] or "{}")
        job.file_blender = BlenderVersion.parse(versions.get("file") or "")
        job.pinned_blender = str(versions.get("pinned") or "")
        job.probe_failed_on = {str(k): str(v) for k, v in dict(versions.get("probe_failed_on") or {}).items()}
        job.warnings = [str(w) for w in json.loads(r.get("warnings") or "[]")]
        if scene is not None:
            job.settings = resolve(request, scene)
            job.frames = {n: FrameRecord(n) for n in job.settings.items}
        return job

    def _frames(self, job: Job) -> None:
        rows = self.conn.execute(
            "SELECT number, done, failures, failed_on, error, log, rendered_by, render_s FROM frames WHERE job_id = ?",
            (job.id,)).fetchall()
        for number, done, failures, failed_on, error, render_log, rendered_by, render_s in rows:
            frame = job.frames.get(number)
            if frame is None:
                continue
            frame.state = FrameState.DONE if done else FrameState.PENDING  # (as saved: not a move)
            frame.failures, frame.error, frame.log = failures, error, render_log
            frame.failed_on = set(json.loads(failed_on))
            frame.rendered_by, frame.render_s = rendered_by, render_s


class GuardedStore:
    """The job store as the scheduler writes to it: a write SQLite refuses (the disk is full, an I/O error, the file
    or its folder made read-only) never raises into the scheduler, which may be half-way through a change; it is
    noted against its job, and pause_failed_jobs pauses that job with the reason once the change is complete. The
    farm keeps serving from memory; a job resumed once the database can be written again is saved whole."""

    def __init__(self, database: Database) -> None:
        self.database = database  # (the scheduler's store is this wrapper; it alone writes through it)
        self._failures: dict[str, str] = {}  # job id -> the sentence, until pause_failed_jobs takes them

    @property
    def path(self) -> Path:
        return self.database.path

    def save_job(self, job: Job, at_once: bool = False) -> None:
        self._guard(job.id, self.database.save_job, job, at_once)

    def save_frame(self, job: Job, frame: FrameRecord) -> None:
        self._guard(job.id, self.database.save_frame, job, frame)

    def delete_job(self, job_id: str) -> None:
        self._guard(job_id, self.database.delete_job, job_id)

    def _guard(self, job_id: str, write: Any, *args: Any) -> None:
        try:
            write(*args)
        except sqlite3.Error as exc:  # OperationalError (full, I/O, read-only, locked), DatabaseError, ...
            self._note(job_id, exc)

    def _note(self, job_id: str, exc: sqlite3.Error) -> None:
        self._failures.setdefault(job_id, f"the server cannot write to its job database {self.path}: {exc}; "
                                          f"free space there (or make it writable), then resume the job")

    def flush(self) -> bool:
        """Write the batched frame rows; True if SQLite refused them (noted against their jobs)."""
        waiting = self.database.waiting_jobs()
        try:
            self.database.flush()
        except sqlite3.Error as exc:
            for job_id in waiting:
                self._note(job_id, exc)
            return True
        return False

    def take_failures(self) -> dict[str, str]:
        failures, self._failures = self._failures, {}
        return failures


def pause_failed_jobs(farm: Any) -> None:
    """Pause each job whose last change the database refused, with the reason (once: a job already paused for it
    is not logged again for every frame that was in flight)."""
    store = farm.store
    if not isinstance(store, GuardedStore):
        return
    for job_id, reason in store.take_failures().items():
        job = farm.jobs.get(job_id)
        if job is None:  # deleted: its rows stay in the database, and it comes back with the next start
            log.error("job %s: its deletion was not saved: %s", job_id, reason.split("; free space")[0])
            continue
        if job.error == reason and not job.state.running:
            continue
        farm.storage_failed(job_id, reason)
    store.take_failures()  # the pauses' own saves, refused for the same reason: already said
