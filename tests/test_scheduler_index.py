"""The scheduler's indexes (pending frames, counts, render times, failed frames, cached job order and capable
clients, the clients decide() looks at) agree with a brute-force scan, over random sequences of events."""

from __future__ import annotations

import random

import pytest

from protocol.settings import JobRequest, SceneInfo
from server_addon.core.effects import Assign, Revocation
from server_addon.core.jobs import FrameState, Job, JobState, LeaseKind
from server_addon.core.scheduler import Farm, JobActionError, NotLeaseHolder
from server_addon.core.states import IllegalTransition

pytestmark = pytest.mark.unit

BLENDERS = ("5.0.1", "5.0.1", "4.5.15")


def scene(frames: int) -> SceneInfo:
    return SceneInfo(scene="s", engine="CYCLES", frame_start=1, frame_end=frames, frame_step=1, fps=24.0,
                     resolution_x=64, resolution_y=36, percentage=100, file_format="PNG", has_camera=True)


def check_indexes(farm: Farm) -> None:
    for job in farm.jobs.values():
        index = job.index
        frames = job.frames.values()
        assert index.pending == {f.number for f in frames if f.state is FrameState.PENDING}, job.id
        assert index.done == sum(1 for f in frames if f.state is FrameState.DONE)
        assert index.failed == {f.number for f in frames if f.failures}
        times = sorted(f.render_s for f in frames if f.state is FrameState.DONE and f.render_s)
        assert index.times == pytest.approx(times) and index.time_sum == pytest.approx(sum(times))
        if index.pending:
            assert index.pick(1, lambda n: True) == [], "a frame every client must skip is not picked"
    for lease in farm.leases.values():  # a spare copy covers one frame, still its first holder's
        if lease.spare:
            (number,) = lease.frames
            frame = farm.jobs[lease.job_id].frames[number]
            if frame.state is not FrameState.DONE:  # (done: by this copy; its lease ends with its LEASE_DONE)
                assert frame.spare_lease == lease.id and frame.state is FrameState.LEASED
                assert frame.lease_id != lease.id and frame.lease_id in farm.leases
    for job in farm.jobs.values():
        for frame in job.frames.values():
            assert frame.spare_lease is None or farm.leases[frame.spare_lease].spare
    brute = sorted((j for j in farm.jobs.values() if j.state.running), key=lambda j: (-j.priority, j.seq))
    assert list(farm.running_jobs()) == brute


def check_waiting_notes(farm: Farm) -> None:
    """The waiting notes, kept up to date job by job, are what noting every job afresh writes."""
    kept = {job.id: job.waiting for job in farm.jobs.values()}
    fresh = Farm(clock=farm.clock)
    fresh.jobs, fresh.clients, fresh.leases = farm.jobs, farm.clients, farm.leases
    fresh.reindex()
    fresh.note_waiting()
    assert {job.id: job.waiting for job in farm.jobs.values()} == kept


def check_nobody_left_idle(farm: Farm, effects: list) -> None:
    """After decide(), no idle client could still be given work: a scheduler with its caches dropped (built
    again from a scan) finds none either."""
    given = {e.lease.client_id for e in effects if isinstance(e, Assign)}
    fresh = Farm(clock=farm.clock)
    fresh.jobs, fresh.clients, fresh.leases = farm.jobs, farm.clients, farm.leases
    fresh.reindex()
    for client in farm.clients.values():
        if client.id in given or not (client.connected and client.ready and not client.busy):
            continue
        if client.lease_id is None:
            lease = fresh.next_work(client.id) or next(iter(fresh.spares(only=client.id)), None)
            assert lease is None, f"decide() left {client.id} idle though it could take {lease}"


@pytest.mark.parametrize("seed", range(40))
def test_indexes_agree_with_a_scan_over_random_events(seed: int) -> None:
    rng = random.Random(seed)
    now = [0.0]
    farm = Farm(clock=lambda: now[0])
    clients: list[str] = []
    jobs = 0
    for step in range(300):
        now[0] += rng.choice((0.0, 0.5, 3.0))  # time passes: holders fall behind, tails get spare copies
        roll = rng.random()
        try:
            if roll < 0.08 or not clients:
                client_id = f"c{len(clients)}"
                farm.connect_client(client_id, f"n{rng.randrange(6)}", "h", blender=rng.choice(BLENDERS),
                                    device=rng.choice(("CPU", "CPU", "OPTIX")), allow_scripts=rng.random() < 0.5)
                clients.append(client_id)
                farm.client_reported(client_id, "idle", None, None)
            elif roll < 0.12:
                farm.disconnect_client(rng.choice(clients))
            elif roll < 0.18 and jobs < 6:
                jobs += 1
                request = JobRequest(chunk=rng.choice((1, 2, 3)), device=rng.choice((None, None, "GPU")),
                                     blender=rng.choice((None, None, "5.0", "4.5.15", "4.2")),
                                     needs_scripts=rng.random() < 0.2)
                farm.add_job(Job(id=f"j{jobs}", name="j.blend", blend_sha256="ab" * 32, blend_size=1,
                                 request=request, created=0.0, priority=rng.randrange(3)))
            elif roll < 0.22 and farm.jobs:
                job = rng.choice(list(farm.jobs.values()))
                rng.choice((farm.pause_job, farm.resume_job, farm.cancel_job))(job.id)
            elif roll < 0.25 and farm.jobs:
                farm.set_priority(rng.choice(list(farm.jobs)), rng.randrange(-2, 3))
            elif roll < 0.3:
                client_id = rng.choice(clients)
                farm.client_reported(client_id, rng.choice(("idle", "busy", "idle")), None, None)
            else:
                lease = rng.choice(list(farm.leases.values())) if farm.leases else None
                if lease is not None:
                    if lease.kind is LeaseKind.PROBE:
                        if rng.random() < 0.8:
                            farm.probe_succeeded(lease.id, lease.client_id, scene(rng.randrange(1, 12)))
                        else:
                            farm.probe_failed(lease.id, lease.client_id, "cannot open")
                    else:
                        number = rng.choice(lease.frames)
                        what = rng.random()
                        if what < 0.6:
                            farm.client_reported(lease.client_id, "rendering", lease.id, number)
                            farm.frame_stored(lease.job_id, number, lease.client_id, rng.choice((0.5, 1.0, 2.5)),
                                              lease.id)
                        elif what < 0.8:
                            farm.frame_failed(lease.id, number, lease.client_id, "boom")
                        else:
                            farm.lease_done(lease.id, lease.client_id)
        except (JobActionError, NotLeaseHolder):
            pass  # an action that does not apply to the job's state: refused, nothing changed
        except IllegalTransition as exc:  # pragma: no cover - the state machine found a bug
            raise AssertionError(f"step {step}: {exc}") from None
        farm.tail_waiting()
        effects = farm.decide()
        check_indexes(farm)
        check_waiting_notes(farm)
        check_nobody_left_idle(farm, effects)


def test_a_stale_entry_is_never_picked_twice() -> None:
    farm = Farm()
    farm.add_job(Job(id="j", name="j.blend", blend_sha256="ab" * 32, blend_size=1, request=JobRequest(chunk=4),
                     created=0.0))
    farm.connect_client("a", "a", "h")
    farm.client_reported("a", "idle", None, None)
    probe = farm.next_work("a")
    farm.probe_succeeded(probe.id, "a", scene(6))
    first = farm.next_work("a")
    assert first.frames == [1, 2, 3, 4]
    farm.lease_done(first.id, "a")  # all four back to pending, pushed again
    again = farm.next_work("a")
    assert again.frames == [1, 2, 3, 4], "each frame once, lowest first"
    farm.frame_failed(again.id, 2, "a", "boom")
    farm.lease_done(again.id, "a")
    last = farm.next_work("a")
    assert last.frames == [1, 2, 3, 4] and len(set(last.frames)) == 4
    assert farm.jobs["j"].state is JobState.RENDERING


def tail_farm() -> tuple[Farm, list[float]]:
    """Clients a (slow) and b; a job of 4 frames, one per lease; b renders frames 2-4 (each reported as a second's
    render, 0.4 s apart) while a is still on frame 1."""
    now = [0.0]
    farm = Farm(clock=lambda: now[0])
    farm.add_job(Job(id="j", name="j.blend", blend_sha256="ab" * 32, blend_size=1, request=JobRequest(chunk=1),
                     created=0.0))
    for name in ("a", "b"):
        farm.connect_client(name, name, "h", blender="5.0.1")
        farm.client_reported(name, "idle", None, None)
    (probe,) = [e.lease for e in farm.decide() if isinstance(e, Assign)]
    farm.probe_succeeded(probe.id, probe.client_id, scene(4))
    first = {e.lease.client_id: e.lease for e in farm.decide() if isinstance(e, Assign)}
    assert first["a"].frames == [1] and first["b"].frames == [2]
    for _ in range(3):  # b: frames 2, 3, 4
        now[0] += 0.4
        lease = farm.leases[farm.clients["b"].lease_id]
        farm.frame_stored("j", lease.frames[0], "b", 1.0, lease.id)
        farm.lease_done(lease.id, "b")
        farm.decide()
    return farm, now


def test_a_late_frame_at_the_tail_goes_to_an_idle_client_too_and_the_first_copy_wins() -> None:
    farm, now = tail_farm()
    slow = farm.leases[farm.clients["a"].lease_id]
    assert farm.clients["b"].lease_id is None, "b is idle: frame 1 is not late yet (1.2 s; typical 1 s)"
    now[0] = 12.0  # (typical 1 s: late at 1.5 s, and at least SPARE_MIN_S behind)
    assert farm.tail_waiting()
    (spare,) = [e.lease for e in farm.decide() if isinstance(e, Assign)]
    assert (spare.client_id, spare.frames, spare.spare) == ("b", [1], True)
    assert farm.decide() == [], "one second copy per frame"
    assert farm.frame_stored("j", 1, "b", 1.0, spare.id)
    assert Revocation("a", slow.id, (1,)) in farm.drain_revocations(), "the slower copy is told to stop"
    assert not farm.frame_stored("j", 1, "a", 12.0, slow.id), "and is not stored when it lands anyway"
    job = farm.jobs["j"]
    assert job.state is JobState.DONE and job.frames[1].rendered_by == "b"


def test_when_the_first_holder_lands_first_the_second_copy_is_revoked() -> None:
    farm, now = tail_farm()
    slow = farm.leases[farm.clients["a"].lease_id]
    now[0] = 12.0  # (typical 1 s: late at 1.5 s, and at least SPARE_MIN_S behind)
    farm.tail_waiting()
    (spare,) = [e.lease for e in farm.decide() if isinstance(e, Assign)]
    assert farm.frame_stored("j", 1, "a", 12.0, slow.id)
    assert Revocation("b", spare.id, ()) in farm.drain_revocations()
    assert spare.id not in farm.leases and farm.clients["b"].lease_id is None
    assert farm.jobs["j"].frames[1].rendered_by == "a" and farm.jobs["j"].state is JobState.DONE


def test_a_second_holder_goes_on_when_the_first_is_lost() -> None:
    farm, now = tail_farm()
    now[0] = 12.0  # (typical 1 s: late at 1.5 s, and at least SPARE_MIN_S behind)
    farm.tail_waiting()
    (spare,) = [e.lease for e in farm.decide() if isinstance(e, Assign)]
    farm.disconnect_client("a")
    frame = farm.jobs["j"].frames[1]
    assert (frame.state, frame.lease_id, frame.spare_lease) == (FrameState.LEASED, spare.id, None)
    assert not farm.leases[spare.id].spare
    assert farm.frame_stored("j", 1, "b", 1.0, spare.id) and farm.jobs["j"].state is JobState.DONE
