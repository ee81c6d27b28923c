"""Job control through the real command-line tools: observable in status and on disk."""

from __future__ import annotations

from pathlib import Path

from conftest import Clients, Farm, connected, jobs_tool, status_json, submit, watch_until


def slow_scene(scenes) -> Path:
    return scenes("anim24", "--frames", "24", "--size", "64x36", "--samples", "48")


def job_in(status: dict, job_id: str) -> dict | None:
    return next((j for j in status["jobs"] if j["id"] == job_id), None)


def start_job(farm: Farm, blend: Path, *args: str) -> str:
    result = submit(farm, blend, "--chunk", "2", *args, wait=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_cancel_stops_the_job(farm: Farm, clients: Clients, scenes) -> None:
    clients.start("worker", farm.address)
    farm.wait_until(connected(1), what="client")
    job_id = start_job(farm, slow_scene(scenes))
    watch_until(farm.address, job_id, lambda j: j["frames_done"] >= 2)

    result = jobs_tool(farm.address, "cancel", job_id)
    assert result.returncode == 0 and "cancelled" in result.stdout, result.stderr
    farm.wait_until(lambda s: all(c["state"] == "idle" for c in s.farm.client_views()), what="client idle")
    status = status_json(farm.address)
    job = job_in(status, job_id)
    assert job["state"] == "cancelled"
    on_disk = len(list((farm.output / job_id).glob("frame_*")))
    assert on_disk == job["frames_done"] < 24

    again = jobs_tool(farm.address, "cancel", job_id)
    assert again.returncode == 1 and "already cancelled" in again.stderr


def test_pause_and_resume(farm: Farm, clients: Clients, scenes) -> None:
    clients.start("worker", farm.address)
    farm.wait_until(connected(1), what="client")
    job_id = start_job(farm, slow_scene(scenes))
    watch_until(farm.address, job_id, lambda j: j["frames_done"] >= 2)

    assert jobs_tool(farm.address, "pause", job_id).returncode == 0
    farm.wait_until(lambda s: all(c["state"] == "idle" for c in s.farm.client_views()), what="client idle")
    paused = job_in(status_json(farm.address), job_id)
    assert paused["state"] == "paused" and paused["frames_done"] < 24

    assert jobs_tool(farm.address, "resume", job_id).returncode == 0
    done = watch_until(farm.address, job_id, lambda j: j["state"] == "done")
    assert done["frames_done"] == 24
    assert len(list((farm.output / job_id).glob("frame_*.png"))) == 24


def test_force_complete_keeps_what_exists(farm: Farm, clients: Clients, scenes) -> None:
    clients.start("worker", farm.address)
    farm.wait_until(connected(1), what="client")
    job_id = start_job(farm, slow_scene(scenes))
    watch_until(farm.address, job_id, lambda j: j["frames_done"] >= 2)

    result = jobs_tool(farm.address, "force-complete", job_id)
    assert result.returncode == 0 and "completed with" in result.stdout
    job = job_in(status_json(farm.address), job_id)
    assert job["state"] == "done" and job["forced"] is True and job["frames_done"] < 24
    farm.wait_until(lambda s: all(c["state"] == "idle" for c in s.farm.client_views()), what="client idle")
    assert len(list((farm.output / job_id).glob("frame_*.png"))) == job_in(status_json(farm.address),
                                                                             job_id)["frames_done"]


def test_priority_decides_the_order(farm: Farm, clients: Clients, animation: Path) -> None:
    # Both jobs wait for a client; the one with the higher priority is rendered first.
    low = start_job(farm, animation, "--frames", "1-6")
    high = start_job(farm, animation, "--frames", "7-12", "--priority", "5")
    clients.start("worker", farm.address)
    watch_until(farm.address, low, lambda j: j["state"] == "done")
    low_times = [p.stat().st_mtime_ns for p in (farm.output / low).glob("frame_*.png")]
    high_times = [p.stat().st_mtime_ns for p in (farm.output / high).glob("frame_*.png")]
    assert len(low_times) == 6 and len(high_times) == 6
    assert max(high_times) < min(low_times), "every frame of the high-priority job came first"


def test_queue_then_start(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("worker", farm.address)
    farm.wait_until(connected(1), what="client")
    job_id = start_job(farm, animation, "--frames", "1-3", "--queue")
    assert job_in(status_json(farm.address), job_id)["state"] == "queued"
    assert not (farm.output / job_id).exists(), "a queued job renders nothing"
    assert jobs_tool(farm.address, "resume", job_id).returncode == 0
    assert watch_until(farm.address, job_id, lambda j: j["state"] == "done")["frames_done"] == 3


def test_delete_and_clear_completed(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("worker", farm.address)
    farm.wait_until(connected(1), what="client")
    keep_files = start_job(farm, animation, "--frames", "1-2")
    drop_files = start_job(farm, animation, "--frames", "3-4")
    cleared = start_job(farm, animation, "--frames", "5-6")
    for job_id in (keep_files, drop_files, cleared):
        watch_until(farm.address, job_id, lambda j: j["state"] == "done")

    assert jobs_tool(farm.address, "delete", keep_files).returncode == 0
    result = jobs_tool(farm.address, "delete", drop_files, "--files")
    assert result.returncode == 0 and "with its files" in result.stdout
    status = status_json(farm.address)
    assert job_in(status, keep_files) is None and job_in(status, drop_files) is None
    assert len(list((farm.output / keep_files).glob("frame_*"))) == 2, "delete without --files keeps frames"
    assert not (farm.output / drop_files).exists()

    result = jobs_tool(farm.address, "clear-completed")
    assert result.returncode == 0 and "cleared 1" in result.stdout
    assert status_json(farm.address)["jobs"] == []
    assert len(list((farm.output / cleared).glob("frame_*"))) == 2

    unknown = jobs_tool(farm.address, "pause", "no-such-job")
    assert unknown.returncode == 1 and "no job" in unknown.stderr
