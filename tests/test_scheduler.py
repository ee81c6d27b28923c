"""The pure scheduler (server_addon.core.scheduler.Farm), driven by hand with an injectable clock."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError
from protocol.settings import JobRequest, SceneInfo, SettingsError
from server_addon.core.jobs import FrameState, Job, JobState, LeaseKind, Revocation
from server_addon.core.scheduler import MAX_FRAME_ATTEMPTS, Farm, NotLeaseHolder

pytestmark = pytest.mark.unit

CHUNK_2 = JobRequest(chunk=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scene(**overrides) -> SceneInfo:
    values = dict(scene="Scene", engine="CYCLES", frame_start=1, frame_end=8, frame_step=1, fps=24.0,
                  resolution_x=64, resolution_y=36, percentage=100, file_format="PNG", has_camera=True)
    values.update(overrides)
    return SceneInfo(**values)


def farm_with_job(*clients: str, request: JobRequest = CHUNK_2) -> tuple[Farm, Job, Clock]:
    clock = Clock()
    farm = Farm(clock)
    job = Job(id="job-1", name="shot.blend", blend_sha256="0" * 64, blend_size=10, request=request,
              created=0.0)
    farm.add_job(job)
    for client in clients:
        farm.connect_client(client, f"name-{client}", "host")
        farm.client_reported(client, "idle", None, None)  # the first heartbeat makes a client ready
    return farm, job, clock


def rendering(*clients: str, request: JobRequest = CHUNK_2, **scene_overrides):
    """A farm whose job has been probed (by the first client) and is rendering."""
    farm, job, clock = farm_with_job(*clients, request=request)
    probe = farm.next_work(clients[0])
    assert probe is not None and probe.kind is LeaseKind.PROBE
    assert farm.probe_succeeded(probe.id, probe.client_id, scene(**scene_overrides)) is job
    assert job.state is JobState.RENDERING
    return farm, job, clock


def test_a_new_job_probes_on_the_first_idle_client():
    farm, job, clock = farm_with_job("a", "b")
    clock.now = 1234.5
    assert job.state is JobState.PROBING
    lease = farm.next_work("a")
    assert lease is not None
    assert (lease.kind, lease.job_id, lease.client_id, lease.frames, lease.started) == \
        (LeaseKind.PROBE, "job-1", "a", [], 1234.5)
    assert farm.next_work("b") is None  # one probe per job at a time
    assert farm.idle_clients() == ["b"]


def test_frames_come_from_the_scene_range():
    farm, job, _ = rendering("a", frame_start=3, frame_end=7, percentage=50)
    assert sorted(job.frames) == [3, 4, 5, 6, 7]
    assert all(f.state is FrameState.PENDING for f in job.frames.values())
    assert (job.settings.resolution_x, job.settings.resolution_y) == (32, 18)
    assert job.view()["frame_range"] == [3, 7]


def test_frames_come_from_the_request_when_given():
    request = JobRequest(frame_start=1, frame_end=10, frame_step=3, chunk=2)
    farm, job, _ = rendering("a", request=request, frame_start=1, frame_end=250)
    assert list(job.frames) == [1, 4, 7, 10]
    assert job.settings.frames == (1, 4, 7, 10)


def test_clients_get_disjoint_chunks_of_the_configured_size():
    farm, job, _ = rendering("a", "b", "c", "d", request=JobRequest(chunk=3), frame_end=8)
    leases = [farm.next_work(c) for c in ("a", "b", "c")]
    assert [lease.frames for lease in leases] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert farm.next_work("d") is None
    assert all(f.state is FrameState.LEASED for f in job.frames.values())
    assert farm.next_work("a") is None  # a busy client gets nothing more


def test_disconnect_returns_leased_frames_to_the_next_idle_client():
    farm, job, _ = rendering("a", "b", frame_end=6)
    lease_a = farm.next_work("a")
    lease_b = farm.next_work("b")
    assert (lease_a.frames, lease_b.frames) == ([1, 2], [3, 4])
    taken = farm.disconnect_client("a")
    assert [lease.id for lease in taken] == [lease_a.id]
    assert job.frames[1].state is FrameState.PENDING and job.frames[2].state is FrameState.PENDING
    assert job.frames[3].state is FrameState.LEASED
    assert "a" not in farm.idle_clients()
    farm.connect_client("c", "name-c", "host")
    assert farm.next_work("c").frames == [1, 2]


def test_disconnect_during_a_probe_lets_another_client_probe():
    farm, job, _ = farm_with_job("a", "b")
    farm.next_work("a")
    assert farm.next_work("b") is None
    farm.disconnect_client("a")
    lease = farm.next_work("b")
    assert lease is not None and lease.kind is LeaseKind.PROBE


def test_each_frame_is_stored_exactly_once_and_the_job_finishes_with_the_last():
    farm, job, clock = rendering("a", request=JobRequest(chunk=3), frame_end=3)
    farm.next_work("a")
    assert farm.frame_stored("job-1", 1, "a", render_s=1.5) is True
    assert farm.frame_stored("job-1", 1, "a") is False
    assert job.state is JobState.RENDERING and job.frames_done == 1
    assert farm.frame_stored("job-1", 2, "a") is True
    assert job.state is JobState.RENDERING
    clock.now = 2000.0
    assert farm.frame_stored("job-1", 3, "a") is True
    assert job.state is JobState.DONE and job.finished_at is not None
    assert farm.frame_stored("job-1", 3, "a") is False
    assert farm.clients["a"].frames_rendered == 3
    assert job.frames[1].render_s == 1.5 and job.frames[1].rendered_by == "name-a"


def test_a_frame_taken_back_and_handed_on_is_stored_once_from_whichever_holder_sends_it_first():
    farm, job, _ = rendering("a", "b", frame_end=4)
    first = farm.next_work("a")  # frames 1-2
    farm.pause_job("job-1")  # taken back; client a may still finish frame 1, which it was asked for
    farm.resume_job("job-1")
    farm.drain_revocations()
    farm.client_reported("a", "busy", None, None)  # a is still on it; b gets the frames
    second = farm.next_work("b")
    assert second.frames == [1, 2]
    assert farm.frame_stored("job-1", 1, "a", lease_id=first.id) is True
    assert farm.drain_revocations() == [Revocation("b", second.id, (1,))]
    assert farm.frame_stored("job-1", 1, "b", lease_id=second.id) is False  # stored once
    assert job.frames[1].rendered_by == "name-a"


def test_results_count_only_from_the_client_holding_the_lease():
    """A stranger with the secret (or any peer on a farm without one) changes nothing by naming another
    client's lease or frames: each such report is refused, and the holder's work goes on."""
    farm, job, _ = rendering("a", "b", "x", frame_end=4)
    lease = farm.next_work("a")
    farm.next_work("b")  # frames 3-4
    for forge in (lambda: farm.lease_done(lease.id, "x"),
                  lambda: farm.frame_failed(lease.id, 1, "x", "forged"),
                  lambda: farm.frame_stored("job-1", 1, "x", 0.1, lease.id),
                  lambda: farm.frame_stored("job-1", 1, "x", 0.1),
                  lambda: farm.frame_stored("job-1", 1, "b", 0.1, farm.clients["b"].lease_id),
                  lambda: farm.wants_frame("job-1", 2, "x", lease.id)):
        with pytest.raises(NotLeaseHolder):
            forge()
    assert farm.leases[lease.id].client_id == "a" and farm.clients["a"].lease_id == lease.id
    assert [(f.state, f.lease_id, f.failures) for f in (job.frames[1], job.frames[2])] == \
        [(FrameState.LEASED, lease.id, 0)] * 2
    assert farm.clients["x"].failures == 0 and farm.drain_revocations() == []
    assert farm.frame_stored("job-1", 1, "a", 0.1, lease.id) is True
    farm.frame_failed(lease.id, 2, "a", "out of memory")
    assert job.frames[2].failures == 1 and job.frames[2].state is FrameState.PENDING
    farm.lease_done(lease.id, "a")
    assert lease.id not in farm.leases


def test_a_probe_result_counts_only_from_the_client_probing():
    farm, job, _ = farm_with_job("a", "x")
    probe = farm.next_work("a")
    for _ in range(5):  # a spray of failed opens from a client that holds no probe
        with pytest.raises(NotLeaseHolder):
            farm.probe_failed(probe.id, "x", "forged: cannot open")
    with pytest.raises(NotLeaseHolder):
        farm.probe_succeeded(probe.id, "x", scene(frame_end=1))
    assert job.state is JobState.PROBING and job.probe_failures == 0 and job.probe_lease == probe.id
    assert farm.probe_succeeded(probe.id, "a", scene()) is job
    assert job.state is JobState.RENDERING and len(job.frames) == 8
    render = farm.next_work("a")
    assert farm.probe_failed(render.id, "a", "not a probe") is None  # a probe result only for a probe lease
    assert render.id in farm.leases


def test_a_report_on_a_lease_that_ended_changes_nothing():
    farm, job, _ = rendering("a", "b", frame_end=4)
    lease = farm.next_work("a")
    farm.disconnect_client("a")  # its lease is gone; another client gets the frames
    second = farm.next_work("b")
    farm.lease_done(lease.id, "x")  # (an ended lease is nobody's now: nothing to refuse, nothing changes)
    farm.frame_failed(lease.id, 1, "x", "late")
    assert second.id in farm.leases and job.frames[1].lease_id == second.id and job.frames[1].failures == 0


def fail_once(farm: Farm, client: str, error: str) -> None:
    lease = farm.next_work(client)
    assert lease is not None and lease.frames == [1]
    farm.frame_failed(lease.id, 1, client, error, "render log")
    farm.lease_done(lease.id, lease.client_id)


def test_a_failed_frame_goes_to_a_different_client():
    farm, job, _ = rendering("a", "b", request=JobRequest(chunk=1), frame_end=1)
    lease = farm.next_work("a")
    assert farm.next_work("b") is None
    farm.frame_failed(lease.id, 1, "a", "out of memory")
    farm.lease_done(lease.id, lease.client_id)
    assert job.frames[1].state is FrameState.PENDING and job.frames[1].failures == 1
    assert farm.next_work("a") is None
    assert farm.next_work("b").frames == [1]


def test_a_failed_frame_returns_to_the_only_client():
    farm, job, _ = rendering("a", request=JobRequest(chunk=1), frame_end=1)
    fail_once(farm, "a", "out of memory")
    assert job.state is JobState.RENDERING
    assert farm.next_work("a").frames == [1]


def test_too_many_failures_fail_the_job_with_blenders_error():
    farm, job, clock = rendering("a", request=JobRequest(chunk=1), frame_end=2)
    blender_error = "Error: Cannot render, no camera 'Cam.001'"
    for attempt in range(1, MAX_FRAME_ATTEMPTS):
        fail_once(farm, "a", blender_error)
        assert job.state is JobState.RENDERING, attempt
    clock.now = 3000.0
    fail_once(farm, "a", blender_error)
    assert job.state is JobState.FAILED and job.finished_at is not None
    assert blender_error in job.error and "frame 1" in job.error
    assert job.frames[1].log == "render log"
    assert farm.next_work("a") is None
    assert farm.clients["a"].failures == MAX_FRAME_ATTEMPTS


def test_cancel_revokes_every_lease():
    farm, job, _ = rendering("a", "b", frame_end=8)
    lease_a, lease_b = farm.next_work("a"), farm.next_work("b")
    assert farm.drain_revocations() == []
    assert farm.cancel_job("job-1") is job
    assert job.state is JobState.CANCELLED
    assert set(farm.drain_revocations()) == {Revocation("a", lease_a.id, ()), Revocation("b", lease_b.id, ())}
    assert farm.drain_revocations() == []
    assert sorted(farm.idle_clients()) == ["a", "b"]
    assert farm.next_work("a") is None
    assert farm.frame_stored("job-1", 1, "a") is False


def test_a_file_no_client_can_open_fails_the_job_once_each_client_tried():
    farm, job, _ = farm_with_job("a", "b")
    first = farm.next_work("a")
    assert first is not None and first.kind is LeaseKind.PROBE
    farm.probe_failed(first.id, first.client_id, "file is not a .blend (bad magic)")
    assert job.state is JobState.PROBING
    assert farm.next_work("a") is None, "a client that could not open the file is not asked again"
    second = farm.next_work("b")
    assert second is not None and second.kind is LeaseKind.PROBE
    farm.probe_failed(second.id, second.client_id, "file is not a .blend (bad magic)")
    assert job.state is JobState.FAILED
    assert "bad magic" in job.error and "name-a" in job.error and "name-b" in job.error
    assert farm.next_work("a") is None and farm.next_work("b") is None


def test_a_scene_without_camera_fails_the_job():
    farm, job, _ = farm_with_job("a")
    lease = farm.next_work("a")
    farm.probe_succeeded(lease.id, lease.client_id, scene(scene="Empty", has_camera=False))
    assert job.state is JobState.FAILED
    assert "camera" in job.error and "Empty" in job.error
    assert job.frames == {}
    assert farm.next_work("a") is None


def test_a_request_that_does_not_fit_the_scene_fails_the_job():
    farm, job, _ = farm_with_job("a", request=JobRequest(frame_start=50))
    lease = farm.next_work("a")
    farm.probe_succeeded(lease.id, lease.client_id, scene(frame_start=1, frame_end=10))
    assert job.state is JobState.FAILED and "50-10" in job.error


def test_a_probe_with_a_negative_step_does_not_leave_a_job_without_frames():
    try:
        info = SceneInfo.from_wire(scene(frame_step=-1).to_wire())
    except ProtocolError:
        return  # refused at the door: acceptable
    farm, job, _ = farm_with_job("a")
    lease = farm.next_work("a")
    farm.probe_succeeded(lease.id, lease.client_id, info)
    assert job.state is JobState.FAILED or job.frames


@pytest.mark.parametrize("raw, fragment", [
    ({"frame_start": 10, "frame_end": 1}, "ends before it starts"),
    ({"chunk": 0}, "chunk"),
    ({"chunk": -3}, "chunk"),
    ({"file_format": "FFMPEG"}, "format"),
    ({"frame_step": 0}, "frame_step"),
    ({"frame_start": True}, "frame_start"),
    ({"samples": "many"}, "samples"),
    ({"percentage": 5000}, "percentage"),
])
def test_invalid_job_requests_are_refused(raw, fragment):
    with pytest.raises(SettingsError, match=fragment):
        JobRequest.from_wire(raw)


def test_a_valid_job_request_round_trips():
    request = JobRequest(frame_start=1, frame_end=10, frame_step=3, chunk=5, file_format="OPEN_EXR",
                         samples=16, percentage=50)
    assert JobRequest.from_wire(request.to_wire()) == request
    assert JobRequest.from_wire({}) == JobRequest()


def test_a_client_is_given_work_only_once_ready_and_not_busy():
    farm, _, _ = farm_with_job()
    farm.connect_client("a", "name-a", "host")
    assert farm.idle_clients() == [], "no work before the client's first heartbeat"
    assert farm.client_reported("a", "busy", None, None) is True
    assert farm.idle_clients() == [], "a client finishing work from an earlier connection is busy"
    assert farm.client_reported("a", "idle", None, None) is True
    assert farm.idle_clients() == ["a"]
    assert farm.client_reported("a", "idle", None, None) is False


def test_a_report_about_another_lease_does_not_start_the_hang_clock():
    farm, job, clock = rendering("a")
    lease = farm.next_work("a")
    assert farm.client_reported("a", "rendering", lease.id + 99, lease.frames[0]) is False
    assert farm.clients["a"].frame is None and farm.clients["a"].frame_started is None
    clock.now += 5
    assert farm.client_reported("a", "rendering", lease.id, lease.frames[0]) is True
    assert farm.clients["a"].frame_started == clock.now


def test_a_frame_far_slower_than_the_others_is_never_hung_while_it_progresses():
    # Changed on purpose (issue 11): a frame was hung at 10 times the job's median frame time; now only a
    # render that shows no progress for the job's hang limit is, however slow it is.
    farm, job, clock = rendering("a", "b", request=JobRequest(chunk=2, hang_s=30))
    for _ in range(2):  # four frames at 0.2 s each
        lease = farm.next_work("a")
        for n in lease.frames:
            farm.client_reported("a", "rendering", lease.id, n, progress=1)
            clock.now += 0.2
            farm.frame_stored(job.id, n, "a", render_s=0.2)
        farm.lease_done(lease.id, lease.client_id)
    lease = farm.next_work("b")
    farm.client_reported("b", "rendering", lease.id, lease.frames[0], progress=0)
    for sample in range(1, 20):  # 190 s, a sign of life every 10 s
        clock.now += 10.0
        farm.client_reported("b", "rendering", lease.id, lease.frames[0], progress=sample)
        assert farm.hung_clients() == []
    clock.now += 29.0
    assert farm.hung_clients() == []
    clock.now += 2.0
    assert [(c, round(silent), limit) for c, silent, limit in farm.hung_clients()] == [("b", 31, 30.0)]


def test_a_hung_frame_fails_and_is_taken_back_from_its_client_which_stays():
    farm, job, clock = rendering("a", request=JobRequest(chunk=2, hang_s=5))
    lease = farm.next_work("a")
    farm.client_reported("a", "rendering", lease.id, lease.frames[0])  # (a client that reports no progress)
    clock.now += 4.0
    assert farm.hung_clients(min_s=6.0) == [], "never sooner than the floor (the heartbeat timeout)"
    clock.now += 3.0
    [(client, silent, limit)] = farm.hung_clients(min_s=6.0)
    farm.frame_hung(client, silent, limit)
    frame = job.frames[lease.frames[0]]
    assert frame.failures == 1 and frame.failed_on == {"name-a"} and frame.state is FrameState.PENDING
    assert frame.error == "the render showed no progress for 7 s (the job's limit is 6 s)"
    assert farm.drain_revocations() == [Revocation("a", lease.id, (lease.frames[0],))]
    assert farm.clients["a"].connected and farm.hung_clients(min_s=6.0) == []
    farm.client_reported("a", "rendering", lease.id, lease.frames[0])  # its heartbeat, before the revocation came
    clock.now += 10.0
    assert farm.hung_clients(min_s=6.0) == [], "a frame taken back is not hung twice"


def test_a_lost_client_counts_no_failure_of_its_frame_or_itself():
    # Changed on purpose (issue 11): the frame a lost client rendered counted as a failure of it on that client.
    farm, job, clock = rendering("a", "b")
    lease = farm.next_work("a")
    farm.client_reported("a", "rendering", lease.id, lease.frames[0])
    farm.disconnect_client("a")
    frame = job.frames[lease.frames[0]]
    assert frame.failures == 0 and not frame.failed_on and frame.state is FrameState.PENDING
    assert farm.clients["a"].failures == 0 and not job.client_failures


def test_a_client_that_fails_several_frames_of_a_job_gets_no_more_of_it():
    farm, job, _ = rendering("a", "b", request=JobRequest(chunk=1))
    for _ in range(3):
        lease = farm.next_work("a")
        farm.frame_failed(lease.id, lease.frames[0], "a", "boom")
        farm.lease_done(lease.id, lease.client_id)
    assert job.excluded_clients() == {"name-a"}
    assert farm.next_work("a") is None
    assert farm.next_work("b") is not None
    view = {c["id"]: c for c in farm.client_views()}
    assert view["a"]["excluded_from"] == [job.id] and view["b"]["excluded_from"] == []


def test_a_frame_failed_on_a_client_is_not_kept_from_it_by_an_excluded_one():
    farm, job, _ = rendering("a", "b", request=JobRequest(chunk=1))
    for _ in range(3):  # b fails three frames: it gets no more of this job
        lease = farm.next_work("b")
        farm.frame_failed(lease.id, lease.frames[0], "b", "boom")
        farm.lease_done(lease.id, lease.client_id)
    lease = farm.next_work("a")
    farm.frame_failed(lease.id, lease.frames[0], "a", "flaky")
    farm.lease_done(lease.id, lease.client_id)
    failed_frame = lease.frames[0]
    pending = [n for n, f in job.frames.items() if f.state is FrameState.PENDING]
    # a keeps working through the job, and finally gets its failed frame back: b cannot take it.
    taken = []
    while (lease := farm.next_work("a")) is not None:
        taken += lease.frames
        for n in lease.frames:
            farm.frame_stored(job.id, n, "a", 0.1, lease.id)
        farm.lease_done(lease.id, lease.client_id)
    assert sorted(taken) == sorted(pending) and failed_frame in taken
    assert job.state is JobState.DONE


def test_a_gpu_job_frame_is_not_kept_from_the_gpu_client_by_a_cpu_one():
    farm, job, _ = farm_with_job(request=JobRequest(chunk=1, device="GPU"))
    farm.connect_client("gpu", "name-gpu", "host", device="OPTIX")
    farm.connect_client("cpu", "name-cpu", "host", device="CPU")
    for client in ("gpu", "cpu"):
        farm.client_reported(client, "idle", None, None)
    probe = farm.next_work("cpu")
    farm.probe_succeeded(probe.id, probe.client_id, scene(frame_start=1, frame_end=2))
    lease = farm.next_work("gpu")
    farm.frame_failed(lease.id, lease.frames[0], "gpu", "transient")
    farm.lease_done(lease.id, lease.client_id)
    assert farm.next_work("cpu") is None, "a GPU-only job never renders on a CPU"
    got = farm.next_work("gpu")
    assert got is not None and got.frames == [1], "the only GPU client gets its failed frame back"


def test_a_failure_from_a_lease_that_no_longer_holds_the_frame_is_ignored():
    farm, job, _ = rendering("a", "b", request=JobRequest(chunk=1))
    first = farm.next_work("a")
    number = first.frames[0]
    farm.frame_failed(first.id, number, "a", "boom")
    second = farm.next_work("b")
    assert second.frames == [number]
    farm.frame_failed(first.id, number, "a", "late duplicate report")
    assert job.frames[number].state is FrameState.LEASED and job.frames[number].lease_id == second.id
    assert job.frames[number].failures == 1


def test_a_stopping_client_hands_back_frames_without_blame_and_takes_no_more():
    farm, job, _ = rendering("a", "b", request=JobRequest(chunk=4))
    lease = farm.next_work("a")
    assert lease is not None and lease.frames == [1, 2, 3, 4]
    farm.client_reported("a", "draining", lease.id, 2)  # stopping: it renders frame 2 and takes nothing new
    farm.hand_back(lease.id, "a", [3, 4, 99])  # (a frame the lease never held changes nothing)
    assert [job.frames[n].state for n in (1, 2, 3, 4)] == [FrameState.LEASED, FrameState.LEASED,
                                                            FrameState.PENDING, FrameState.PENDING]
    assert lease.frames == [1, 2] and farm.counts.frames_handed_back == 2
    assert all(f.failures == 0 for f in job.frames.values()) and farm.counts.frame_failures == 0
    assert farm.idle_clients() == ["b"]
    other = farm.next_work("b")
    assert other is not None and other.frames[:2] == [3, 4]
    farm.hand_back(lease.id, "a", [3])  # handed on already: not this lease's any more
    assert job.frames[3].lease_id == other.id and farm.counts.frames_handed_back == 2
    with pytest.raises(NotLeaseHolder):
        farm.hand_back(other.id, "a", [3])
