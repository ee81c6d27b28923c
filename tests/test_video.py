"""The MP4/MOV builder with the real ffmpeg: what ffprobe and a decoded picture say about the result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from server_addon.core import video
from server_addon.core.video import (
    CODECS,
    LOCATIONS,
    QUALITIES,
    VideoError,
    VideoSettings,
    build_video,
    check_sequence,
    find_ffmpeg,
    frame_rate,
    video_path,
)

pytestmark = pytest.mark.unit

TIMEOUT = 60
#: A cancelled build must have stopped ffmpeg well within this.
STOP_TIMEOUT = 10
ODD_SIZE = (65, 37)
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
#: Linear 0.214 is sRGB 0.5, i.e. 128 of 255 on a display.
LINEAR_HALF_GREY = 0.214
SRGB_HALF_GREY = 128
LEVELS = 4
COLOUR_TOLERANCE = 16

EXR_SCRIPT = """
import sys, bpy
size_x, size_y, value = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
scene = bpy.context.scene
scene.render.image_settings.file_format = "OPEN_EXR"
for path in sys.argv[4:]:
    image = bpy.data.images.new("frame", size_x, size_y, alpha=True, float_buffer=True)
    image.pixels.foreach_set([value, value, value, 1.0] * (size_x * size_y))
    image.save_render(path, scene=scene)  # the render writer: scene-linear, as a farm's frames are
"""

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="ffmpeg and ffprobe are not installed")


def png_frames(folder: Path, numbers: list[int], colours: list[tuple[int, int, int]],
               size: tuple[int, int] = ODD_SIZE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for number, colour in zip(numbers, colours, strict=True):
        Image.new("RGB", size, colour).save(folder / f"frame_{number:04d}.png")
    return check_sequence(folder, numbers, "png")


def exr_frames(folder: Path, numbers: list[int], size: tuple[int, int], value: float) -> list[Path]:
    """Frames written by real Blender (bpy in its own process, so this one stays clean)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"frame_{n:04d}.exr") for n in numbers]
    subprocess.run([sys.executable, "-c", EXR_SCRIPT, str(size[0]), str(size[1]), str(value), *paths],
                   check=True, capture_output=True, timeout=120)
    return check_sequence(folder, numbers, "exr")


def probe(path: Path) -> dict[str, str]:
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                           "stream=codec_name,codec_tag_string,width,height,r_frame_rate,nb_read_frames,pix_fmt",
                           "-of", "json", str(path)], check=True, capture_output=True, text=True, timeout=TIMEOUT)
    return json.loads(done.stdout)["streams"][0]


def decode(path: Path) -> list[bytes]:
    """Every frame of the video as rgb24 bytes."""
    info = probe(path)
    done = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "rawvideo", "-pix_fmt",
                           "rgb24", "-"], check=True, capture_output=True, timeout=TIMEOUT)
    size = int(info["width"]) * int(info["height"]) * 3
    return [done.stdout[i:i + size] for i in range(0, len(done.stdout), size)]


def mean_colour(frame: bytes) -> tuple[float, float, float]:
    count = len(frame) // 3
    return tuple(sum(frame[channel::3]) / count for channel in range(3))  # type: ignore[return-value]


def top_level_boxes(path: Path) -> list[str]:
    """The order of an MP4/MOV file's top-level boxes (faststart puts moov before mdat)."""
    names, data, offset = [], path.read_bytes(), 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        names.append(data[offset + 4:offset + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        if size < 8:
            break
        offset += size
    return names


@pytest.mark.integration
@pytest.mark.ffmpeg
@needs_ffmpeg
@pytest.mark.asyncio
@pytest.mark.parametrize(("codec", "codec_name", "tag", "pix_fmt", "suffix"), [
    ("h264", "h264", "avc1", "yuv420p", ".mp4"),
    ("h265", "hevc", "hvc1", "yuv420p", ".mp4"),  # hvc1, not hev1: what Apple's players need
    ("prores", "prores", "apcn", "yuv422p10le", ".mov"),  # apcn: ProRes 422 standard, the "medium" quality
])
async def test_each_codec_makes_a_video_of_every_frame(tmp_path, codec, codec_name, tag, pix_fmt, suffix):
    job_dir = tmp_path / "job-1"
    frames = png_frames(job_dir, list(range(1, 13)), [(20 * i, 100, 200 - 10 * i) for i in range(12)])
    settings = VideoSettings(codec=codec, quality="medium", location="parent")
    out = await build_video(frames, 30.0, settings, video_path(tmp_path, job_dir, "job-1", settings))

    assert out == tmp_path / f"job-1{suffix}"
    info = probe(out)
    assert info == {"codec_name": codec_name, "codec_tag_string": tag, "width": 66, "height": 38, "pix_fmt": pix_fmt,
                    "r_frame_rate": "30/1", "nb_read_frames": "12"}
    boxes = top_level_boxes(out)
    assert boxes.index("moov") < boxes.index("mdat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-1", out.name]  # no temporary files left
    plain = tmp_path / "plain"
    plain.touch()
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # as readable as any file made here
    assert len(list(job_dir.iterdir())) == 12


@pytest.mark.integration
@pytest.mark.ffmpeg
@needs_ffmpeg
@pytest.mark.asyncio
async def test_stepped_frames_become_consecutive_video_frames_in_order(tmp_path):
    colours = [RED, GREEN, BLUE, YELLOW]
    frames = png_frames(tmp_path / "job", [1, 4, 7, 10], colours, size=(64, 36))
    out = await build_video(frames, 24.0, VideoSettings(), tmp_path / "job" / "job.mp4")

    decoded = decode(out)
    assert len(decoded) == len(colours)
    for frame, colour in zip(decoded, colours, strict=True):
        assert all(abs(got - want) < COLOUR_TOLERANCE for got, want in zip(mean_colour(frame), colour, strict=True))


def test_a_missing_frame_is_refused_by_number(tmp_path):
    job_dir = tmp_path / "job"
    png_frames(job_dir, [1, 2, 4, 6], [RED] * 4)
    with pytest.raises(VideoError) as caught:
        check_sequence(job_dir, [1, 2, 3, 4, 5, 6], "png")
    assert str(caught.value) == "Cannot build the video: 2 of 6 frames are missing (frame 3, 5)."
    assert sorted(p.suffix for p in job_dir.iterdir()) == [".png"] * 4


def test_many_missing_frames_are_summarised(tmp_path):
    with pytest.raises(VideoError, match=r"10 of 10 frames are missing \(frame 1, 2, 3, 4, 5 and 5 more\)\.$"):
        check_sequence(tmp_path, list(range(1, 11)), "png")


def test_check_sequence_returns_frames_in_frame_order(tmp_path):
    png_frames(tmp_path, [1, 4, 7, 10], [RED] * 4)
    names = [p.name for p in check_sequence(tmp_path, [10, 1, 7, 4, 7], "png")]
    assert names == ["frame_0001.png", "frame_0004.png", "frame_0007.png", "frame_0010.png"]


@pytest.mark.integration
@pytest.mark.ffmpeg
@pytest.mark.bpy
@needs_ffmpeg
@pytest.mark.asyncio
async def test_linear_exr_looks_like_the_same_srgb_png(tmp_path):
    size = (64, 36)
    exr = exr_frames(tmp_path / "exr", [1, 2], size, LINEAR_HALF_GREY)
    png = png_frames(tmp_path / "png", [1, 2], [(SRGB_HALF_GREY,) * 3] * 2, size=size)

    exr_video = await build_video(exr, 24.0, VideoSettings(), tmp_path / "exr.mp4")
    png_video = await build_video(png, 24.0, VideoSettings(), tmp_path / "png.mp4")
    raw_video = await build_video(exr, 24.0, VideoSettings(), tmp_path / "raw.mp4", is_linear=False)

    exr_grey = [sum(mean_colour(frame)) / 3 for frame in decode(exr_video)]
    png_grey = [sum(mean_colour(frame)) / 3 for frame in decode(png_video)]
    assert len(exr_grey) == len(png_grey) == 2
    assert all(abs(grey - SRGB_HALF_GREY) <= LEVELS for grey in exr_grey), exr_grey
    assert all(abs(e - p) <= LEVELS for e, p in zip(exr_grey, png_grey, strict=True)), (exr_grey, png_grey)
    # Without the transfer curve the same frames come out far too dark (linear 0.214 shown as 55/255).
    assert max(sum(mean_colour(frame)) / 3 for frame in decode(raw_video)) < SRGB_HALF_GREY - 40


@pytest.mark.integration
@pytest.mark.ffmpeg
@needs_ffmpeg
@pytest.mark.asyncio
async def test_ntsc_frame_rate_is_exact(tmp_path):
    frames = png_frames(tmp_path / "job", [1, 2, 3], [RED, GREEN, BLUE])
    out = await build_video(frames, 23.976, VideoSettings(codec="h264", quality="low"), tmp_path / "job.mp4")
    assert probe(out)["r_frame_rate"] == "24000/1001"


@pytest.mark.parametrize(("fps", "expected"), [
    (23.976, Fraction(24000, 1001)), (24 / 1.001, Fraction(24000, 1001)), (29.97, Fraction(30000, 1001)),
    (59.94, Fraction(60000, 1001)), (24.0, Fraction(24)), (30.0, Fraction(30)), (1.0, Fraction(1)),
    (12.5, Fraction(25, 2)), (23.98, Fraction(24000, 1001)), (23.9, Fraction(239, 10)),
])
def test_frame_rate_as_a_fraction(fps, expected):
    assert frame_rate(fps) == expected


@pytest.mark.parametrize("fps", [0.0, -24.0, math.nan, math.inf])
def test_frame_rate_must_be_positive(fps):
    with pytest.raises(VideoError, match="frame rate"):
        frame_rate(fps)


@pytest.mark.integration
@pytest.mark.ffmpeg
@needs_ffmpeg
@pytest.mark.asyncio
async def test_ffmpeg_failure_reports_its_error_and_keeps_the_old_video(tmp_path):
    job_dir = tmp_path / "job"
    frames = png_frames(job_dir, [1, 2, 3], [RED, GREEN, BLUE])
    frames[1].write_bytes(b"this is not a png")
    out = job_dir / "job.mp4"
    out.write_bytes(b"previous video")

    with pytest.raises(VideoError, match=r"^ffmpeg could not build job\.mp4 \(exit status [1-9]\d*\): .+") as caught:
        await build_video(frames, 24.0, VideoSettings(), out)
    assert "png" in str(caught.value).lower() or "invalid" in str(caught.value).lower()
    assert out.read_bytes() == b"previous video"
    assert sorted(p.name for p in job_dir.iterdir()) == ["frame_0001.png", "frame_0002.png", "frame_0003.png",
                                                          "job.mp4"]


@pytest.mark.integration
@pytest.mark.asyncio
async def test_cancelling_stops_ffmpeg_and_leaves_nothing(tmp_path):
    frames = png_frames(tmp_path / "job", [1, 2], [RED, GREEN])
    sock = tmp_path / "s.sock"
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(f"#!{sys.executable}\nimport os, signal, socket\n"
                    f"s = socket.socket(socket.AF_UNIX)\ns.connect({str(sock)!r})\n"
                    "s.sendall(str(os.getpid()).encode())\ns.close()\nsignal.pause()\n")
    fake.chmod(0o755)
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started.set_result(int(await reader.read()))
        writer.close()

    server = await asyncio.start_unix_server(on_connect, path=str(sock))
    async with server:
        task = asyncio.create_task(build_video(frames, 24.0, VideoSettings(), tmp_path / "out" / "job.mp4",
                                               ffmpeg=str(fake)))
        pid = await asyncio.wait_for(started, TIMEOUT)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
    try:
        assert done == {task} and task.cancelled()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.integration
@pytest.mark.ffmpeg
@needs_ffmpeg
@pytest.mark.asyncio
async def test_frames_are_copied_where_links_are_not_allowed(tmp_path, monkeypatch):
    def refuse(*args: object) -> None:
        raise PermissionError("links are not allowed here")

    monkeypatch.setattr(video.os, "symlink", refuse)
    monkeypatch.setattr(video.os, "link", refuse)
    frames = png_frames(tmp_path / "job", [2, 4, 6], [RED, GREEN, BLUE], size=(64, 36))
    out = await build_video(frames, 24.0, VideoSettings(), tmp_path / "job.mp4")
    assert [max(range(3), key=mean_colour(frame).__getitem__) for frame in decode(out)] == [0, 1, 2]


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_missing_ffmpeg_binary_is_a_video_error(tmp_path):
    frames = png_frames(tmp_path / "job", [1], [RED])
    with pytest.raises(VideoError, match="ffmpeg could not be started"):
        await build_video(frames, 24.0, VideoSettings(), tmp_path / "job.mp4", ffmpeg=str(tmp_path / "nope"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


@pytest.mark.asyncio
async def test_an_unwritable_destination_is_a_video_error(tmp_path):
    frames = png_frames(tmp_path / "job", [1], [RED])
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(VideoError, match=r"^Cannot write the video .*taken/job\.mp4: .+\.$"):
        await build_video(frames, 24.0, VideoSettings(), tmp_path / "taken" / "job.mp4")


@pytest.mark.asyncio
async def test_mixed_frame_formats_are_refused(tmp_path):
    frames = [tmp_path / "frame_0001.png", tmp_path / "frame_0002.jpg"]
    with pytest.raises(VideoError, match=r"mixed formats \(jpg, png\)"):
        await build_video(frames, 24.0, VideoSettings(), tmp_path / "job.mp4")


def test_find_ffmpeg_prefers_path_then_imageio(monkeypatch, tmp_path):
    if shutil.which("ffmpeg"):
        assert find_ffmpeg() == shutil.which("ffmpeg")
    monkeypatch.setenv("PATH", str(tmp_path))
    fake = type(sys)("imageio_ffmpeg")
    fake.get_ffmpeg_exe = lambda: "/opt/imageio/ffmpeg"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", fake)
    assert find_ffmpeg() == "/opt/imageio/ffmpeg"
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes the import fail
    with pytest.raises(VideoError, match="^ffmpeg is not installed: .*imageio-ffmpeg"):
        find_ffmpeg()


def test_settings_round_trip_and_defaults():
    for codec in CODECS:
        for quality in QUALITIES:
            for location in LOCATIONS:
                settings = VideoSettings(codec, quality, location)
                assert VideoSettings.from_wire(settings.to_wire()) == settings
    assert VideoSettings.from_wire({}) == VideoSettings("h264", "high", "frames")


@pytest.mark.parametrize(("raw", "message"), [
    ({"codec": "vp9"}, "video codec must be one of h264, h265, prores, not 'vp9'"),
    ({"quality": "ultra"}, "video quality must be one of high, medium, low, not 'ultra'"),
    ({"location": "../etc"}, "video location must be one of frames, parent, root, not '../etc'"),
    ({"codec": None}, "video codec must be one of"),
    ([], "video settings must be a map"),
])
def test_settings_reject_unknown_values(raw, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '.').replace(')', '.')}"):
        VideoSettings.from_wire(raw)


def test_video_path_by_location(tmp_path):
    root = tmp_path / "out"
    job_dir = root / "shot-1a2b3c"
    paths = {location: video_path(root, job_dir, "shot-1a2b3c", VideoSettings("h264", "high", location))
             for location in LOCATIONS}
    assert paths == {"frames": job_dir / "shot-1a2b3c.mp4", "parent": root / "shot-1a2b3c.mp4",
                     "root": root / "shot-1a2b3c.mp4"}
    nested = video_path(root, root / "frames" / "j", "j", VideoSettings("prores", "low", "parent"))
    assert nested == root / "frames" / "j.mov"
    with pytest.raises(ValueError, match="invalid job id"):
        video_path(root, job_dir, "../x", VideoSettings())


def test_arguments_follow_the_settings():
    args = video.ffmpeg_arguments("ffmpeg", "%06d.exr", Fraction(24000, 1001), VideoSettings("h265", "low"),
                                  True, Path("/o/v.mp4"))
    assert args.index("-apply_trc") < args.index("-i")
    assert args[args.index("-crf") + 1] == "32"
    assert args[args.index("-framerate") + 1] == "24000/1001"
    prores = video.ffmpeg_arguments("ffmpeg", "%06d.png", Fraction(25), VideoSettings("prores", "high"),
                                    False, Path("/o/v.mov"))
    assert "-apply_trc" not in prores
    assert prores[prores.index("-profile:v") + 1] == "3"
    assert prores[prores.index("-f", prores.index("-i")) + 1] == "mov"


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    from server_addon.core.video import remove_leftovers
    (tmp_path / ".job-1.mp4.1a2b3c4d.part").write_bytes(b"half a video")
    (tmp_path / ".job-1.mov.frames.xyz").mkdir()
    (tmp_path / ".job-1.mov.frames.xyz" / "000000.png").write_bytes(b"link")
    keep = [tmp_path / "job-1.mp4", tmp_path / "frame_0001.png", tmp_path / ".hidden-user-file"]
    for path in keep:
        path.write_bytes(b"keep")
    assert remove_leftovers(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
