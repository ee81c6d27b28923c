"""A render client told to stop (SIGTERM, as Kubernetes and spot nodes send): it takes no new work, hands back at
once what it has not started, finishes the frame in hand within --drain-timeout or hands it back too, and exits 0.
Real bpy clients against an in-process farm; every frame lands exactly once and nothing counts as a failure."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Clients, Farm, connected, submit

from server_addon.core.service import FarmService

pytestmark = [pytest.mark.e2e, pytest.mark.bpy, pytest.mark.timeout(240)]

FRAMES = 4
#: A graceful stop ends well within this (the slowest case renders one frame first).
EXIT_S = 60


@pytest.fixture
def slow(scenes: Callable[..., Path]) -> Path:
    # Seconds a frame here: a stop signal sent once a frame began lands in the middle of it.
    return scenes("anim4slow", "--frames", str(FRAMES), "--size", "64x36", "--samples", "1500",
                  "--no-adaptive-sampling")


def rendering(name: str, frame: int) -> Callable[[FarmService], bool]:
    return lambda s: any(c.name == name and c.connected and c.lease_id is not None and c.frame == frame
                         for c in s.farm.clients.values())


def start_job(farm: Farm, clients: Clients, blend: Path, drain_timeout: str) -> str:
    """`leaving` gets the job's one lease of all its frames; `staying` connects after and waits idle."""
    clients.start("leaving", farm.address, "--drain-timeout", drain_timeout)
    farm.wait_until(connected(1), what="the first client")
    result = submit(farm, blend, "--chunk", str(FRAMES), wait=False)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    farm.wait_until(rendering("leaving", 2), timeout=120, what="frame 2 on the leaving client")
    clients.start("staying", farm.address)
    farm.wait_until(lambda s: any(c.name == "staying" and c.ready for c in s.farm.clients.values()),
                    what="the second client")
    return job_id


def outcome(farm: Farm, job_id: str) -> dict[str, object]:
    def read(s: FarmService) -> dict[str, object]:
        job = s.farm.jobs[job_id]
        return {"state": job.state.value, "by": {n: f.rendered_by for n, f in job.frames.items()},
                "failures": sum(f.failures for f in job.frames.values()) + s.farm.counts.frame_failures,
                "stored": s.stats.frames_stored, "duplicates": s.stats.duplicate_frames,
                "handed_back": s.farm.counts.frames_handed_back, "lost": s.farm.counts.leases_lost}
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=120, what="the job to end")
    return farm.call(read)


def test_a_stopped_client_finishes_its_frame_within_a_long_grace(farm: Farm, clients: Clients, slow: Path) -> None:
    job_id = start_job(farm, clients, slow, drain_timeout="60")
    clients.kill("leaving", signal.SIGTERM)
    farm.wait_until(lambda s: [c["state"] for c in s.snapshot()["clients"] if c["name"] == "leaving"] == ["stopping"],
                    what="the leaving client shown as stopping")
    assert clients.procs["leaving"].wait(timeout=EXIT_S) == 0, clients.log("leaving")
    result = outcome(farm, job_id)
    assert [c["name"] for c in farm.call(lambda s: s.snapshot())["clients"]] == ["staying"]
    # Frames 3 and 4 went back at once and to the other client; frame 2, begun, landed from the leaving one.
    assert result == {"state": "done", "by": {1: "leaving", 2: "leaving", 3: "staying", 4: "staying"},
                      "failures": 0, "stored": FRAMES, "duplicates": 0, "handed_back": 2, "lost": 0}
    assert "frame 2 rendered" in clients.log("leaving")


def test_a_stopped_client_hands_back_its_frame_after_a_short_grace(farm: Farm, clients: Clients,
                                                                   slow: Path) -> None:
    job_id = start_job(farm, clients, slow, drain_timeout="0.5")
    clients.kill("leaving", signal.SIGTERM)
    assert clients.procs["leaving"].wait(timeout=EXIT_S) == 0, clients.log("leaving")
    result = outcome(farm, job_id)
    assert result == {"state": "done", "by": {1: "leaving", 2: "staying", 3: "staying", 4: "staying"},
                      "failures": 0, "stored": FRAMES, "duplicates": 0, "handed_back": 3, "lost": 0}
    log = clients.log("leaving")
    assert "the drain time is up; frame 2 given back" in log and "frame 2 rendered" not in log


def test_an_idle_client_stops_at_once(farm: Farm, clients: Clients) -> None:
    proc = clients.start("idle", farm.address)
    farm.wait_until(lambda s: any(c.name == "idle" and c.ready for c in s.farm.clients.values()),
                    what="the client")
    clients.kill("idle", signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, clients.log("idle")
    farm.wait_until(lambda s: not any(c.connected for c in s.farm.clients.values()), what="the client to leave")
    assert farm.call(lambda s: (s.farm.counts.leases_lost, s.farm.counts.frame_failures)) == (0, 0)
    # Gone on purpose, not lost: it is not listed as a lost client (a scaled-down pool leaves no trail of them).
    assert farm.call(lambda s: s.snapshot()["clients"]) == []
