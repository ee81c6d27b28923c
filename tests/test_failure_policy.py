"""Failures that mean failure, with real clients (PyPI's bpy) on a real server.

A client killed while it renders hands its frame back and counts no failure of anyone; Blender crashing on a
frame is found by the client, which renders in a process of its own, and counts (three times: the job fails);
a frame is hung only when its render shows no progress for the job's limit, never for being slow.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from conftest import TEST_HEARTBEAT_TIMEOUT_S, Clients, Farm, connected, submit

pytestmark = pytest.mark.e2e

#: A Python driver that crashes Blender (SIGABRT) on frame 3 and one that stalls frame 2 without a sign of life.
CRASH_ON_3 = "(__import__('os').abort() if frame == 3 else 0)"
STALL_ON_2 = "((__import__('time').sleep(120) or 0) if frame == 2 else 0)"


def _client(s, name: str):
    return next((c for c in s.farm.clients.values() if c.name == name and c.connected), None)


def _render_pids(clients: Clients, name: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"render process started \(pid (\d+)", clients.log(name))]


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status  # a zombie: ended, not yet reaped by whoever adopted it


def _wait_for_log(clients: Clients, name: str, line: str, count: int, timeout: float = 20.0) -> None:
    """Until the client's log holds `line` `count` times (a log file signals nothing: it is read again)."""
    deadline = time.monotonic() + timeout
    while clients.log(name).count(line) < count:
        assert time.monotonic() < deadline, f"{name}'s log has {line!r} {clients.log(name).count(line)} times"
        time.sleep(0.1)
    assert clients.log(name).count(line) == count


def test_killed_clients_hand_their_frames_back_without_a_failure(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("kills60", "--frames", "60", "--size", "64x36", "--samples", "24")
    names = ("k0", "k1")
    for name in names:
        clients.start(name, farm.address, "--threads", "1")
    farm.wait_until(connected(2), what="two clients")
    job_id = submit(farm, blend, "--chunk", "2", wait=False).stdout.strip()

    for kill in range(10):
        name = names[kill % 2]

        def rendering(s, name=name):  # that client is in the middle of a frame of the job
            client = _client(s, name)
            return client is not None and client.frame is not None and client.lease_id is not None
        farm.wait_until(rendering, timeout=60, what=f"{name} rendering (kill {kill + 1})")
        clients.kill(name, signal.SIGKILL)
        clients.procs[name].wait(timeout=10)
        clients.start(name, farm.address, "--threads", "1")
    assert farm.call(lambda s: s.farm.jobs[job_id].frames_done) < 60, "the kills came while the job rendered"

    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=240, what="the job to end")
    job = farm.job(job_id)
    assert job["state"] == "done", job
    assert job["failures"] == [], "a killed client is no failure of its frame"
    frames = farm.call(lambda s: s.farm.jobs[job_id].frames)
    assert all(f.failures == 0 and not f.failed_on for f in frames.values())
    assert farm.call(lambda s: s.farm.jobs[job_id].client_failures) == {}
    assert set(farm.call(lambda s: [c.failures for c in s.farm.clients.values()])) == {0}
    assert sorted(p.name for p in (farm.output / job_id).glob("frame_*.png")) == \
        [f"frame_{n:04d}.png" for n in range(1, 61)]
    assert farm.call(lambda s: (s.stats.frames_stored, s.stats.duplicate_frames)) == (60, 0), "each frame once"
    # The render process of a killed client ends with it (its stdin closes), also in the middle of a frame.
    pids = [pid for name in names for pid in _render_pids(clients, name)]
    assert len(pids) >= 12
    for name in names:
        clients.kill(name, signal.SIGKILL)
        clients.procs[name].wait(timeout=10)
    farm.wait_until(lambda s: all(_gone(pid) for pid in pids), timeout=20, what="every render process to end")


def test_a_slow_frame_that_progresses_lands(farm: Farm, clients: Clients, scenes) -> None:
    # Frame 4 has a thousand times the samples of the others, rendered in 8-pixel tiles: it takes longer than
    # the job's hang limit (seconds, on this machine's speed), far longer than ten times the others, and shows
    # progress all along.
    blend = scenes("slow4", "--frames", "6", "--slow-frame", "4", "--samples", "3", "--tile-size", "8")
    clients.start("patient", farm.address)
    farm.wait_until(connected(1), what="the client")
    result = submit(farm, blend, "--chunk", "1", "--hang-timeout", str(TEST_HEARTBEAT_TIMEOUT_S))
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    frames = farm.call(lambda s: s.farm.jobs[job_id].frames)
    assert all(f.failures == 0 for f in frames.values()), [f.error for f in frames.values()]
    slow = frames[4].render_s
    others = sorted(f.render_s for n, f in frames.items() if n != 4)
    assert slow > TEST_HEARTBEAT_TIMEOUT_S and slow > 10 * others[len(others) // 2], (slow, others)
    assert farm.call(lambda s: s.stats.frames_stored) == 6


def test_a_render_without_progress_is_hung(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("stall2", "--frames", "3", "--python-driver", STALL_ON_2)
    clients.start("staller", farm.address, "--allow-scripts")
    farm.wait_until(connected(1), what="the client")
    job_id = submit(farm, blend, "--chunk", "1", "--needs-scripts", "--hang-timeout", "2", wait=False).stdout.strip()
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=120, what="the job to give up")
    job = farm.job(job_id)
    assert job["state"] == "failed"
    assert re.match(r"frame 2 failed 3 times: the render showed no progress for \d+ s \(the job's limit is 2 s\)",
                    job["error"]), job["error"]
    done = farm.call(lambda s: sorted(n for n, f in s.farm.jobs[job_id].frames.items() if f.state.value == "done"))
    assert 1 in done and 2 not in done
    # The client was never taken for lost: one connection throughout; it stopped each stalled render itself.
    assert farm.call(lambda s: [c.connected for c in s.farm.clients.values()]) == [True]
    _wait_for_log(clients, "staller", "frame 2 was taken back; its render was stopped", 3)


def test_a_blender_crash_on_a_frame_is_a_failure_and_fails_the_job(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("crash3", "--frames", "4", "--python-driver", CRASH_ON_3)
    clients.start("crasher", farm.address, "--allow-scripts")
    farm.wait_until(connected(1), what="the client")
    result = submit(farm, blend, "--chunk", "1", "--needs-scripts")
    assert result.returncode == 1
    job_id = result.stdout.strip()
    job = farm.job(job_id)
    assert job["state"] == "failed"
    assert job["error"] == "frame 3 failed 3 times: Blender crashed (signal 6, SIGABRT) while rendering frame 3"
    assert "Blender crashed (signal 6, SIGABRT) while rendering frame 3" in result.stderr
    done = farm.call(lambda s: sorted(n for n, f in s.farm.jobs[job_id].frames.items() if f.state.value == "done"))
    assert done[:2] == [1, 2] and 3 not in done
    # The client stayed connected: it saw its render process end, reported the frame, started another one.
    assert farm.call(lambda s: [c.connected for c in s.farm.clients.values()]) == [True]
    assert clients.log("crasher").count("Blender crashed (signal 6, SIGABRT) while rendering frame 3;") == 3
