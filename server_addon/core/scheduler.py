"""The scheduler: which client renders which frames of which job, and what happens on failure.

Pure logic: the service feeds events in (a client connected, a frame arrived, a client went
silent) and carries out what decide() returns (assignments, revocations, stitches, videos: effects).
States move only through core.states. Every change worth keeping goes to a JobStore, which the
server backs with SQLite; this module is the only one that writes to it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import re
import time
from collections.abc import Callable
from typing import Protocol

from protocol.assets import MAX_WARNING_CHARS, clip_text, missing_sentence, scripts_sentence
from protocol.errors import ProtocolError
from protocol.names import printable
from protocol.settings import SceneInfo, SettingsError, resolve
from protocol.tiles import MIN_TILES

from .effects import Assign, BuildVideo, Effect, Stitch
from .jobs import ClientRecord, FrameRecord, FrameState, Job, JobState, Lease, LeaseKind, Revocation, VideoState
from .states import move_frame, move_job, move_video
from .tiling import client_speeds, tile_count
from .versions import client_version, connected_summary, preferred_version, version_fits, wanted_sentence

log = logging.getLogger(__name__)

#: A frame that fails this many times (on different clients where there are any) fails its job.
MAX_FRAME_ATTEMPTS = 3
#: A client that fails this many frames of one job gets no more of that job's frames.
MAX_CLIENT_JOB_FAILURES = 3
#: Warnings a job keeps (the first ones: later frames mostly repeat them).
MAX_JOB_WARNINGS = 32
#: At a job's tail (no frame left to hand out), a leased frame whose holder is this many typical frame times
#: behind (counting the frames before it in its lease), and at least SPARE_MIN_S, is given to an idle client as
#: well: a slow or stuck client then never holds the end of a job back alone. (The floor keeps a client that is
#: still fetching and opening the file for its first frame from looking late next to frames of a second.)
SPARE_AFTER = 1.5
SPARE_MIN_S = 10.0


def _device_fits(job: Job, client: ClientRecord) -> bool:
    return not (job.request.device == "GPU" and client.device == "CPU")


def _scripts_fit(job: Job, client: ClientRecord) -> bool:
    """A job that needs its scene's scripts goes only to clients started with --allow-scripts."""
    return client.allow_scripts or not job.request.needs_scripts


def _opens(job: Job, client: ClientRecord) -> bool:
    """The client may read the job's scene: its Blender may render the job, and it runs the scripts if need be."""
    return version_fits(job, client) and _scripts_fit(job, client)


def _fits(job: Job, client: ClientRecord) -> bool:
    """The client's device, Blender version and scripts setting may render this job."""
    return _device_fits(job, client) and _opens(job, client)


def as_submitted(job: Job, text: str) -> str:
    """A client's words with its cache names replaced by the file's own: clients keep a job's .blend as
    <sha256>.blend, so Blender names it (and its disk caches, blendcache_<sha256>/) by the checksum."""
    stem = job.name[:-len(".blend")] if job.name.endswith(".blend") else job.name
    text = text.replace(f"blendcache_{job.blend_sha256}", f"blendcache_{stem}")
    cached = re.escape(job.blend_sha256) + r"\.blend"
    pattern = rf"'[^']*{cached}'|\"[^\"]*{cached}\"|(?:[A-Za-z]:)?[^\s'\":]*{cached}"
    return re.sub(pattern, lambda match: _quoted_like(match.group(0), job.name), text)


def _quoted_like(found: str, name: str) -> str:
    return f"{found[0]}{name}{found[0]}" if found[:1] in ("'", '"') else name


def add_warning(job: Job, text: str) -> bool:
    """Note a warning on the job once; False if it was there already or the job has enough of them."""
    text = clip_text(text, MAX_WARNING_CHARS)
    if text in job.warnings or len(job.warnings) >= MAX_JOB_WARNINGS:
        return False
    job.warnings.append(text)
    return True


class JobActionError(ValueError):
    """A job action that does not apply (unknown job, or the job's state forbids it)."""


class NotLeaseHolder(ProtocolError):
    """A client sent a result for a lease, or a frame, that was never its own.

    A client only ever names the leases it was given (lease ids are unique in a server's run, client ids
    in a connection, and a client drops what it did for an earlier connection), so this is never a race:
    like any message the protocol does not allow, it closes that one connection, with one logged reason."""


class JobStore(Protocol):
    def save_job(self, job: Job, at_once: bool = False) -> None:
        """Keep the job as it is; a store that batches its writes (core.database) may wait a moment unless
        `at_once`: what may not be lost in a kill."""
    def save_frame(self, job: Job, frame: FrameRecord) -> None: ...
    def delete_job(self, job_id: str) -> None: ...


class NullStore:
    def save_job(self, job: Job, at_once: bool = False) -> None:
        pass

    def save_frame(self, job: Job, frame: FrameRecord) -> None:
        pass

    def delete_job(self, job_id: str) -> None:
        pass


@dataclasses.dataclass
class FarmCounts:
    """Events counted since the server started (the metrics read them)."""

    frame_failures: int = 0  # frames that failed on a client (hung ones included)
    probe_failures: int = 0  # .blend files a client could not open
    leases_lost: int = 0  # leases taken back because their client went away
    frames_handed_back: int = 0  # frames a client gave back unrendered (it was told to stop)


class RunningOrder:
    """The jobs that may get work, highest priority first, then in submission order: kept sorted as jobs come,
    move, change priority and go (a bisect each), instead of sorting every job on every event."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int, str]] = []
        self._jobs: list[Job] = []
        self._key_of: dict[str, tuple[int, int, str]] = {}
        self._view: tuple[Job, ...] | None = ()

    def update(self, job: Job, present: bool = True) -> None:
        """Put the job in its place, or take it out if it is not `present` in the farm or not running."""
        key = (-job.priority, job.seq, job.id)
        old = self._key_of.pop(job.id, None)
        if old is not None:
            at = bisect.bisect_left(self._keys, old)
            del self._keys[at], self._jobs[at]
        if present and job.state.running:
            at = bisect.bisect_left(self._keys, key)
            self._keys.insert(at, key)
            self._jobs.insert(at, job)
            self._key_of[job.id] = key
        self._view = None

    def jobs(self) -> tuple[Job, ...]:
        """The order as it is now (a snapshot: a job that moves while a caller goes through it does not upset it)."""
        if self._view is None:
            self._view = tuple(self._jobs)
        return self._view


class Farm:
    def __init__(self, clock: Callable[[], float] = time.monotonic, store: JobStore | None = None) -> None:
        self.clock = clock
        self.store: JobStore = store or NullStore()
        self.jobs: dict[str, Job] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.leases: dict[int, Lease] = {}
        self.counts = FarmCounts()
        self._lease_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._revocations: list[Revocation] = []
        # Kept up to date instead of scanned for on every event (see decide): which clients to look at, when
        # everything must be looked at again, and what each job's possible clients are.
        self._order: dict[str, int] = {}  # client id -> when it connected (the order clients get work in)
        self._hints: set[str] = set()  # clients that may have become idle since the last decide
        self._rescan = True  # something changed that may give any idle client work
        self._clients_gen = 0  # moves when the set of connected clients or what they can do changes
        self._running = RunningOrder()
        self._capable: dict[str, tuple[int, str, set[str]]] = {}
        self._noted_clients = -1  # the clients' generation the waiting notes were last written for
        self._stale_notes: set[str] = set()  # jobs whose waiting note may be out of date since
        self._fitting_memo: tuple[int, dict[tuple, str | list[ClientRecord]]] = (-1, {})
        self._deferred = False  # next_work held a client back for another Blender version
        self._stitch_watch: set[str] = set()
        self._video_watch: set[str] = set()

    def _widely_changed(self) -> None:
        """Any idle client may have work now (a job came, moved, or got frames back; a client came or went)."""
        self._rescan = True

    def _clients_changed(self) -> None:
        self._clients_gen += 1
        self._widely_changed()

    def _job_changed(self, job: Job) -> None:
        """The job's state, priority, pin or probe failures changed: its place in the running order and its
        waiting note are looked at again, and any idle client may have work."""
        self._running.update(job, job.id in self.jobs)
        self._stale_notes.add(job.id)
        self._widely_changed()

    def _move(self, job: Job, state: JobState) -> None:
        move_job(job, state)
        self._job_changed(job)
        self._watch_finishing(job)

    def _watch_finishing(self, job: Job) -> None:
        if job.stitch_due:
            self._stitch_watch.add(job.id)
        if job.video_due:
            self._video_watch.add(job.id)

    # --- jobs -----------------------------------------------------------------------------

    def add_job(self, job: Job, start: bool = True) -> None:
        job.seq = next(self._seq)
        job.state = JobState.PROBING if start else JobState.QUEUED  # (its first state: not a move)
        self.store.save_job(job, at_once=True)  # first: a job that cannot be saved is refused, not half-added
        self.jobs[job.id] = job
        self._job_changed(job)
        log.info("job %s: added (%s), %s", job.id, job.name, job.state.value)

    def restore_job(self, job: Job) -> None:
        """Take back a job loaded from the store, as it was, repaired where a stop cut it off."""
        self.jobs[job.id] = job
        self._seq = itertools.count(max(job.seq + 1, next(self._seq)))
        self._job_changed(job)
        if job.state is JobState.RENDERING and job.settings is None:
            self._move(job, JobState.PROBING)  # saved rendering without its scene: read the scene again
        if job.state is JobState.RENDERING and job.complete:
            self._finish(job, JobState.DONE)  # the server stopped between the last frame and saving the job
        self._watch_finishing(job)

    def job(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise JobActionError(f"there is no job {job_id!r}") from None

    def running_jobs(self) -> tuple[Job, ...]:
        """Jobs that may get work, highest priority first, then in submission order (see RunningOrder)."""
        return self._running.jobs()

    def reindex(self) -> None:
        """Build the running order and the waiting notes again from `jobs` as they are (for jobs set from
        outside: a test's farm that shares another's jobs)."""
        self._running = RunningOrder()
        for job in self.jobs.values():
            self._job_changed(job)
        self._noted_clients = -1

    def _finish(self, job: Job, state: JobState, error: str = "") -> None:
        self._move(job, state)
        job.error = error
        job.finished_at = time.time()
        self._end_leases_of(job)
        self.store.save_job(job, at_once=state is not JobState.DONE or job.forced)  # (done: see core.database)

    def fail_job(self, job: Job, error: str) -> None:
        if job.state.finished:
            return
        log.warning("job %s: failed: %s", job.id, printable(error.splitlines()[0]) if error else "")
        self._finish(job, JobState.FAILED, error)

    def cancel_job(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.state.finished:
            raise JobActionError(f"job {job_id} is already {job.state.value}")
        log.info("job %s: cancelled", job.id)
        self._finish(job, JobState.CANCELLED)
        return job

    def pause_job(self, job_id: str) -> Job:
        job = self.job(job_id)
        if not job.state.running:
            raise JobActionError(f"job {job_id} is {job.state.value}; only a running job can be paused")
        log.info("job %s: paused", job.id)
        self._move(job, JobState.PAUSED)
        self._end_leases_of(job)
        self.store.save_job(job, at_once=True)
        return job

    def resume_job(self, job_id: str) -> Job:
        """Start a queued or paused job, or give a failed or cancelled one another go."""
        job = self.job(job_id)
        if job.state.running:
            raise JobActionError(f"job {job_id} is already {job.state.value}")
        if job.state is JobState.DONE and not job.forced:
            raise JobActionError(f"job {job_id} is done; every frame is on disk")
        if job.state is JobState.FAILED:
            for frame in job.frames.values():
                frame.failures = 0
                frame.failed_on.clear()
            job.index.failed.clear()
            job.client_failures.clear()
            job.probe_failures = 0
            job.probe_failed_on.clear()
        self._unpin_if_unused(job)
        job.error = ""
        job.forced = False
        job.finished_at = None
        if job.complete:  # (a split job whose tiles are all there but not stitched stays RENDERING: stitch_due)
            self._move(job, JobState.DONE)
            job.finished_at = time.time()
        else:
            self._move(job, JobState.RENDERING if job.settings is not None else JobState.PROBING)
        log.info("job %s: resumed (%s)", job.id, job.state.value)
        self.store.save_job(job, at_once=True)
        return job

    def force_complete(self, job_id: str) -> Job:
        """Stop rendering and call the job done with the frames that exist."""
        job = self.job(job_id)
        if job.state.finished:
            raise JobActionError(f"job {job_id} is already {job.state.value}")
        job.forced = job.settings is None or not job.complete
        log.info("job %s: force-completed with %d of %d frames", job.id, job.frames_done, len(job.frames))
        self._finish(job, JobState.DONE)
        return job

    def delete_job(self, job_id: str) -> Job:
        job = self.job(job_id)
        self._end_leases_of(job)
        del self.jobs[job_id]
        self._capable.pop(job_id, None)
        self._job_changed(job)
        self.store.delete_job(job_id)
        log.info("job %s: deleted", job.id)
        return job

    def clear_finished(self) -> list[Job]:
        finished = [j for j in self.jobs.values() if j.state.finished]
        for job in finished:
            self.delete_job(job.id)
        return finished

    def set_priority(self, job_id: str, priority: int) -> Job:
        job = self.job(job_id)
        job.priority = priority
        self._job_changed(job)
        self.store.save_job(job, at_once=True)
        return job

    def _end_leases_of(self, job: Job) -> None:
        for lease in [lease for lease in self.leases.values() if lease.job_id == job.id]:
            self._revocations.append(Revocation(lease.client_id, lease.id, ()))
            self._drop_lease(lease)

    # --- clients --------------------------------------------------------------------------

    def connect_client(self, client_id: str, name: str, host: str, device: str = "CPU",
                       devices: tuple[str, ...] = (), blender: str = "", allow_scripts: bool = False) -> ClientRecord:
        record = ClientRecord(id=client_id, name=name, host=host, device=device or "CPU", devices=devices,
                              blender=blender, allow_scripts=allow_scripts)
        self.clients[client_id] = record
        self._order[client_id] = len(self._order)
        self._clients_changed()
        return record

    def disconnect_client(self, client_id: str) -> list[Lease]:
        """The client is gone: its leases are taken back and its frames become pending again.

        A lost connection is no failure of the frame, the file or the client: a client killed, pre-empted
        or cut off by its network hands its work back, and nothing is counted against anyone. Blender
        crashing on a file or a frame is told apart by the client, which renders in a process of its own
        and reports that crash as the frame's failure (FRAME_FAILED) or the file's (PROBE_RESULT)."""
        record = self.clients.get(client_id)
        if record is None:
            return []
        record.connected = False
        self._clients_changed()
        taken = [lease for lease in self.leases.values() if lease.client_id == client_id]
        self.counts.leases_lost += len(taken)
        for lease in taken:
            log.info("job %s: lease %d of client %s taken back (%s)", lease.job_id, lease.id,
                     record.name, ",".join(map(str, lease.frames)) or "probe")
            self._drop_lease(lease)
        record.frame = None
        return taken

    def forget_client(self, client_id: str) -> None:
        self.disconnect_client(client_id)
        self.clients.pop(client_id, None)
        self._order.pop(client_id, None)
        self._hints.discard(client_id)

    def idle_clients(self) -> list[str]:
        return [c.id for c in self.clients.values() if c.connected and c.ready and not c.busy and c.lease_id is None]

    def client_views(self) -> list[dict]:
        excluded: dict[str, list[str]] = {}  # client name -> the unfinished jobs it is shut out of
        for job in self.jobs.values():
            if job.client_failures and not job.state.finished:
                for name in job.excluded_clients(MAX_CLIENT_JOB_FAILURES):
                    excluded.setdefault(name, []).append(job.id)
        return [c.view(self.leases, excluded.get(c.name, [])) for c in self.clients.values()]

    def _drop_lease(self, lease: Lease) -> None:
        self.leases.pop(lease.id, None)
        job = self.jobs.get(lease.job_id)
        if job is not None:
            if job.probe_lease == lease.id:
                job.probe_lease = None
            if lease.kind is LeaseKind.RENDER:
                self._unpin_if_unused(job)
            for number in lease.frames:
                frame = job.frames.get(number)
                if frame is None:
                    continue
                if frame.spare_lease == lease.id:
                    frame.spare_lease = None
                elif frame.state is FrameState.LEASED and frame.lease_id == lease.id:
                    self._hand_back(job, frame)
            if lease.kind is LeaseKind.PROBE and job.state is JobState.PROBING:
                self._job_changed(job)  # another client may read the scene now
        client = self.clients.get(lease.client_id)
        if client is not None and client.lease_id == lease.id:
            client.lease_id = None
            client.frame = None
            client.frame_started = None
            self._hints.add(client.id)

    def _hand_back(self, job: Job, frame: FrameRecord) -> None:
        """A frame's holder no longer renders it: its second holder (see SPARE_AFTER) goes on with it, or it
        waits for the next client."""
        second = self.leases.get(frame.spare_lease) if frame.spare_lease is not None else None
        frame.spare_lease = None
        if second is not None:
            move_frame(job, frame, FrameState.LEASED, second.id)
            second.spare = False
        else:
            move_frame(job, frame, FrameState.PENDING)
            self._widely_changed()  # a frame back: any idle client may take it

    def _unpin_if_unused(self, job: Job) -> None:
        """A job is pinned to a Blender version when its first frames are handed out; until one of them is
        on disk, losing those leases (a client that crashed, left or lied) frees the job for any version."""
        if not job.pinned_blender or job.index.done:
            return
        if any(lease.job_id == job.id and lease.kind is LeaseKind.RENDER for lease in self.leases.values()):
            return
        log.info("job %s: no frame rendered with Blender %s yet; any version may take it", job.id, job.pinned_blender)
        job.pinned_blender = ""
        self._job_changed(job)
        self.store.save_job(job, at_once=True)

    def drain_revocations(self) -> list[Revocation]:
        out, self._revocations = self._revocations, []
        return out

    def decide(self, reachable: Callable[[str], bool] = lambda client_id: True) -> list[Effect]:
        """What is due now, in the order it is to be carried out: stitches and videos to start (the service
        starts each once), waiting notes refreshed, then what clients must stop, then work for every idle
        client (each idle client at once: a client never waits for the next change to get work)."""
        effects: list[Effect] = [Stitch(job_id) for job_id in self._due(self._stitch_watch, "stitch_due")]
        effects += [BuildVideo(job_id) for job_id in self._due(self._video_watch, "video_due")]
        if self._stale_notes or self._noted_clients != self._clients_gen:
            self.note_waiting()
        effects += self.drain_revocations()
        if self._rescan:
            looking = list(self.clients)
        else:  # only the clients that changed since: nothing else did that could give work to the others
            looking = sorted((c for c in self._hints if c in self.clients), key=self._order.__getitem__)
        self._rescan = False
        self._hints.clear()
        while looking and self._work_left():
            self._deferred = False
            left = []
            assigned = False
            for at, client_id in enumerate(looking):
                client = self.clients[client_id]
                if client.connected and client.ready and not client.busy and client.lease_id is None:
                    lease = self.next_work(client_id) if reachable(client_id) else None
                    if lease is not None:
                        effects.append(Assign(lease))
                        assigned = True
                        if not self._work_left():  # (only an assignment takes work away)
                            left += looking[at + 1:]
                            break
                    else:
                        left.append(client_id)
            # A client held back for the version most idle clients run may go ahead once others took other work.
            looking = left
            if not (self._deferred and assigned):
                break
        # Who is still idle may take a second copy of a late frame at a job's tail.
        effects += [Assign(lease) for lease in self.spares(reachable)]
        return effects

    def _work_left(self) -> bool:
        """Some running job has work a client might take (the first such job in the order ends the look)."""
        return any(self._has_work(job) for job in self.running_jobs())

    @staticmethod
    def _idle(client: ClientRecord) -> bool:
        return client.connected and client.ready and not client.busy and client.lease_id is None

    def _due(self, watch: set[str], due: str) -> list[str]:
        """The watched jobs for which `due` (a Job property) holds; the others leave the watch."""
        found = []
        for job_id in list(watch):
            job = self.jobs.get(job_id)
            if job is not None and getattr(job, due):
                found.append(job_id)
            else:
                watch.discard(job_id)
        return sorted(found, key=lambda job_id: self.jobs[job_id].seq)

    @staticmethod
    def _has_work(job: Job) -> bool:
        """Work any client might take: a scene to read, or frames waiting."""
        if job.state is JobState.PROBING:
            return job.probe_lease is None
        return job.has_pending

    # --- handing out work -----------------------------------------------------------------

    def note_waiting(self) -> None:
        """Say on each running job that no connected client may take why it waits, and for what: on every running
        job when the clients changed, else on the jobs that changed since (a job that stopped running waits for
        nothing)."""
        stale = self._stale_notes
        self._stale_notes = set()
        if self._noted_clients != self._clients_gen:
            stale.update(job.id for job in self.running_jobs())
            self._noted_clients = self._clients_gen
        connected = [c for c in self.clients.values() if c.connected]
        if self._fitting_memo[0] != self._clients_gen:
            self._fitting_memo = (self._clients_gen, {})
        fitting = self._fitting_memo[1]  # jobs alike in what they ask of a client: once while no client changes
        for job_id in stale:
            job = self.jobs.get(job_id)
            if job is not None:
                job.waiting = self._waiting(job, connected, fitting) if job.state.running else ""

    def _waiting(self, job: Job, connected: list[ClientRecord],
                 fitting: dict[tuple, str | list[ClientRecord]]) -> str:
        key = (job.file_blender, job.pinned_blender, job.request.blender, job.request.device,
               job.request.needs_scripts)
        found = fitting.get(key)
        if found is None:
            found = fitting[key] = self._fitting(job, connected)
        if isinstance(found, str):
            return found
        if job.state is JobState.PROBING and all(c.name in job.probe_failed_on for c in found):
            return (f"waiting for a client that can open the file; {', '.join(sorted(job.probe_failed_on))} "
                    "could not")
        return ""

    def _fitting(self, job: Job, connected: list[ClientRecord]) -> str | list[ClientRecord]:
        """Why no connected client may take the job, or the clients that may (see _waiting)."""
        versions = [c for c in connected if version_fits(job, c)]
        if not versions:
            gpu = " rendering on a GPU" if job.request.device == "GPU" else ""
            return f"waiting for a client with {wanted_sentence(job)}{gpu}; connected: {connected_summary(connected)}"
        if job.request.needs_scripts and not any(c.allow_scripts for c in versions):
            names = ", ".join(sorted(c.name for c in versions))
            return ("waiting for a client started with --allow-scripts (the job needs the scene's scripts); "
                    f"connected clients run with scripts off: {names}")
        versions = [c for c in versions if _scripts_fit(job, c)]
        if job.request.device == "GPU" and not any(_device_fits(job, c) for c in versions):
            return "waiting for a client that renders on a GPU"
        return versions

    def next_work(self, client_id: str) -> Lease | None:
        """Give an idle client its next piece of work, or None if there is nothing it may do."""
        client = self.clients[client_id]
        if not client.connected or client.lease_id is not None:
            return None
        for job in self.running_jobs():
            if not self._has_work(job):
                continue
            if job.state is JobState.PROBING:
                # Reading a scene renders nothing (any device will do), but only a Blender that may
                # render the job reads it, and a client that could not open the file is not asked again.
                if job.probe_lease is None and _opens(job, client) and client.name not in job.probe_failed_on:
                    return self._lease(job, client, LeaseKind.PROBE, [])
                continue
            if not _fits(job, client):
                continue  # a GPU-only job never renders on a CPU, nor a job on another Blender version
            # Who else could take this job's frames: connected, the right device and Blender, not shut out.
            capable = self._capable_of(job)
            excluded = job.excluded_clients(MAX_CLIENT_JOB_FAILURES)
            takers = capable - excluded
            if client.name in excluded and takers:
                continue  # it failed too many of this job's frames, and others can do them
            if not job.pinned_blender:
                # Among the clients that could start it now (idle ones): a busy majority holds nothing back.
                possible = takers or capable
                candidates = [c for c in self.clients.values() if c.connected and c.name in possible
                              and (c is client or (c.ready and not c.busy and c.lease_id is None)) and _fits(job, c)]
                if preferred_version(job, candidates) not in (None, client_version(client)):
                    self._deferred = True
                    continue  # the job will be pinned to the Blender most of its possible clients run
            frames = self._eligible_frames(job, client.name, takers or capable)
            if frames:
                return self._lease(job, client, LeaseKind.RENDER, frames)
        return None

    def _capable_of(self, job: Job) -> set[str]:
        """The names of the connected clients whose device, Blender and scripts setting fit the job (kept until
        a client comes, goes or changes, or the job is pinned to another version)."""
        cached = self._capable.get(job.id)
        if cached is None or cached[0] != self._clients_gen or cached[1] != job.pinned_blender:
            names = {c.name for c in self.clients.values() if c.connected and _fits(job, c)}
            cached = (self._clients_gen, job.pinned_blender, names)
            self._capable[job.id] = cached
        return cached[2]

    def _eligible_frames(self, job: Job, name: str, takers: set[str]) -> list[int]:
        assert job.settings is not None
        frames = job.frames

        def elsewhere(number: int) -> bool:
            # A frame that failed on this client goes elsewhere, unless no other taker is left for it.
            failed_on = frames[number].failed_on
            return bool(failed_on) and name in failed_on and bool(takers - failed_on)
        return job.index.pick(job.settings.chunk, elsewhere)

    def _lease(self, job: Job, client: ClientRecord, kind: LeaseKind, frames: list[int],
               spare: bool = False) -> Lease:
        lease = Lease(id=next(self._lease_ids), job_id=job.id, client_id=client.id, kind=kind,
                      frames=frames, started=self.clock(), spare=spare)
        self.leases[lease.id] = lease
        client.lease_id = lease.id
        if kind is LeaseKind.PROBE:
            job.probe_lease = lease.id
        elif not job.pinned_blender:
            job.pinned_blender = client_version(client)
            self._job_changed(job)  # which clients fit the job changed
            log.info("job %s: renders with Blender %s (client %s)", job.id, job.pinned_blender, client.name)
            self.store.save_job(job, at_once=True)
        for number in frames:
            record = job.frames[number]
            if spare:
                record.spare_lease = lease.id  # (it stays its first holder's too)
            else:
                move_frame(job, record, FrameState.LEASED, lease.id)
            record.held_by[lease.id] = client.id
        return lease

    def spares(self, reachable: Callable[[str], bool] = lambda client_id: True,
               only: str | None = None) -> list[Lease]:
        """Second copies of late frames at the tail of jobs (see SPARE_AFTER) for idle clients (or the one named
        `only`): each late frame once, latest first; each client one."""
        now = self.clock()
        free: list[ClientRecord] | None = None  # looked for once a late frame is found
        given: list[Lease] = []
        for job in self._tails(now):
            if free is not None and not free:
                break
            typical = job.typical_frame_s(1)
            if typical is None:
                continue
            late: list[tuple[float, int]] = []
            for number in job.index.leased:
                frame = job.frames[number]
                holder = self.leases.get(frame.lease_id) if frame.lease_id is not None else None
                if holder is None or frame.spare_lease is not None:
                    continue
                # Where its holder should be by now: the frames before it in its lease, then this one.
                expected = typical * (holder.frames.index(number) + 1)
                behind = (now - holder.started) / expected
                if behind >= SPARE_AFTER and now - holder.started >= expected + SPARE_MIN_S:
                    late.append((-behind, number))
            if not late:
                continue
            late.sort()
            if free is None:
                names = [only] if only is not None else list(self.clients)
                free = [c for c in (self.clients[n] for n in names) if self._idle(c) and reachable(c.id)]
            excluded = job.excluded_clients(MAX_CLIENT_JOB_FAILURES)
            for client in list(free):
                if not _fits(job, client) or client.name in excluded:
                    continue
                for i, (_, number) in enumerate(late):
                    frame = job.frames[number]
                    if self.leases[frame.lease_id].client_id != client.id and client.name not in frame.failed_on:
                        log.info("job %s: frame %d is late on its client; client %s renders it too", job.id, number,
                                 client.name)
                        given.append(self._lease(job, client, LeaseKind.RENDER, [number], spare=True))
                        free.remove(client)
                        del late[i]
                        break
                if not late:
                    break
        return given

    def _tails(self, now: float) -> list[Job]:
        """The jobs at their tail (rendering, no frame left to hand out, frames leased) with a lease old enough
        for a frame of it to be late, in the running order. Found from the leases, at most one a client, oldest
        first (they are kept in the order they were made): not from every job."""
        found: dict[str, Job] = {}
        for lease in self.leases.values():
            if now - lease.started < SPARE_MIN_S:
                break  # (and every lease after it is younger)
            job = self.jobs.get(lease.job_id)
            if (job is not None and job.id not in found and job.state is JobState.RENDERING and not job.has_pending
                    and job.index.leased):
                found[job.id] = job
        return sorted(found.values(), key=lambda j: (-j.priority, j.seq))

    def tail_waiting(self) -> bool:
        """Whether a job's tail has leased frames and some client is idle: a late frame may be worth a second
        copy now (lateness comes with time alone, so the watchdog asks each round)."""
        if not any(j.state is JobState.RENDERING and not j.has_pending and j.index.leased
                   for j in self.running_jobs()):
            return False
        if not any(c.connected and c.ready and not c.busy and c.lease_id is None for c in self.clients.values()):
            return False
        self._rescan = True
        return True

    def _own_lease(self, lease_id: int, client_id: str) -> Lease | None:
        """The lease, while it lasts, if it is this client's; None once it ended (a late report changes
        nothing). Another client's lease is refused: its end, probe answer or failures are its holder's."""
        lease = self.leases.get(lease_id)
        if lease is not None and lease.client_id != client_id:
            name = self.clients[client_id].name if client_id in self.clients else client_id
            raise NotLeaseHolder(f"client {name} reported on lease {lease_id}, which it does not hold")
        return lease

    # --- results --------------------------------------------------------------------------

    def probe_succeeded(self, lease_id: int, client_id: str, scene: SceneInfo) -> Job | None:
        lease = self._own_lease(lease_id, client_id)
        if lease is None or lease.kind is not LeaseKind.PROBE:
            return None
        job = self.jobs[lease.job_id]
        self._drop_lease(lease)
        if job.state is not JobState.PROBING:
            return job
        try:
            # (Only a split job asking for "auto" needs the tile count, which looks at every delivered frame.)
            settings = resolve(job.request, scene, self.auto_tiles(job) if job.request.split == 0 else MIN_TILES)
        except SettingsError as exc:
            self.fail_job(job, f"the job's settings do not fit the scene: {exc}")
            return job
        if not scene.has_camera:
            self.fail_job(job, f"scene {scene.scene!r} has no camera to render from")
            return job
        if scene.missing:
            missing = as_submitted(job, missing_sentence(scene.missing, scene.missing_total))
            if not job.request.allow_missing:
                self.fail_job(job, f"{missing}; add the files to the project, or submit with --allow-missing to "
                                   "render without them")
                return job
            add_warning(job, missing)
        if (scene.python_drivers or scene.registered_texts) and not job.request.needs_scripts:
            add_warning(job, scripts_sentence(scene.python_drivers, scene.registered_texts))
        job.scene = scene
        job.settings = settings
        if settings.tiles:
            # "auto" becomes the count it resolved to: a restart rebuilds the same tiles from the request.
            job.request = dataclasses.replace(job.request, split=settings.tiles)
            log.info("job %s: frame %d split into %d tiles (margin %d rows)", job.id, settings.frames[0],
                     settings.tiles, settings.margin)
        job.frames = {n: FrameRecord(n) for n in settings.items}
        self._move(job, JobState.RENDERING)
        self.store.save_job(job)
        log.info("job %s: %d frames, %s, %dx%d at %g fps", job.id, len(job.frames), settings.file_format,
                 settings.resolution_x, settings.resolution_y, settings.fps)
        return job

    def probe_failed(self, lease_id: int, client_id: str, error: str) -> Job | None:
        lease = self._own_lease(lease_id, client_id)
        if lease is None or lease.kind is not LeaseKind.PROBE:
            return None
        job = self.jobs[lease.job_id]
        client = self.clients.get(lease.client_id)
        self._drop_lease(lease)
        if job.state is not JobState.PROBING:
            return job
        name = client.name if client else lease.client_id
        version = client.blender if client else "?"
        # Clients name the file by its place in their cache; the user knows it by its own name.
        error = as_submitted(job, error)
        job.probe_failures += 1
        self.counts.probe_failures += 1
        job.probe_failed_on[name] = f"Blender {version}: {error}"
        self._job_changed(job)
        self.store.save_job(job)
        # The job fails once every connected client that may take it has failed to open the file.
        others = [c for c in self.clients.values()
                  if c.connected and _opens(job, c) and c.name not in job.probe_failed_on]
        if not others:
            saved = f"saved by Blender {job.file_blender}" if job.file_blender else "saved by an unknown Blender"
            tried = "; ".join(f"{n} ({why})" for n, why in sorted(job.probe_failed_on.items()))
            self.fail_job(job, f"no client could open {job.name} ({saved}): {tried}")
        return job

    def check_frame_holder(self, job_id: str, number: int, client_id: str, lease_id: int | None = None) -> None:
        """Refuse a frame (or tile) of a job from a client that was never leased it.

        A frame counts from the client holding it and, once, from one that held it in this job before it
        was taken back (a pause, a revocation) and handed on: that client rendered it as asked, and whichever
        copy lands first is stored (the other holder is told to stop). With a lease id, that lease must have
        covered the frame and been the client's. A job that is gone, or a frame it lacks, is not for here."""
        job = self.jobs.get(job_id)
        frame = job.frames.get(number) if job is not None else None
        if frame is None:
            return
        held = (frame.held_by.get(lease_id) == client_id if lease_id is not None
                else client_id in frame.held_by.values())
        if not held:
            name = self.clients[client_id].name if client_id in self.clients else client_id
            raise NotLeaseHolder(f"client {name} sent frame {number} of job {job_id}, which no lease of "
                                 f"{'it' if lease_id is None else f'its numbered {lease_id}'} covered")

    def wants_frame(self, job_id: str, number: int, client_id: str, lease_id: int | None = None) -> bool:
        """Is this client's result for this frame still wanted? (Not stored yet; the job rendering or
        paused.) A frame the client was never leased is refused: see check_frame_holder."""
        job = self.jobs.get(job_id)
        if job is None or job.state not in (JobState.RENDERING, JobState.PAUSED):
            return False
        frame = job.frames.get(number)
        if frame is None or frame.state is FrameState.DONE:
            return False
        self.check_frame_holder(job_id, number, client_id, lease_id)
        return True

    def frame_stored(self, job_id: str, number: int, client_id: str, render_s: float | None = None,
                     lease_id: int | None = None, warnings: tuple[str, ...] | list[str] = ()) -> bool:
        """Record that a frame's file is on disk, with what its client found missing while rendering it
        (a warning on the job). Returns False if it was already stored."""
        if not self.wants_frame(job_id, number, client_id, lease_id):
            return False
        job = self.jobs[job_id]
        frame = job.frames[number]
        holder = self.leases.get(frame.lease_id) if frame.lease_id is not None else None
        if holder is not None and holder.id != lease_id:
            # Another client holds this frame (it was reassigned); it need not render it now.
            self._revocations.append(Revocation(holder.client_id, holder.id, (number,)))
        spare = self.leases.get(frame.spare_lease) if frame.spare_lease is not None else None
        frame.spare_lease = None
        if spare is not None and spare.id != lease_id:
            # The first holder was not so late after all: the second copy is not wanted.
            self._revocations.append(Revocation(spare.client_id, spare.id, ()))
            self._drop_lease(spare)
        client = self.clients.get(client_id)
        move_frame(job, frame, FrameState.DONE)
        frame.rendered_by = client.name if client else client_id
        frame.render_s = render_s
        job.index.timed(frame)
        if client is not None:
            client.frames_rendered += 1
        what = f"tile {number}" if job.settings and job.settings.tiles else f"frame {number}"
        noted = False
        for warning in warnings:
            warning = as_submitted(job, warning)
            # The probe's list again, or a line an earlier frame showed: once is enough.
            if warning not in job.warnings and not any(w.endswith(f": {warning}") for w in job.warnings):
                noted = add_warning(job, f"{what}: {warning}") or noted
        if noted:
            log.warning("job %s: %s rendered with files missing: %s", job.id, what, printable("; ".join(warnings)))
            self.store.save_job(job)
        self.store.save_frame(job, frame)
        if job.state is JobState.RENDERING and job.complete:
            log.info("job %s: done, %d frames", job.id, len(job.frames))
            self._finish(job, JobState.DONE)
        elif job.stitch_due:
            self._stitch_watch.add(job.id)
            log.info("job %s: all %d tiles rendered; stitching frame %d", job.id, len(job.frames),
                     job.settings.frames[0])
        return True

    # --- the server's own failures and videos ----------------------------------------------

    def storage_failed(self, job_id: str, reason: str) -> None:
        """The server cannot write a job's frames (disk full, permissions): the job pauses with the reason."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        log.error("job %s: %s", job.id, printable(reason))
        if job.state.running:
            self.pause_job(job.id)
        job.error = reason
        self.store.save_job(job, at_once=True)

    def check_video(self, job_id: str) -> Job:
        """The job, if a video may be built from it (it is done); JobActionError otherwise."""
        job = self.job(job_id)
        if job.state is not JobState.DONE:
            raise JobActionError(f"job {job_id} is {job.state.value}; a video is built from a finished job")
        return job

    def request_video(self, job_id: str, video: dict) -> Job:
        """Ask for a finished job's video (again) with these settings (wire form, checked by the caller)."""
        job = self.check_video(job_id)
        job.video = video
        move_video(job, VideoState.NONE)
        self._video_watch.add(job.id)
        self.store.save_job(job, at_once=True)
        return job

    def video_started(self, job: Job) -> None:
        move_video(job, VideoState.BUILDING)
        self.store.save_job(job)

    def video_ended(self, job: Job, state: VideoState, error: str = "", path: str = "") -> None:
        """A video build ended: built (with its path), failed (with why), or stopped (NONE: built again later).
        A job deleted meanwhile is left alone."""
        if self.jobs.get(job.id) is not job:
            return
        move_video(job, state, error)
        if path:
            job.video_path = path
        self.store.save_job(job)

    # --- split frames ---------------------------------------------------------------------

    def stitch_done(self, job_id: str) -> None:
        """The server stitched a split job's tiles into its frame (on disk now): the job is done."""
        job = self.jobs.get(job_id)
        if job is None or job.state.finished:
            return
        job.stitched = True
        if job.state is JobState.RENDERING:
            log.info("job %s: done, frame %d stitched from %d tiles", job.id, job.settings.frames[0], len(job.frames))
            self._finish(job, JobState.DONE)

    def stitch_failed(self, job_id: str, error: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state is JobState.RENDERING:
            self.fail_job(job, f"the tiles could not be stitched into frame {job.settings.frames[0]}: {error}")

    def client_speeds(self) -> dict[str, float]:
        """Each client's speed relative to the others (1.0: typical); see tiling.client_speeds."""
        return client_speeds(self.jobs.values())

    def auto_tiles(self, job: Job) -> int:
        """How many tiles a split frame gets when it asked for "auto".

        n clients can take the job (connected, ready, the right device, not shut out of it); unmeasured
        ones count at the median measured speed. K = round(sum(speed) / min(speed)), at least n and at
        most 4n: equal clients get a tile each, and a client twice as fast as the slowest counts twice,
        so through ordinary leasing it takes more tiles while the slow one renders its one."""
        excluded = job.excluded_clients(MAX_CLIENT_JOB_FAILURES)
        names = [c.name for c in self.clients.values()
                 if c.connected and c.ready and _fits(job, c) and c.name not in excluded]
        return tile_count(names, self.client_speeds())

    def frame_failed(self, lease_id: int, number: int, client_id: str, error: str, render_log: str = "") -> None:
        lease = self._own_lease(lease_id, client_id)
        client = self.clients.get(client_id)
        if client is not None:
            client.failures += 1
        if lease is None or number not in lease.frames:
            return
        job = self.jobs[lease.job_id]
        frame = job.frames[number]
        if frame.state is not FrameState.LEASED or frame.lease_id != lease_id:
            return  # the frame was taken back and handed on (or done) meanwhile: not this lease's to fail
        name = client.name if client else client_id
        self.counts.frame_failures += 1
        frame.failures += 1
        frame.failed_on.add(name)
        job.index.failed.add(number)
        frame.error = error
        frame.log = render_log
        self._hand_back(job, frame)
        job.client_failures[name] = job.client_failures.get(name, 0) + 1
        self.store.save_frame(job, frame)
        log.warning("job %s: frame %d failed on %s (%d/%d): %s", job.id, number, name, frame.failures,
                    MAX_FRAME_ATTEMPTS, printable(error))
        if job.client_failures[name] == MAX_CLIENT_JOB_FAILURES:
            log.warning("job %s: client %s failed %d frames; it gets no more of this job", job.id, name,
                        MAX_CLIENT_JOB_FAILURES)
            self.store.save_job(job)
        if frame.failures >= MAX_FRAME_ATTEMPTS:
            what = f"tile {number} of frame {job.settings.frames[0]}" if job.settings.tiles else f"frame {number}"
            self.fail_job(job, f"{what} failed {frame.failures} times: {error}")

    def lease_done(self, lease_id: int, client_id: str) -> None:
        lease = self._own_lease(lease_id, client_id)
        if lease is not None:
            self._drop_lease(lease)

    def hand_back(self, lease_id: int, client_id: str, frames: list[int]) -> None:
        """The client is stopping and gives back these frames of its lease unrendered: they wait for the next
        client at once, and nobody is blamed (see disconnect_client)."""
        lease = self._own_lease(lease_id, client_id)
        job = self.jobs.get(lease.job_id) if lease is not None else None
        if lease is None or job is None:
            return
        given = set(frames) & set(lease.frames)
        lease.frames = [n for n in lease.frames if n not in given]
        for number in sorted(given):
            frame = job.frames.get(number)
            if frame is not None and frame.spare_lease == lease.id:
                frame.spare_lease = None
            elif frame is not None and frame.state is FrameState.LEASED and frame.lease_id == lease.id:
                self._hand_back(job, frame)
                self.counts.frames_handed_back += 1
        if given:
            log.info("job %s: frames %s handed back by client %s (stopping)", job.id,
                     ",".join(map(str, sorted(given))), self.clients[client_id].name)

    def client_reported(self, client_id: str, state: str, lease_id: int | None, frame: int | None,
                        device: str = "", progress: int | None = None) -> bool:
        """Take in a client's heartbeat; True if something the scheduler or a viewer cares about changed."""
        client = self.clients.get(client_id)
        if client is None:
            return False
        if device and device != client.device:
            log.warning("client %s now renders on %s (was %s)", client.name, device, client.device)
            client.device = device
            client.ready = False  # counts as a change below
            self._clients_changed()
        if lease_id is None or lease_id != client.lease_id:
            frame = None  # a report about other work than the lease we gave it
        busy = state in ("busy", "draining")  # (a stopping client takes no new work)
        changed = not client.ready or client.busy != busy or client.frame != frame
        if not client.ready or client.busy != busy:
            # It may be idle now, and which Blender a job's idle clients run (see next_work) may have changed.
            self._hints.add(client.id)
            self._widely_changed()
        client.ready = True
        client.busy = busy
        client.draining = state == "draining"
        if client.frame != frame:
            client.frame = frame
            client.frame_started = client.progress_at = self.clock() if frame is not None else None
            client.progress = progress if frame is not None else None
        elif frame is not None and progress is not None and progress != client.progress:
            client.progress, client.progress_at = progress, self.clock()  # signs of life: not seen by anyone
        return changed

    def hung_clients(self, min_s: float = 0.0) -> list[tuple[str, float, float]]:
        """Clients whose frame showed no progress for longer than its job's hang limit (and at least min_s):
        (client id, seconds without progress, limit). Never for being slower than the job's other frames: a
        frame that keeps reporting samples may take as long as it takes. A client that reports no progress
        (an older one) has its frame's start as its last sign of life."""
        now = self.clock()
        hung = []
        for client in self.clients.values():
            if not client.connected or client.frame is None or client.lease_id is None:
                continue
            lease = self.leases.get(client.lease_id)
            job = self.jobs.get(lease.job_id) if lease else None
            frame = job.frames.get(client.frame) if job else None
            if frame is None or frame.state is not FrameState.LEASED or frame.lease_id != client.lease_id:
                continue
            limit = max(min_s, job.request.hang_limit_s)
            silent = now - (client.progress_at if client.progress_at is not None else now)
            if silent > limit:
                hung.append((client.id, silent, limit))
        return hung

    def frame_hung(self, client_id: str, silent_s: float, limit_s: float) -> None:
        """The client's frame made no progress for silent_s: a failure of that frame (its job fails after
        MAX_FRAME_ATTEMPTS), taken back from the client, which stops its render; the client stays."""
        client = self.clients.get(client_id)
        if client is None or client.lease_id is None or client.frame is None:
            return
        lease_id, number = client.lease_id, client.frame
        lease = self.leases.get(lease_id)
        job = self.jobs.get(lease.job_id) if lease is not None else None
        what = "tile" if job is not None and job.settings is not None and job.settings.tiles else "frame"
        log.warning("client %s: %s %d showed no progress for %.0f s (limit %.0f s); taking it back", client.name,
                    what, number, silent_s, limit_s)
        self._revocations.append(Revocation(client_id, lease_id, (number,)))
        self.frame_failed(lease_id, number, client_id,
                          f"the render showed no progress for {silent_s:.0f} s (the job's limit is {limit_s:.0f} s)")
        client.frame = client.frame_started = client.progress = client.progress_at = None
