"""The state machine (core.states), the scheduler's effects (Farm.decide) and the service's unit of work:
every state change in one place, the effects in order, the change feed bumped once per unit."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from protocol.settings import JobRequest, SceneInfo
from server_addon.core.config import ServerConfig
from server_addon.core.effects import Assign, BuildVideo, Revocation, Stitch
from server_addon.core.jobs import FrameRecord, FrameState, Job, JobState, VideoState
from server_addon.core.scheduler import Farm
from server_addon.core.service import FarmService
from server_addon.core.states import (
    FRAME_MOVES,
    JOB_MOVES,
    VIDEO_MOVES,
    IllegalTransition,
    move_frame,
    move_job,
    move_video,
)
from server_addon.core.storage import ContentStore, OutputStore
from server_addon.core.tasks import Tasks

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
SCENE = SceneInfo(scene="s", engine="CYCLES", frame_start=1, frame_end=4, frame_step=1, fps=24.0,
                  resolution_x=64, resolution_y=36, percentage=100, file_format="PNG", has_camera=True)


def job(state: JobState = JobState.PROBING) -> Job:
    return Job(id="j", name="j.blend", blend_sha256="ab" * 32, blend_size=10, request=JobRequest(chunk=2),
               created=0.0, state=state)


def test_every_state_has_its_moves_and_nothing_else_is_allowed() -> None:
    assert set(JOB_MOVES) == set(JobState) and set(FRAME_MOVES) == set(FrameState)
    assert set(VIDEO_MOVES) == set(VideoState)
    for start, allowed in JOB_MOVES.items():
        for to in JobState:
            j = job(start)
            if to in allowed:
                move_job(j, to)
                assert j.state is to
            else:
                with pytest.raises(IllegalTransition, match=f"{start.value} -> {to.value}"):
                    move_job(j, to)
                assert j.state is start, "a refused move changes nothing"
    # Finished jobs never pause; a paused or queued one never goes straight back to QUEUED.
    assert JobState.PAUSED not in JOB_MOVES[JobState.DONE] | JOB_MOVES[JobState.FAILED]
    assert not any(JobState.QUEUED in moves for moves in JOB_MOVES.values())


def test_a_leased_frame_names_its_lease_and_no_other_state_does() -> None:
    j, frame = job(), FrameRecord(1)
    with pytest.raises(IllegalTransition):
        move_frame(j, frame, FrameState.LEASED)
    move_frame(j, frame, FrameState.LEASED, 7)
    assert (frame.state, frame.lease_id) == (FrameState.LEASED, 7)
    with pytest.raises(IllegalTransition):
        move_frame(j, frame, FrameState.DONE, 7)
    move_frame(j, frame, FrameState.DONE)
    assert (frame.state, frame.lease_id) == (FrameState.DONE, None)
    with pytest.raises(IllegalTransition):
        move_frame(j, frame, FrameState.LEASED, 8)  # a stored frame is never leased again


def test_a_video_is_built_once_per_request() -> None:
    j = job(JobState.DONE)
    move_video(j, VideoState.BUILDING)
    move_video(j, VideoState.FAILED, "no ffmpeg")
    assert j.video_error == "no ffmpeg"
    with pytest.raises(IllegalTransition):
        move_video(j, VideoState.BUILDING)  # only a new request (NONE) builds again
    move_video(j, VideoState.NONE)
    assert j.video_error == ""


def assignments(state_changes: list) -> list[tuple]:
    out = []
    for effect in state_changes:
        if isinstance(effect, Assign):
            out.append(("assign", effect.lease.client_id, effect.lease.kind.value, tuple(effect.lease.frames)))
        elif isinstance(effect, Revocation):
            out.append(("revoke", effect.client_id, effect.frames))
        else:
            out.append((type(effect).__name__, effect.job_id))
    return out


def ready_client(farm: Farm, client_id: str) -> None:
    farm.connect_client(client_id, client_id, "host")
    farm.client_reported(client_id, "idle", None, None)


def test_decide_returns_finishing_work_then_revocations_then_assignments() -> None:
    farm = Farm()
    farm.add_job(job())
    ready_client(farm, "a")
    ready_client(farm, "b")
    assert assignments(farm.decide()) == [("assign", "a", "probe", ())]
    probe = farm.clients["a"].lease_id
    farm.probe_succeeded(probe, "a", SCENE)
    first = farm.decide()
    assert assignments(first) == [("assign", "a", "render", (1, 2)), ("assign", "b", "render", (3, 4))]
    assert farm.decide() == [], "nothing is due twice"
    farm.pause_job("j")
    assert sorted(assignments(farm.decide())) == [("revoke", "a", ()), ("revoke", "b", ())]
    # A reachable predicate keeps work from a client whose connection is going.
    farm.resume_job("j")
    assert assignments(farm.decide(lambda client_id: client_id == "b")) == [("assign", "b", "render", (1, 2))]


def test_finished_work_is_due_until_it_lands() -> None:
    farm = Farm()
    done = job(JobState.DONE)
    done.video = {"codec": "h264"}
    farm.restore_job(done)
    assert [e for e in farm.decide() if isinstance(e, BuildVideo | Stitch)] == [BuildVideo("j")]
    farm.video_started(done)
    assert farm.decide() == [BuildVideo("j")], "a build cut off by a stop is due again"
    farm.video_ended(done, VideoState.DONE, path="/out/j.mp4")
    assert farm.decide() == [] and done.video_path == "/out/j.mp4" and done.settled


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def post(self, client_id: str, message) -> bool:  # type: ignore[no-untyped-def]
        self.sent.append((client_id, message.TYPE.value))
        return True

    def reachable(self, client_id: str) -> bool:
        return True


def service(tmp_path: Path) -> tuple[FarmService, Outbox]:
    outbox = Outbox()
    files = ContentStore(tmp_path / "files")
    return FarmService(ServerConfig(output_dir=tmp_path), Farm(), files, OutputStore(tmp_path / "out"),
                       outbox=outbox, tasks=Tasks()), outbox


def test_one_unit_of_work_carries_out_its_effects_and_bumps_the_feed_once(tmp_path: Path) -> None:
    svc, outbox = service(tmp_path)
    seen: list[int] = []
    svc.feed.listen(lambda: seen.append(svc.feed.version))
    with svc.unit() as farm:
        farm.add_job(job())
        with svc.unit() as inner:  # nested units settle with the outermost one
            ready_client(inner, "a")
        assert outbox.sent == [] and seen == []
    assert outbox.sent == [("a", "probe")] and seen == [1]
    # A heartbeat that changes nothing is no unit of work; one that changes something is.
    svc.client_reported("a", "idle", farm.clients["a"].lease_id, None)
    assert seen == [1]
    svc.client_reported("a", "busy", farm.clients["a"].lease_id, None)
    assert seen == [1, 2]


def test_a_unit_of_work_may_not_span_an_await(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)

    async def holds_a_unit(entered: asyncio.Event, release: asyncio.Event) -> None:
        with svc.unit():
            entered.set()
            await release.wait()

    async def scenario() -> None:
        entered, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(holds_a_unit(entered, release))
        await entered.wait()
        with pytest.raises(RuntimeError, match="may not span an await"):
            with svc.unit():
                pass
        release.set()
        await holder
        with svc.unit():  # once the holder is out, units work again
            pass
    asyncio.run(scenario())


def _assignments_to(attribute: str, tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute) and target.attr == attribute
            and not (isinstance(target.value, ast.Name) and target.value.id == "self")]


def test_states_change_in_the_state_machine_and_the_store_is_written_by_the_scheduler_alone() -> None:
    core = REPO / "server_addon" / "core"
    for path in sorted(core.glob("*.py")):
        tree = ast.parse(path.read_text())
        for attribute in ("state", "video_state", "lease_id"):
            lines = _assignments_to(attribute, tree)
            allowed = {"states.py"} | ({"scheduler.py"} if attribute == "lease_id" else set())
            # (the two first states: a job added, a frame read back as it was saved)
            first = {"scheduler.py": 1, "database.py": 1}.get(path.name, 0) if attribute == "state" else 0
            if path.name not in allowed:
                assert len(lines) <= first, f"{path.name} sets .{attribute} on lines {lines}"
        writes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                  and node.attr in ("save_job", "delete_job") and isinstance(node.value, ast.Attribute)
                  and node.value.attr == "store"]
        assert not writes or path.name == "scheduler.py", f"{path.name} writes jobs to the store: {writes}"


def test_a_frame_found_missing_leaves_the_counts() -> None:
    j = job(JobState.RENDERING)
    j.frames = {n: FrameRecord(n, FrameState.DONE, render_s=float(n)) for n in (1, 2, 3)}
    assert (j.frames_done, j.mean_frame_s(), j.typical_frame_s(3)) == (3, 2.0, 2.0)
    move_frame(j, j.frames[3], FrameState.PENDING)  # (on load: its file is gone)
    assert (j.frames_done, j.mean_frame_s(), j.typical_frame_s(1)) == (2, 1.5, 1.5)
    assert j.has_pending and not j.complete
    j.frames = {1: FrameRecord(1)}  # frames replaced (a probe): the index is built for them
    assert (j.frames_done, j.has_pending, j.mean_frame_s()) == (0, True, None)


def test_the_first_move_of_a_job_read_back_counts_once() -> None:
    """A job read back from the database has no index until its first move (recovery's, for a frame found on
    disk): that move is counted once, not twice (once by the index built after it, once as a move)."""
    j = job(JobState.RENDERING)
    j.frames = {n: FrameRecord(n) for n in (1, 2, 3)}
    move_frame(j, j.frames[1], FrameState.DONE)
    assert j.frames_done == 1 and not j.complete
    move_frame(j, j.frames[2], FrameState.DONE)
    assert j.frames_done == 2 and j.index.pending == {3}
