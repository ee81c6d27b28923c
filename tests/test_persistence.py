"""A headless server killed with SIGKILL in mid-job continues after a restart, re-rendering nothing."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from conftest import Clients, submit_to, watch_until

from tools.localfarm import start_server


def frames_on_disk(job_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in job_dir.glob("frame_*.png")}


def stored_frames(log: Path) -> set[int]:
    return {int(n) for n in re.findall(r"frame (\d+) stored from", log.read_text())}


def test_killed_server_resumes_its_jobs(tmp_path: Path, clients: Clients, scenes) -> None:
    blend = scenes("anim24", "--frames", "24", "--size", "64x36", "--samples", "48")
    output = tmp_path / "output"
    first_log, second_log = tmp_path / "server-1.log", tmp_path / "server-2.log"
    server, port = start_server(output, first_log)
    address = f"127.0.0.1:{port}"
    try:
        clients.start("steady", address)
        result = submit_to(address, blend, "--chunk", "3", wait=False)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip()
        watch_until(address, job_id, lambda job: job["frames_done"] >= 8)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)

        before = frames_on_disk(output / job_id)
        assert 8 <= len(before) < 24, "the kill came in the middle of the job"

        server, _ = start_server(output, second_log, port=port)
        job = watch_until(address, job_id, lambda job: job["state"] == "done", timeout=180)
        assert job["frames_done"] == 24
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    after = frames_on_disk(output / job_id)
    assert len(after) == 24
    for name, identity in before.items():
        assert after[name] == identity, f"{name} was on disk before the kill and was written again"
    rendered_after_restart = stored_frames(second_log)
    assert rendered_after_restart == set(range(1, 25)) - {int(n[6:10]) for n in before}
    assert "restored 1 jobs (1 to continue)" in second_log.read_text()
    assert not list((output / job_id).glob(".incoming-*")), "half-written uploads were cleaned up"
