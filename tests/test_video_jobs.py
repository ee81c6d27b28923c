"""Videos of farm-rendered jobs, checked with ffprobe: codec, frame count, rate, even-padded size."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import Clients, Farm, connected, jobs_tool, status_json, submit

pytestmark = [pytest.mark.e2e, pytest.mark.ffmpeg]


def probe(video: Path) -> dict:
    result = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                             "stream=codec_name,width,height,r_frame_rate,nb_read_frames", "-of", "json", str(video)],
                            capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)["streams"][0]


def mean_brightness(video: Path) -> float:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                         capture_output=True, timeout=60, check=True).stdout
    return sum(raw) / len(raw)


@pytest.fixture
def odd_scene(scenes) -> Path:
    return scenes("odd30", "--frames", "12", "--size", "65x37", "--fps", "30", "--samples", "4",
                  "--view-transform", "Standard")


def test_job_video_in_three_codecs(farm: Farm, clients: Clients, odd_scene: Path) -> None:
    clients.start("v1", farm.address)
    clients.start("v2", farm.address)
    farm.wait_until(connected(2), what="clients")
    result = submit(farm, odd_scene, "--video", "h264", "--quality", "medium")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    job = next(j for j in status_json(farm.address)["jobs"] if j["id"] == job_id)
    assert job["video_state"] == "done"
    video = Path(job["video_path"])
    assert video == farm.output / job_id / f"{job_id}.mp4"
    assert probe(video) == {"codec_name": "h264", "width": 66, "height": 38, "r_frame_rate": "30/1",
                            "nb_read_frames": "12"}

    # Built again on demand with other settings.
    for codec, name, suffix, location in (("h265", "hevc", "mp4", "frames"), ("prores", "prores", "mov", "root")):
        again = jobs_tool(farm.address, "video", job_id, "--codec", codec, "--quality", "low", "--location", location)
        assert again.returncode == 0, again.stderr
        path = Path(again.stdout.strip().splitlines()[-1])
        assert path.suffix == f".{suffix}" and path.is_file()
        info = probe(path)
        assert (info["codec_name"], info["width"], info["height"], info["nb_read_frames"]) == (name, 66, 38, "12")
        assert info["r_frame_rate"] == "30/1"


def test_exr_video_matches_png_video(farm: Farm, clients: Clients, odd_scene: Path) -> None:
    clients.start("exr", farm.address)
    farm.wait_until(connected(1), what="client")
    png = submit(farm, odd_scene, "--frames", "1-4", "--video", "h264")
    exr = submit(farm, odd_scene, "--frames", "1-4", "--format", "OPEN_EXR", "--video", "h264")
    assert png.returncode == 0 and exr.returncode == 0, png.stderr + exr.stderr
    jobs = {j["id"]: j for j in status_json(farm.address)["jobs"]}
    png_video = Path(jobs[png.stdout.strip()]["video_path"])
    exr_video = Path(jobs[exr.stdout.strip()]["video_path"])
    assert sorted(p.suffix for p in exr_video.parent.glob("frame_*")) == [".exr"] * 4
    png_level, exr_level = mean_brightness(png_video), mean_brightness(exr_video)
    assert png_level > 40, "the scene is not black"
    assert abs(png_level - exr_level) < 6, (png_level, exr_level)


def test_video_of_an_incomplete_sequence_is_refused(farm: Farm, clients: Clients, odd_scene: Path) -> None:
    clients.start("solo", farm.address)
    farm.wait_until(connected(1), what="client")
    result = submit(farm, odd_scene, "--frames", "1-6")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    (farm.output / job_id / "frame_0003.png").unlink()
    again = jobs_tool(farm.address, "video", job_id)
    assert again.returncode == 1
    assert "frame 3" in again.stderr and "missing" in again.stderr
    assert not list((farm.output / job_id).glob("*.mp4"))
