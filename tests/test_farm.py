"""End to end: a real server, real client processes rendering with PyPI's bpy, real TCP."""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO, Clients, Farm, connected, repo_env, submit
from PIL import Image, ImageChops

from protocol import messages as m
from protocol.errors import ConnectionClosed
from protocol.handshake import Role, client_handshake
from protocol.stream import MessageStream


def frame_files(farm: Farm, job_id: str) -> list[Path]:
    return sorted((farm.output / job_id).glob("frame_*.png"))


def test_two_clients_render_an_animation(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("alpha", farm.address)
    clients.start("beta", farm.address, as_script=True)  # the way Blender runs it: a script path, args after --
    farm.wait_until(connected(2), what="two clients")

    result = submit(farm, animation)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()

    files = frame_files(farm, job_id)
    assert [f.name for f in files] == [f"frame_{n:04d}.png" for n in range(1, 13)]
    images = [Image.open(f).convert("RGB") for f in files]
    assert all(im.size == (64, 36) for im in images)
    for before, after in zip(images, images[1:], strict=False):
        diff = ImageChops.difference(before, after).convert("L").point(lambda v: 255 if v > 8 else 0)
        box = diff.getbbox()
        assert box is not None, "neighbouring frames are identical, but the cube moves"
        moved = diff.histogram()[255]
        assert 5 <= moved < 64 * 36 // 2, f"{moved} pixels changed; expected the moving cube only"
        # The top rows show only the world background, which does not move.
        assert box[1] > 0, "pixels changed in the static top row"

    job = farm.job(job_id)
    assert job["state"] == "done" and job["frames_done"] == 12
    by_client = farm.call(lambda s: {c.name: c.frames_rendered for c in s.farm.clients.values()})
    assert sum(by_client.values()) == 12
    assert farm.call(lambda s: s.stats.frames_stored) == 12
    assert "\nerror" not in result.stderr.lower()
    assert "12/12 frames" in result.stderr


def test_killed_client_work_is_reassigned(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("anim24", "--frames", "24", "--size", "64x36", "--samples", "48")
    clients.start("victim", farm.address)
    farm.wait_until(connected(1), what="victim")
    clients.start("survivor", farm.address)
    farm.wait_until(connected(2), what="two clients")

    result = submit(farm, blend, "--chunk", "6", wait=False)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()

    def victim_mid_chunk(s):  # the victim has stored a frame and still holds frames of its lease
        victim = next(c for c in s.farm.clients.values() if c.name == "victim")
        lease = s.farm.leases.get(victim.lease_id) if victim.lease_id else None
        if lease is None or victim.frames_rendered < 1:
            return None
        job = s.farm.jobs[job_id]
        held = [n for n in lease.frames if job.frames[n].state.value == "leased"]
        return held or None

    held = farm.wait_until(victim_mid_chunk, what="the victim in the middle of a chunk")
    clients.kill("victim", signal.SIGKILL)

    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=180, what="job end")
    job = farm.job(job_id)
    assert job["state"] == "done", job
    assert len(frame_files(farm, job_id)) == 24
    stats = farm.call(lambda s: (s.stats.frames_stored, s.stats.duplicate_frames))
    assert stats == (24, 0), "every frame is stored exactly once"
    rendered_by = farm.call(lambda s: {n: f.rendered_by
                                       for n, f in s.farm.jobs[job_id].frames.items()})
    assert all(rendered_by[n] == "survivor" for n in held), "the victim's unfinished frames went to the survivor"
    victim_state = farm.call(lambda s: [c["state"] for c in s.farm.client_views() if c["name"] == "victim"])
    assert victim_state == ["lost"]


def test_silent_client_loses_its_lease(farm: Farm, clients: Clients, scenes) -> None:
    """A client that stops answering (SIGSTOP: the process hangs, the socket stays open)."""
    blend = scenes("anim16", "--frames", "16", "--size", "64x36", "--samples", "48")
    clients.start("hung", farm.address)
    farm.wait_until(connected(1), what="first client")
    clients.start("healthy", farm.address)
    farm.wait_until(connected(2), what="two clients")
    job_id = submit(farm, blend, "--chunk", "4", wait=False).stdout.strip()

    def hung_holds_frames(s):
        hung = next(c for c in s.farm.clients.values() if c.name == "hung")
        return hung.lease_id is not None and s.farm.leases[hung.lease_id].kind.value == "render"
    farm.wait_until(hung_holds_frames, what="the client to hold frames")
    clients.kill("hung", signal.SIGSTOP)

    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=120, what="job end")
    assert farm.job(job_id)["state"] == "done"
    assert len(frame_files(farm, job_id)) == 16
    assert farm.call(lambda s: s.stats.frames_stored) == 16


def test_same_blend_is_sent_once(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("solo", farm.address)
    farm.wait_until(connected(1), what="client")
    first = submit(farm, animation, "--frames", "1-4")
    assert first.returncode == 0, first.stderr
    sent = farm.call(lambda s: s.stats.blend_bytes_sent)
    assert sent == animation.stat().st_size

    second = submit(farm, animation, "--frames", "5-8")
    assert second.returncode == 0, second.stderr
    assert farm.call(lambda s: s.stats.blend_bytes_sent) == sent, "the client already had this .blend"

    # A restarted client with the same cache downloads nothing either.
    clients.kill("solo", signal.SIGTERM)
    clients.procs["solo"].wait(timeout=30)
    clients.start("solo-again", farm.address, cache="solo")
    farm.wait_until(connected(1), what="restarted client")
    third = submit(farm, animation, "--frames", "9-12")
    assert third.returncode == 0, third.stderr
    assert farm.call(lambda s: s.stats.blend_bytes_sent) == sent
    assert "found in the cache" in clients.log("solo-again")
    for job_id, frames in ((first, range(1, 5)), (second, range(5, 9)), (third, range(9, 13))):
        names = [f.name for f in frame_files(farm, job_id.stdout.strip())]
        assert names == [f"frame_{n:04d}.png" for n in frames]


def test_failing_frames_fail_the_job_with_blenders_error(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("broken", "--frames", "6", "--fail")
    clients.start("one", farm.address)
    clients.start("two", farm.address)
    farm.wait_until(connected(2), what="two clients")
    result = submit(farm, blend, timeout=120)
    assert result.returncode == 1
    assert "Image too small" in result.stderr
    job_id = result.stdout.strip()
    job = farm.job(job_id)
    assert job["state"] == "failed"
    assert "Image too small" in job["error"]
    failed = farm.call(lambda s: {n: (f.failures, sorted(f.failed_on))
                                  for n, f in s.farm.jobs[job_id].frames.items() if f.failures})
    # The frame that failed the job was tried on both clients before the job gave up.
    assert any(count == 3 and names == ["one", "two"] for count, names in failed.values()), failed
    status = farm.call(lambda s: s.snapshot())
    assert all(c["state"] == "idle" for c in status["clients"]), "no client keeps working on a failed job"


def test_step_and_format_options(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("fmt", farm.address)
    farm.wait_until(connected(1), what="client")
    result = submit(farm, animation, "--frames", "2-11", "--step", "3", "--format", "JPEG", "--percentage", "50")
    assert result.returncode == 0, result.stderr
    job_dir = farm.output / result.stdout.strip()
    names = sorted(p.name for p in job_dir.iterdir())
    assert names == ["frame_0002.jpg", "frame_0005.jpg", "frame_0008.jpg", "frame_0011.jpg"]
    with Image.open(job_dir / "frame_0005.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 18)


def test_failed_frame_keeps_blenders_output(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("broken", "--frames", "6", "--fail")
    clients.start("only", farm.address)
    farm.wait_until(connected(1), what="client")
    result = submit(farm, blend, timeout=120)
    job_id = result.stdout.strip()
    assert result.returncode == 1
    frame = farm.call(lambda s: next(n for n, f in s.farm.jobs[job_id].frames.items() if f.failures))
    shown = subprocess.run([sys.executable, "-m", "tools.jobs", "--server", farm.address, "log", job_id, str(frame)],
                           cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    error, _, render_log = shown.stdout.partition("--- render log (tail) ---")
    assert "Image too small" in error
    assert "Image too small" in render_log, "the tail of what Blender printed is kept"
    assert "3 failure(s) on only" in shown.stdout


def test_scripts_in_blend_files_stay_off_unless_allowed(farm: Farm, clients: Clients, scenes,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "script-ran.txt"
    blend = scenes("scripted", "--frames", "2", "--script-marker", str(marker))
    clients.start("careful", farm.address)
    farm.wait_until(connected(1), what="client")
    assert submit(farm, blend).returncode == 0
    assert not marker.exists(), "a script embedded in the .blend ran on a client without --allow-scripts"

    clients.kill("careful", signal.SIGTERM)
    clients.procs["careful"].wait(timeout=30)
    clients.start("trusting", farm.address, "--allow-scripts")
    farm.wait_until(connected(1), what="client with scripts allowed")
    assert submit(farm, blend, "--samples", "2").returncode == 0
    assert marker.read_text() == "ran"


async def _forge(port: int, message_sets: list[list[m.Message]]) -> int:
    """Each set on its own raw worker connection (it holds no lease); returns how many the server refused
    by closing that connection with a reason."""
    refused = 0
    for messages in message_sets:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = MessageStream(reader, writer)
        try:
            await client_handshake(stream, role=Role.WORKER, name="mallory", secret=None, blender="5.0.1")
            for message in messages:
                await stream.send(message)
            # Refused: an Error with the reason, then the close. A report on a lease that has ended meanwhile is
            # ignored without a word: the short wait then ends by timeout.
            async with asyncio.timeout(1.0):
                while True:
                    reply = await stream.recv()
                    if isinstance(reply, m.Error):
                        refused += "does not hold" in reply.reason or "which no lease" in reply.reason
        except (ConnectionClosed, OSError, TimeoutError):
            pass
        finally:
            stream.close()
    return refused


def test_results_from_a_client_without_the_lease_change_nothing(farm: Farm, clients: Clients, scenes) -> None:
    """A worker with no lease sends frames, lease ends and failed probe answers for the real client's
    leases while it renders: every one is refused, and the job ends with the real client's frames only."""
    # One chunk of three slow frames (seconds each here): the real client's render lease stays live for
    # several seconds, long enough for the forger to meet it after the probe.
    blend = scenes("anim3slow", "--frames", "3", "--size", "64x36", "--samples", "1500", "--no-adaptive-sampling")
    result = submit(farm, blend, "--chunk", "3", wait=False)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    clients.start("alpha", farm.address)  # after the job: its probe lease is there to forge answers to
    red = io.BytesIO()
    Image.new("RGB", (64, 36), (255, 0, 0)).save(red, "PNG")
    forged = red.getvalue()

    def frame_messages(lease_id: int, number: int) -> list[m.Message]:
        return [m.FrameBegin(lease_id=lease_id, job_id=job_id, frame=number, ext="png", size=len(forged),
                             render_s=0.1), m.Chunk(data=forged), m.End(sha256=hashlib.sha256(forged).hexdigest())]

    def leases_of(kind: str):  # (lease id, frames) of the job's live leases of that kind, once there are any
        return lambda s: [(lease.id, list(lease.frames)) for lease in s.farm.leases.values()
                          if lease.job_id == job_id and lease.kind.value == kind]

    kinds: set[str] = set()
    refused = sent = 0
    for lease_id, _ in farm.wait_until(leases_of("probe"), what="the probe lease"):
        kinds.add("probe")
        sent += 1
        refused += asyncio.run(_forge(farm.port, [[m.ProbeResult(lease_id=lease_id, ok=False, error="forged")]]))
    for lease_id, frames in farm.wait_until(leases_of("render"), what="a render lease"):
        kinds.add("render")
        sets = [frame_messages(lease_id, frames[-1]), frame_messages(999, frames[-1]),
                [m.FrameFailed(lease_id=lease_id, job_id=job_id, frame=frames[0], error="forged")],
                [m.LeaseDone(lease_id=lease_id)]]
        sent += len(sets)
        refused += asyncio.run(_forge(farm.port, sets))
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=120, what="the job to end")

    assert kinds == {"probe", "render"}, "the forger met both a probe and a render lease"
    assert refused >= sent // 2, "leases still live when the forgery arrived were refused by name"
    job = farm.job(job_id)
    assert job["state"] == "done" and job["frames_done"] == 3
    files = frame_files(farm, job_id)
    assert len(files) == 3 and not any(f.read_bytes() == forged for f in files)
    assert not list((farm.output / job_id).rglob("*.tmp*")), "no forged upload left behind"
    images = [Image.open(f).convert("RGB") for f in files]
    assert all(im.getpixel((0, 0)) != (255, 0, 0) for im in images)
    rendered = farm.call(lambda s: ({f.rendered_by for f in s.farm.jobs[job_id].frames.values()},
                                    sum(f.failures for f in s.farm.jobs[job_id].frames.values()),
                                    s.farm.jobs[job_id].probe_failures, s.stats.frames_stored))
    assert rendered == ({"alpha"}, 0, 0, 3)
