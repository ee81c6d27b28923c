"""Persistent data: a job that keeps Cycles' render data between the frames a warm client renders.

The option travels as data (request, assignment, web form, submit tool) and the real client turns
`render.use_persistent_data` on for that job; its frames equal, pixel for pixel, a plain local render of the same
file, also where the camera moved between frames rendered from the same kept scene.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Clients, Farm, connected, repo_env, submit
from PIL import Image

from protocol.errors import ProtocolError
from protocol.settings import JobRequest, SceneInfo, SettingsError, resolve, validate_assignment
from server_addon.web.upload import parse_options
from tools.submit import build_settings, parse_args

FRAMES = 6
PERSISTENT_LOG = "persistent data on (the job's setting)"


def _scene() -> SceneInfo:
    return SceneInfo(scene="Scene", engine="CYCLES", frame_start=1, frame_end=FRAMES, frame_step=1, fps=24.0,
                     resolution_x=64, resolution_y=36, percentage=100, file_format="PNG")


@pytest.mark.unit
def test_the_option_travels_from_request_to_assignment() -> None:
    request = JobRequest.from_wire({"persistent_data": True})
    assert request.persistent_data and JobRequest.from_wire(request.to_wire()) == request
    assert validate_assignment(resolve(request, _scene()).to_assignment()).persistent_data
    assert not validate_assignment(resolve(JobRequest(), _scene()).to_assignment()).persistent_data
    assert not JobRequest.from_wire({}).persistent_data
    assert not validate_assignment({"file_format": "PNG"}).persistent_data  # a server that does not send it
    with pytest.raises(SettingsError, match="persistent_data"):
        JobRequest.from_wire({"persistent_data": "yes"})
    with pytest.raises(ProtocolError, match="persistent_data"):
        validate_assignment({"file_format": "PNG", "persistent_data": 1})


@pytest.mark.unit
def test_the_web_form_and_the_submit_tool_ask_for_it() -> None:
    assert parse_options({"persistent_data": "1"}).request.persistent_data
    assert not parse_options({}).request.persistent_data
    on = parse_args(["shot.blend", "--server", "127.0.0.1:1", "--persistent-data"])
    off = parse_args(["shot.blend", "--server", "127.0.0.1:1"])
    assert build_settings(on)["persistent_data"] is True
    assert build_settings(off)["persistent_data"] is False


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.int16)


@pytest.mark.e2e
def test_frames_with_persistent_data_equal_a_local_render(farm: Farm, clients: Clients, scenes,
                                                          tmp_path: Path) -> None:
    # A static scene seen by a moving camera, with a texture and a sphere that the kept scene carries over.
    blend = scenes("persist6", "--frames", str(FRAMES), "--size", "64x36", "--samples", "4", "--camera-move",
                   "--subdivisions", "3", "--texture", "64")
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "tools.render_local", str(blend), "1", str(FRAMES), str(local)], cwd=REPO,
                   env=repo_env(), check=True, capture_output=True, timeout=180)
    clients.start("keeper", farm.address)
    farm.wait_until(connected(1), what="the client")
    # Two chunks: the second assignment is applied to the file that is still open, with its data kept.
    result = submit(farm, blend, "--frames", f"1-{FRAMES}", "--chunk", str(FRAMES // 2), "--persistent-data")
    assert result.returncode == 0, result.stderr + clients.log("keeper")[-3000:]
    job_id = result.stdout.strip()
    assert farm.job(job_id)["persistent_data"] is True

    log = clients.log("keeper")
    assert log.count(PERSISTENT_LOG) == 1, log[-3000:]  # turned on once, kept for the second chunk
    frames = sorted((farm.output / job_id).glob("frame_*.png"))
    assert [f.name for f in frames] == [f"frame_{n:04d}.png" for n in range(1, FRAMES + 1)]
    for frame in frames:
        assert np.array_equal(_pixels(frame), _pixels(local / frame.name)), f"{frame.name} differs from local"
    # The camera moved: a stale kept camera would have rendered the same picture again.
    assert not np.array_equal(_pixels(frames[0]), _pixels(frames[-1]))
