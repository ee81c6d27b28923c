"""One ffmpeg for the server (server_addon.core.ffmpeg): the same binary for videos, stitched JPEGs and previews,
run with the real ffmpeg."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
import time
from pathlib import Path

import PIL
import pytest
from PIL import Image

from protocol.tiles import TileSpec
from server_addon.core import ffmpeg, stitch, video
from server_addon.core.video import VideoSettings, build_video
from server_addon.web.thumbs import Thumbnails

pytestmark = [pytest.mark.integration, pytest.mark.ffmpeg]

SYSTEM_FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(SYSTEM_FFMPEG is None, reason="ffmpeg is not installed")
TIMEOUT = 60.0


@pytest.fixture
def ffmpeg_off_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine whose PATH has no ffmpeg but whose Python has imageio-ffmpeg's: a real ffmpeg in a private folder,
    named by an `imageio_ffmpeg` module (a file on sys.path, with the package's get_ffmpeg_exe)."""
    assert SYSTEM_FFMPEG is not None
    private = tmp_path / "imageio-bin"
    private.mkdir()
    binary = private / "ffmpeg-linux64-v7"  # imageio-ffmpeg's binaries carry their platform and version
    binary.symlink_to(os.path.realpath(SYSTEM_FFMPEG))
    package = tmp_path / "site"
    package.mkdir()
    (package / "imageio_ffmpeg.py").write_text(f"def get_ffmpeg_exe():\n    return {str(binary)!r}\n")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.syspath_prepend(str(package))
    # Recorded as it was (not imported) so that the module imported from the file is forgotten after the test.
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    monkeypatch.delitem(sys.modules, "imageio_ffmpeg")
    return binary


@needs_ffmpeg
def test_path_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "ffmpeg").symlink_to(os.path.realpath(SYSTEM_FFMPEG or ""))
    monkeypatch.setenv("PATH", str(folder))
    assert ffmpeg.find() == str(folder / "ffmpeg") == video.find_ffmpeg()
    assert ffmpeg.available()


@needs_ffmpeg
def test_without_one_on_path_the_imageio_binary_serves_everyone(ffmpeg_off_path: Path) -> None:
    assert ffmpeg.find() == str(ffmpeg_off_path) == video.find_ffmpeg()
    assert ffmpeg.available()


def test_no_ffmpeg_anywhere_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # the package is not installed
    with pytest.raises(ffmpeg.FfmpegError, match=r"^ffmpeg is not installed: .*imageio-ffmpeg`\.$"):
        ffmpeg.find()
    assert not ffmpeg.available()
    with pytest.raises(stitch.StitchError, match="needs Pillow or ffmpeg"):
        stitch._ffmpeg_jpeg(tmp_path / "f.jpg", 8, 8, "RGB", bytes(8 * 8 * 3), 90)


def _png(path: Path, image: Image.Image) -> Path:
    out = io.BytesIO()
    image.save(out, "PNG")
    path.write_bytes(out.getvalue())
    return path


@needs_ffmpeg
def test_a_split_jpeg_finds_the_ffmpeg_videos_find(ffmpeg_off_path: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug: the JPEG stitch looked only on PATH, so a server whose videos worked with imageio-ffmpeg failed
    # every split JPEG frame. Without Pillow (the import fails) the JPEG is encoded by that same ffmpeg.
    spec = TileSpec(frame=1, tiles=2, height=32, margin=0)
    top, bottom = Image.new("RGB", (48, 32), (255, 0, 0)), Image.new("RGB", (48, 32), (0, 0, 255))
    tiles = [_png(tmp_path / "t0.png", top), _png(tmp_path / "t1.png", bottom)]
    with monkeypatch.context() as without_pillow:
        without_pillow.setitem(sys.modules, "PIL.Image", None)
        without_pillow.delattr(PIL, "Image")
        with pytest.raises(ImportError):
            from PIL import Image as _  # noqa: F401
        assert stitch.jpeg_encoder_available()
        out = stitch.stitch(spec, tiles, tmp_path / "frame_0001.jpg", "JPEG", quality=95)
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (48, 32)
        red, blue = image.convert("RGB").getpixel((24, 4)), image.convert("RGB").getpixel((24, 28))
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60


@needs_ffmpeg
@pytest.mark.asyncio
async def test_videos_and_previews_run_the_imageio_binary_too(ffmpeg_off_path: Path, tmp_path: Path) -> None:
    frames = [_png(tmp_path / f"frame_000{n}.png", Image.new("RGB", (32, 18), (0, 200, 0))) for n in (1, 2)]
    out = await build_video(frames, 24.0, VideoSettings(), tmp_path / "job.mp4")
    assert out.stat().st_size > 0
    Image.new("RGB", (32, 18), (0, 0, 200)).save(tmp_path / "frame_0001.tif")
    preview = await Thumbnails(tmp_path / "cache").preview("job-1", 1, tmp_path / "frame_0001.tif")
    assert preview is not None
    with Image.open(preview) as image:
        assert image.format == "PNG" and image.size == (32, 18)


@needs_ffmpeg
@pytest.mark.asyncio
async def test_run_keeps_the_tail_of_stderr(tmp_path: Path) -> None:
    assert SYSTEM_FFMPEG is not None
    ok = [*ffmpeg.quiet(SYSTEM_FFMPEG), "-y", "-f", "lavfi", "-i", "color=red:size=16x16", "-frames:v", "1",
          str(tmp_path / "red.png")]
    assert await ffmpeg.run(ok) == (0, [])
    assert (tmp_path / "red.png").is_file()
    code, tail = await ffmpeg.run([*ffmpeg.quiet(SYSTEM_FFMPEG), "-i", str(tmp_path / "nothing.png"), "-f", "null",
                                   "-"], cwd=tmp_path)
    assert code != 0 and 1 <= len(tail) <= ffmpeg.STDERR_TAIL_LINES and "nothing.png" in " ".join(tail)


@needs_ffmpeg
def test_run_blocking_feeds_stdin(tmp_path: Path) -> None:
    assert SYSTEM_FFMPEG is not None
    command = [*ffmpeg.quiet(SYSTEM_FFMPEG, stdin=True), "-y", "-f", "rawvideo", "-pix_fmt", "gray", "-s", "4x2",
               "-i", "-", "-frames:v", "1", str(tmp_path / "grey.png")]
    assert ffmpeg.run_blocking(command, input=bytes([128] * 8), timeout_s=TIMEOUT) == (0, [])
    with Image.open(tmp_path / "grey.png") as image:
        assert image.size == (4, 2) and image.convert("L").getpixel((0, 0)) == 128
    code, tail = ffmpeg.run_blocking(command[:-1] + ["/nonexistent-dir/x.png"], input=bytes(8), timeout_s=TIMEOUT)
    assert code != 0 and tail


@needs_ffmpeg
@pytest.mark.asyncio
async def test_a_timeout_kills_ffmpeg(tmp_path: Path) -> None:
    assert SYSTEM_FFMPEG is not None
    endless = [*ffmpeg.quiet(SYSTEM_FFMPEG), "-re", "-f", "lavfi", "-i", "color=black:size=16x16", "-f", "null", "-"]
    started = time.monotonic()
    with pytest.raises(ffmpeg.FfmpegTimeout, match="longer than 1 s"):
        await ffmpeg.run(endless, timeout_s=1.0)
    with pytest.raises(ffmpeg.FfmpegTimeout):
        await asyncio.to_thread(ffmpeg.run_blocking, endless, timeout_s=1.0)
    assert time.monotonic() - started < TIMEOUT


@pytest.mark.asyncio
async def test_a_binary_that_cannot_start_is_an_ffmpeg_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-ffmpeg")
    with pytest.raises(ffmpeg.FfmpegError, match=r"^ffmpeg could not be started \(.*no-ffmpeg\): .+\.$"):
        await ffmpeg.run([missing, "-version"])
    with pytest.raises(ffmpeg.FfmpegError, match=r"^ffmpeg could not be started"):
        ffmpeg.run_blocking([missing, "-version"], timeout_s=TIMEOUT)
