"""Render devices: a CPU-only machine reports its CPU and renders with --device auto; a GPU that is
asked for and absent is refused at once, and a GPU-only job is never rendered on a CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, Clients, Farm, connected, repo_env, status_json, submit
from PIL import Image


def test_cpu_machine_reports_and_renders_with_auto(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("auto", farm.address, "--device", "auto", "--threads", "1")
    farm.wait_until(connected(1), what="client")
    result = submit(farm, animation, "--frames", "1-2")
    assert result.returncode == 0, result.stderr
    client = status_json(farm.address)["clients"][0]
    assert client["device"] == "CPU" and client["devices"] == ["CPU"]
    assert "auto" in clients.log("auto") or "CPU" in clients.log("auto")
    table = subprocess.run([sys.executable, "-m", "tools.status", "--server", farm.address], cwd=REPO,
                           env=repo_env(), capture_output=True, text=True, timeout=60).stdout
    assert "DEVICE" in table and " CPU " in table


def test_absent_gpu_is_refused_with_a_clear_message(farm: Farm, clients: Clients) -> None:
    for backend in ("OPTIX", "cuda"):
        proc = clients.start(f"want-{backend}", farm.address, "--device", backend)
        assert proc.wait(timeout=120) == 2
        log = clients.log(f"want-{backend}")
        assert f"{backend.upper()} was asked for, but this Blender finds no {backend.upper()} device" in log
        assert "available: CPU" in log
    assert farm.call(lambda s: len(s.farm.clients)) == 0, "a client with the wrong device never joined"


def test_gpu_job_waits_instead_of_rendering_on_a_cpu(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("cpu-only", farm.address)
    farm.wait_until(connected(1), what="client")
    result = submit(farm, animation, "--frames", "1-4", "--device", "gpu", wait=False)
    job_id = result.stdout.strip()
    # The CPU client may read the scene (probing renders nothing) but gets none of the frames.
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.value == "rendering"
                    and all(c.lease_id is None for c in s.farm.clients.values()), what="probe done, client idle")
    job = next(j for j in status_json(farm.address)["jobs"] if j["id"] == job_id)
    assert job["frames_done"] == 0 and job["device"] == "GPU"
    assert job["waiting"] == "waiting for a client that renders on a GPU"
    assert not list((farm.output / job_id).glob("frame_*"))
    # The same file without the requirement renders on that client at once.
    assert submit(farm, animation, "--frames", "1-2", "--device", "cpu").returncode == 0


def test_workbench_job_renders_headless(farm: Farm, clients: Clients, scenes) -> None:
    blend = scenes("workbench", "--frames", "3", "--engine", "BLENDER_WORKBENCH")
    clients.start("wb", farm.address)
    farm.wait_until(connected(1), what="client")
    result = submit(farm, blend)
    assert result.returncode == 0, result.stderr
    frames = sorted((farm.output / result.stdout.strip()).glob("frame_*.png"))
    assert len(frames) == 3
    with Image.open(frames[0]) as first, Image.open(frames[-1]) as last:
        assert first.size == (64, 36)
        assert first.tobytes() != last.tobytes(), "the cube moves between the first and last frame"
