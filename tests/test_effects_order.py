"""The server's order of effects, pinned as it is (a characterisation test, written before the server's core
was rewritten behind one service): what each render client is sent, in what order, and what the farm shows
after each step, through public surfaces only (the protocol, a control connection, the web's event stream).

Each scripted client (tests/scripted_farm.py) does only what the test tells it, so the messages a client
receives come in an order that the server alone decides. Lease ids count from 1 in each server's run; job ids
are shown as the test's labels. The farm is shown as "JOB STATE DONE/TOTAL [pPRIORITY] [fail FRAME by CLIENTS]
| CLIENT STATE[@FRAME]", jobs and clients in the order the status lists them.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import Farm
from scripted_farm import ScriptedClient, Viewer, write_blend
from web_support import start_web_on, stop_web

from protocol import messages as m
from tools.control import Control

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def web_port(farm: Farm) -> Iterator[int]:
    # Every change is pushed at once (no coalescing interval), as the page would see it.
    server = start_web_on(farm, event_interval_s=0.0)
    yield server.port
    stop_web(farm, server)


class Rig:
    """A farm with its web event stream, a control connection, scripted clients, and the steps taken."""

    def __init__(self, farm: Farm, control: Control, viewer: Viewer, root: Path) -> None:
        self.farm = farm
        self.control = control
        self.viewer = viewer
        self.root = root
        self.labels: dict[str, str] = {}
        self.clients: list[ScriptedClient] = []
        #: (step, what the farm showed after it, the state version then)
        self.steps: list[tuple[str, str, int]] = []
        self._blends = itertools.count(1)

    async def submit(self, label: str, frames: int, chunk: int = 2, priority: int = 0) -> str:
        blend = write_blend(self.root / f"{label}.blend", f"{label}-{next(self._blends)}")
        job_id, _ = await self.control.submit(blend, {"frame_start": 1, "frame_end": frames, "chunk": chunk},
                                              priority=priority)
        self.labels[job_id] = label
        return job_id

    async def join(self, name: str) -> ScriptedClient:
        client = await ScriptedClient.join(self.farm.port, name)
        self.clients.append(client)
        return client

    async def action(self, action: str, job_id: str, **args: Any) -> None:
        await self.control.job_action(action, job_id, **args)

    def show(self, status: dict[str, Any]) -> str:
        jobs = []
        for job in status["jobs"]:
            text = f"{self.labels.get(job['id'], '?')} {job['state']} {job['frames_done']}/{job['frames_total']}"
            if job["priority"]:
                text += f" p{job['priority']}"
            for failure in job["failures"]:
                text += f" fail {failure['frame']}x{failure['count']} by {','.join(failure['clients'])}"
            jobs.append(text)
        clients = [f"{c['name']} {c['state']}" + (f"@{c['frame']}" if c["frame"] is not None else "")
                   for c in status["clients"]]
        return f"{', '.join(jobs)} | {', '.join(clients)}".strip()

    async def step(self, what: str, shown: str) -> None:
        """After `what`, the farm shows `shown` (waited for on the event stream, never slept for)."""
        version = await self.viewer.until(self.show, shown, what)
        self.steps.append((what, shown, version))

    def received(self, client: ScriptedClient) -> list[tuple[Any, ...]]:
        """What the client was sent, job ids as labels."""
        return [tuple(self.labels.get(x, x) if isinstance(x, str) else x for x in item) for item in client.received]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.control.close()
        await self.viewer.close()


@pytest_asyncio.fixture
async def rig(farm: Farm, web_port: int, tmp_path: Path) -> AsyncIterator[Rig]:
    viewer = await Viewer.open(web_port)
    control = await Control.connect(farm.address, None, name="test-control")
    rig = Rig(farm, control, viewer, tmp_path)
    try:
        yield rig
    finally:
        await rig.close()


async def probe_and_answer(client: ScriptedClient, frames: int) -> m.Probe:
    probe = await client.expect(m.Probe)
    await client.probe_result(probe, frames)
    return probe


# --- 1. one client, one job ------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_one_client_probes_then_renders_the_chunks_in_order(rig: Rig) -> None:
    job = await rig.submit("J", frames=4, chunk=2)
    await rig.step("the job submitted", "J probing 0/0 |")
    a = await rig.join("A")
    await rig.step("A connected", "J probing 0/0 | A idle")
    await a.report("idle")
    probe = await a.expect(m.Probe)
    await rig.step("A said it is idle", "J probing 0/0 | A probing")
    await a.probe_result(probe, 4)
    first = await a.expect(m.Assign)
    await rig.step("A answered the probe", "J rendering 0/4 | A rendering")
    await a.report("rendering", first.lease_id, job, 1)
    await rig.step("A renders frame 1", "J rendering 0/4 | A rendering@1")
    await a.send_frame(first.lease_id, job, 1)
    await rig.step("A sent frame 1", "J rendering 1/4 | A rendering@1")
    await a.report("rendering", first.lease_id, job, 2)
    await rig.step("A renders frame 2", "J rendering 1/4 | A rendering@2")
    await a.send_frame(first.lease_id, job, 2)
    await rig.step("A sent frame 2", "J rendering 2/4 | A rendering@2")
    await a.lease_done(first.lease_id)
    second = await a.expect(m.Assign)
    await rig.step("A ended its first lease", "J rendering 2/4 | A rendering")
    await a.render(second, 3)
    await rig.step("A sent frame 3", "J rendering 3/4 | A rendering@3")
    await a.render(second, 4)
    # The last frame stored finishes the job, which ends its leases: the holder is told, before its LEASE_DONE.
    await a.expect(m.Revoke)
    await rig.step("A sent frame 4", "J done 4/4 | A idle")
    await a.lease_done(second.lease_id)
    await a.quiet()

    assert rig.received(a) == [("probe", 1, "J"), ("assign", 2, "J", [1, 2]), ("assign", 3, "J", [3, 4]),
                               ("revoke", 3, [])]
    # The state version moves with every change a viewer sees (the event stream carries each one).
    for (before, shown_before, v_before), (after, shown_after, v_after) in itertools.pairwise(rig.steps):
        if shown_after != shown_before:
            assert v_after > v_before, (before, after, rig.steps)
    assert len({shown for _, shown, _ in rig.steps}) == len(rig.steps) == 11


# --- 2. a client lost while it holds a lease --------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["connection-closed", "silent"])
async def test_the_frames_of_a_lost_client_go_to_the_other_in_order(rig: Rig, how: str) -> None:
    job = await rig.submit("J", frames=4, chunk=2)
    a = await rig.join("A")
    await a.report("idle")
    probe = await a.expect(m.Probe)
    b = await rig.join("B")
    await b.report("idle")
    await rig.step("A probes, B is idle", "J probing 0/0 | A probing, B idle")
    await a.probe_result(probe, 4)
    lease_a = await a.expect(m.Assign)
    lease_b = await b.expect(m.Assign)
    await rig.step("A answered the probe", "J rendering 0/4 | A rendering, B rendering")
    await a.report("rendering", lease_a.lease_id, job, 1)
    await rig.step("A renders frame 1", "J rendering 0/4 | A rendering@1, B rendering")
    if how == "silent":
        await a.fall_silent()  # the server's watchdog drops it after TEST_HEARTBEAT_TIMEOUT_S
    else:
        await a.drop()
    # Changed on purpose (issue 11, "failures that mean failure"): a lost client's frames go back without a
    # failure of the frame or of the client; it was characterised as "fail 1x1 by A" before. A crash of Blender
    # is reported by the client itself (its render process), as FRAME_FAILED, and counts then.
    await rig.step("A was lost", "J rendering 0/4 | A lost, B rendering")
    await b.render(lease_b, 3)
    await rig.step("B sent frame 3", "J rendering 1/4 | A lost, B rendering@3")
    await b.render(lease_b, 4)
    await rig.step("B sent frame 4", "J rendering 2/4 | A lost, B rendering@4")
    await b.lease_done(lease_b.lease_id)
    taken_over = await b.expect(m.Assign)
    await rig.step("B ended its lease", "J rendering 2/4 | A lost, B rendering")
    await b.render(taken_over, 1)
    await rig.step("B sent frame 1", "J rendering 3/4 | A lost, B rendering@1")
    await b.render(taken_over, 2)
    await b.expect(m.Revoke)
    await rig.step("B sent frame 2", "J done 4/4 | A lost, B idle")
    await b.lease_done(taken_over.lease_id)
    await b.quiet()

    assert rig.received(a) == [("probe", 1, "J"), ("assign", 2, "J", [1, 2])]
    assert rig.received(b) == [("assign", 3, "J", [3, 4]), ("assign", 4, "J", [1, 2]), ("revoke", 4, [])]
    status = rig.viewer.latest
    assert status is not None
    assert status["jobs"][0]["failures"] == []  # (was one failure of frame 1 on A: changed on purpose, see above)
    assert [c["failures"] for c in status["clients"] if c["name"] == "A"] == [0]


# --- 3. pause and resume ---------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_pause_takes_the_lease_back_and_resume_hands_the_frames_out_again(rig: Rig) -> None:
    job = await rig.submit("J", frames=4, chunk=2)
    a = await rig.join("A")
    await a.report("idle")
    await probe_and_answer(a, 4)
    first = await a.expect(m.Assign)
    await a.report("rendering", first.lease_id, job, 1)
    await rig.step("A renders frame 1", "J rendering 0/4 | A rendering@1")
    await rig.action("pause", job)
    await a.expect(m.Revoke)
    await rig.step("the job paused", "J paused 0/4 | A idle")
    await a.report("idle")
    await a.quiet()  # nothing for an idle client while the job is paused
    await rig.step("A idle while paused", "J paused 0/4 | A idle")
    await rig.action("resume", job)
    again = await a.expect(m.Assign)
    await rig.step("the job resumed", "J rendering 0/4 | A rendering")
    for frame in again.frames:
        await a.render(again, frame)
    await rig.step("A sent frames 1 and 2", "J rendering 2/4 | A rendering@2")
    await a.lease_done(again.lease_id)
    last = await a.expect(m.Assign)
    for frame in last.frames:
        await a.render(last, frame)
    await a.expect(m.Revoke)
    await rig.step("A sent frames 3 and 4", "J done 4/4 | A idle")
    await a.lease_done(last.lease_id)
    await a.quiet()

    assert rig.received(a) == [("probe", 1, "J"), ("assign", 2, "J", [1, 2]), ("revoke", 2, []),
                               ("assign", 3, "J", [1, 2]), ("assign", 4, "J", [3, 4]), ("revoke", 4, [])]


# --- 4. a frame stored twice -------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_frame_the_first_holder_stores_is_revoked_from_the_second(rig: Rig) -> None:
    job = await rig.submit("J", frames=2, chunk=2)
    a = await rig.join("A")
    await a.report("idle")
    await probe_and_answer(a, 2)
    first = await a.expect(m.Assign)
    b = await rig.join("B")
    await b.report("idle")
    await a.report("rendering", first.lease_id, job, 1)
    await rig.step("A renders frame 1, B has nothing", "J rendering 0/2 | A rendering@1, B idle")
    await rig.action("pause", job)
    await a.expect(m.Revoke)
    await rig.step("the job paused", "J paused 0/2 | A idle, B idle")
    # A still finishes frame 1, which the server took back: it says so (busy), and is given nothing new.
    await a.report("busy")
    await rig.step("A busy with frame 1", "J paused 0/2 | A busy, B idle")
    await rig.action("resume", job)
    second = await b.expect(m.Assign)
    await rig.step("the job resumed", "J rendering 0/2 | A busy, B rendering")
    await a.send_frame(first.lease_id, job, 1)  # under its first lease, which covered frame 1
    revoked = await b.expect(m.Revoke)
    await rig.step("A sent frame 1", "J rendering 1/2 | A busy, B rendering")
    assert revoked.frames == [1]
    await b.render(second, 1)  # B sends it anyway (it was on the way): dropped, no error, nothing changes
    await rig.step("B sent frame 1 too", "J rendering 1/2 | A busy, B rendering@1")
    await a.report("idle")
    await rig.step("A idle", "J rendering 1/2 | A idle, B rendering@1")
    await b.render(second, 2)
    await b.expect(m.Revoke)
    await rig.step("B sent frame 2", "J done 2/2 | A idle, B idle")
    await b.lease_done(second.lease_id)
    await a.quiet()
    await b.quiet()

    assert rig.received(a) == [("probe", 1, "J"), ("assign", 2, "J", [1, 2]), ("revoke", 2, [])]
    assert rig.received(b) == [("assign", 3, "J", [1, 2]), ("revoke", 3, [1]), ("revoke", 3, [])]
    assert len(list((rig.farm.output / job).glob("frame_*.png"))) == 2


# --- 5. cancel and delete ------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize(("action", "shown"), [("cancel", "J cancelled 0/4 | A idle"), ("delete", "| A idle")],
                         ids=["cancel", "delete"])
async def test_cancel_or_delete_tells_the_holder_and_assigns_nothing_more(rig: Rig, action: str, shown: str) -> None:
    job = await rig.submit("J", frames=4, chunk=2)
    a = await rig.join("A")
    await a.report("idle")
    await probe_and_answer(a, 4)
    first = await a.expect(m.Assign)
    await a.report("rendering", first.lease_id, job, 1)
    await rig.step("A renders frame 1", "J rendering 0/4 | A rendering@1")
    await rig.action(action, job)
    await a.expect(m.Revoke)
    await rig.step(f"the job {action}", shown)
    await a.send_frame(first.lease_id, job, 1)  # on its way when the job ended: dropped, no error
    await a.report("idle")
    await a.quiet()
    await rig.step("A idle", shown)

    assert rig.received(a) == [("probe", 1, "J"), ("assign", 2, "J", [1, 2]), ("revoke", 2, [])]
    assert not list(rig.farm.output.rglob("frame_*.png"))


# --- 6. priorities ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_the_higher_priority_goes_first_and_a_new_priority_reorders(rig: Rig) -> None:
    low = await rig.submit("L", frames=4, chunk=2)
    high = await rig.submit("H", frames=4, chunk=2, priority=5)
    await rig.step("two jobs submitted", "H probing 0/0 p5, L probing 0/0 |")
    a = await rig.join("A")
    await a.report("idle")
    await probe_and_answer(a, 4)
    first = await a.expect(m.Assign)
    await rig.step("A probed H", "H rendering 0/4 p5, L probing 0/0 | A rendering")
    await rig.action("priority", low, priority=10)
    await rig.step("L raised above H", "L probing 0/0 p10, H rendering 0/4 p5 | A rendering")
    for frame in first.frames:
        await a.render(first, frame)
    await a.lease_done(first.lease_id)
    await probe_and_answer(a, 4)
    await rig.step("A probed L", "L rendering 0/4 p10, H rendering 2/4 p5 | A rendering")
    for _ in range(2):
        lease = await a.expect(m.Assign)
        for frame in lease.frames:
            await a.render(lease, frame)
        if lease.frames[-1] != 4:
            await a.lease_done(lease.lease_id)
    # L's last frame ends L (its lease revoked) and, in the same turn, H's frames go to the client it freed.
    await a.expect(m.Revoke)
    rest = await a.expect(m.Assign)
    await rig.step("A rendered L", "H rendering 2/4 p5, L done 4/4 p10 | A rendering")
    await a.lease_done(lease.lease_id)
    for frame in rest.frames:
        await a.render(rest, frame)
    await a.expect(m.Revoke)
    # Finished jobs are listed by priority too.
    await rig.step("A rendered H", "L done 4/4 p10, H done 4/4 p5 | A idle")
    await a.lease_done(rest.lease_id)
    await a.quiet()

    assert high != low
    assert rig.received(a) == [("probe", 1, "H"), ("assign", 2, "H", [1, 2]), ("probe", 3, "L"),
                               ("assign", 4, "L", [1, 2]), ("assign", 5, "L", [3, 4]), ("revoke", 5, []),
                               ("assign", 6, "H", [3, 4]), ("revoke", 6, [])]
