"""Failure policy with real clients: a client stuck on one frame far longer than the others is lost,
and a frame that hangs on every client fails its job."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Clients, Farm, connected, submit

pytestmark = pytest.mark.e2e


@pytest.fixture
def impatient_farm(tmp_path: Path) -> Iterator[Farm]:
    # A frame is "far longer" at 3x the job's median frame time, and at least 1 s.
    farm = Farm(tmp_path / "output", hang_factor=3.0, hang_min_s=1.0)
    yield farm
    farm.stop()


def test_client_stuck_on_a_frame_is_treated_as_lost(impatient_farm: Farm, clients: Clients, scenes) -> None:
    farm = impatient_farm
    blend = scenes("slow5", "--frames", "8", "--slow-frame", "5", "--samples", "4")
    clients.start("first", farm.address)
    farm.wait_until(connected(1), what="first client")
    job_id = submit(farm, blend, "--chunk", "1", wait=False).stdout.strip()

    # Frames 1-4 take a fraction of a second; frame 5 takes a thousand times longer.
    farm.wait_until(lambda s: any(c.frame == 5 for c in s.farm.clients.values()), what="frame 5 started")
    clients.start("second", farm.address)

    def frame5_failed(s):
        frame = s.farm.jobs[job_id].frames[5]
        return frame.failures >= 1 and frame.failed_on == {"first"} and frame.error
    farm.wait_until(frame5_failed, timeout=60, what="the stuck client to be dropped")
    error = farm.call(lambda s: s.farm.jobs[job_id].frames[5].error)
    assert "lost while rendering" in error

    # Frame 5 hangs wherever it goes: after three tries the job fails instead of going round forever.
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=180, what="the job to give up")
    job = farm.job(job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("frame 5 failed 3 times") and "lost while rendering" in job["error"]
    assert job["failures"][0]["clients"] == ["first", "second"]
    done = farm.call(lambda s: sorted(n for n, f in s.farm.jobs[job_id].frames.items() if f.state.value == "done"))
    assert done[:4] == [1, 2, 3, 4]
    for name in ("first", "second"):
        clients.kill(name, signal.SIGKILL)
