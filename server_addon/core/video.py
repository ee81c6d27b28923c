"""Turn a job's finished frame sequence into a video with ffmpeg (H.264, H.265 or ProRes).

ffmpeg runs as a child process under asyncio, so a long encode never blocks the server's loop;
the video is written under a temporary name next to its destination and renamed only when
ffmpeg succeeded, so a half-written video never appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import ffmpeg as ffmpeg_binary
from .storage import frame_name, is_job_id

log = logging.getLogger(__name__)

CODECS = ("h264", "h265", "prores")
QUALITIES = ("high", "medium", "low")
#: "frames": inside the job folder, next to the frames; "parent": the job folder's parent;
#: "root": the output root. See video_path for why the last two are usually the same folder.
LOCATIONS = ("frames", "parent", "root")

#: x264/x265 CRF (lower is better) and prores_ks profile (3 HQ, 2 standard, 1 LT) per quality.
CRF = {"h264": {"high": 18, "medium": 23, "low": 28}, "h265": {"high": 20, "medium": 26, "low": 32}}
PRORES_PROFILE = {"high": 3, "medium": 2, "low": 1}
ENCODERS = {"h264": "libx264", "h265": "libx265", "prores": "prores_ks"}
#: 4:2:0 8-bit plays everywhere (browsers, phones, QuickTime); ProRes is 4:2:2 10-bit by definition.
PIXEL_FORMATS = {"h264": "yuv420p", "h265": "yuv420p", "prores": "yuv422p10le"}
CONTAINERS = {"h264": "mp4", "h265": "mp4", "prores": "mov"}

#: Formats whose pixels are scene-linear and need the sRGB transfer curve to look right on a display.
LINEAR_EXTENSIONS = frozenset({"exr"})
#: A rate this close to N*1000/1001 (and not whole) is the NTSC rate: 23.976 -> 24000/1001.
NTSC_TOLERANCE = 0.005
MISSING_SHOWN = 5
#: Even sizes are required by 4:2:0 and 4:2:2 chroma subsampling.
PAD_EVEN = "pad=ceil(iw/2)*2:ceil(ih/2)*2"
#: On the frames too, not only the encoder: prores_ks writes the frames' colour tags into the stream.
TAG_BT709 = "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709"


class VideoError(Exception):
    """A video could not be built; the message is one sentence for the user."""


@dataclass(frozen=True)
class VideoSettings:
    codec: str = "h264"
    quality: str = "high"
    location: str = "frames"

    @property
    def container(self) -> str:
        return CONTAINERS[self.codec]

    def to_wire(self) -> dict[str, Any]:
        return {"codec": self.codec, "quality": self.quality, "location": self.location}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> VideoSettings:
        """Missing keys take the defaults; an unknown value raises ValueError naming the allowed ones."""
        if not isinstance(raw, dict):
            raise ValueError(f"video settings must be a map, not {type(raw).__name__}")
        default = cls()
        values = {}
        for key, allowed in (("codec", CODECS), ("quality", QUALITIES), ("location", LOCATIONS)):
            value = raw.get(key, getattr(default, key))
            if value not in allowed:
                raise ValueError(f"video {key} must be one of {', '.join(allowed)}, not {value!r}")
            values[key] = value
        return cls(**values)


def find_ffmpeg() -> str:
    """The ffmpeg that videos, stitched JPEGs and previews all use (see ffmpeg.find)."""
    try:
        return ffmpeg_binary.find()
    except ffmpeg_binary.FfmpegError as exc:
        raise VideoError(str(exc)) from None


def frame_rate(fps: float) -> Fraction:
    """The exact rate for ffmpeg: NTSC rates become N*1000/1001, others the nearest simple fraction."""
    if not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"The scene's frame rate {fps!r} is not a positive number.")
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    if fps != round(fps) and abs(float(ntsc) - fps) < NTSC_TOLERANCE:
        return ntsc
    return Fraction(fps).limit_denominator(1001)


def video_path(output_root: Path, job_dir: Path, job_id: str, settings: VideoSettings) -> Path:
    """Where a job's video goes: <job-id>.mp4 (.mov for ProRes).

    "frames" puts it inside the job folder, "parent" in the job folder's parent and "root" in the
    output root. The server keeps job folders directly in the output root (OUTPUT/<job-id>/), so
    "parent" and "root" name the same folder today; both are kept because they differ as soon as
    frames live deeper (e.g. OUTPUT/frames/<job-id>/), and the choice a user made stays meaningful.
    """
    if not is_job_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    folder = {"frames": job_dir, "parent": job_dir.parent, "root": output_root}[settings.location]
    return folder / f"{job_id}.{settings.container}"


def check_sequence(job_dir: Path, numbers: list[int], ext: str) -> list[Path]:
    """The files frame_NNNN.ext for numbers in frame order, or VideoError naming the missing ones."""
    if not numbers:
        raise VideoError("The job has no frames to build a video from.")
    ordered = sorted(set(numbers))
    files = [job_dir / frame_name(n, ext) for n in ordered]
    missing = [n for n, path in zip(ordered, files, strict=True) if not path.is_file()]
    if missing:
        shown = ", ".join(str(n) for n in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise VideoError(f"Cannot build the video: {len(missing)} of {len(ordered)} frames are missing "
                         f"(frame {shown}{more}).")
    return files


def ffmpeg_arguments(ffmpeg: str, pattern: str, rate: Fraction, settings: VideoSettings, is_linear: bool,
                     destination: Path) -> list[str]:
    codec, quality = settings.codec, settings.quality
    # -xerror: without it ffmpeg skips a frame it cannot decode and still exits 0, a silently short video.
    args = [*ffmpeg_binary.quiet(ffmpeg), "-xerror", "-y",
            "-f", "image2", "-framerate", f"{rate.numerator}/{rate.denominator}", "-start_number", "0"]
    if is_linear:
        # A decoder option, so it goes before -i: scene-linear EXR -> sRGB display values.
        args += ["-apply_trc", "iec61966_2_1"]
    pixel_format = PIXEL_FORMATS[codec]
    # Tag and convert with BT.709 so players do not guess BT.601 and shift the colours.
    args += ["-i", pattern,
             "-vf", f"{PAD_EVEN},scale=out_color_matrix=bt709:out_range=tv,format={pixel_format},{TAG_BT709}",
             "-c:v", ENCODERS[codec], "-pix_fmt", pixel_format,
             "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv"]
    if codec == "prores":
        args += ["-profile:v", str(PRORES_PROFILE[quality]), "-vendor", "apl0"]
    else:
        args += ["-crf", str(CRF[codec][quality]), "-preset", "medium"]
    if codec == "h265":
        # hvc1 is the tag Apple's players require; x265 logs every setting unless told not to.
        args += ["-tag:v", "hvc1", "-x265-params", "log-level=error"]
    # faststart puts the index first so the video plays before it has fully downloaded.
    args += ["-movflags", "+faststart", "-f", settings.container, str(destination)]
    return args


def _link_frames(frames: list[Path], folder: Path, ext: str) -> None:
    """Number the frames 000000, 000001, ... in folder, whatever their own numbers were.

    Why this and not the concat demuxer: image2 over a gapless numbered sequence gets exact
    timestamps from -framerate (a rational), whereas concat's per-file `duration` is decimal
    seconds that drift at 24000/1001 and drop the last file's duration; concat also needs every
    path quoted and escaped and `-safe 0`. ffmpeg runs inside folder with a relative pattern, so a
    '%' in the user's output path cannot be read as part of the pattern.
    """
    for index, frame in enumerate(frames):
        link = folder / f"{index:06d}.{ext}"
        target = frame.resolve()
        try:
            os.symlink(target, link)
        except OSError:  # Windows without the symlink privilege: a hard link, else a copy
            try:
                os.link(target, link)
            except OSError:
                shutil.copyfile(target, link)


async def build_video(frames: list[Path], fps: float, settings: VideoSettings, output: Path, *,
                      ffmpeg: str | None = None, is_linear: bool | None = None) -> Path:
    """Encode frames (existing files, in video order) into output; returns output.

    is_linear None means "EXR frames are linear, others are display-referred". Cancelling the
    call stops ffmpeg and leaves no file behind.
    """
    if not frames:
        raise VideoError("The job has no frames to build a video from.")
    exts = {frame.suffix.lower().lstrip(".") for frame in frames}
    if len(exts) != 1:
        raise VideoError(f"Cannot build a video from frames of mixed formats ({', '.join(sorted(exts))}).")
    ext = exts.pop()
    linear = ext in LINEAR_EXTENSIONS if is_linear is None else is_linear
    rate = frame_rate(fps)
    executable = ffmpeg or find_ffmpeg()
    log.info("video %s: encoding %d frames at %s fps (%s, %s quality, linear=%s)",
             output.name, len(frames), rate, settings.codec, settings.quality, linear)
    # Not mkstemp: its 0600 file would become a video that other users of a share cannot open.
    partial = output.with_name(f".{output.name}.{secrets.token_hex(4)}.part")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.frames.") as links:
            await asyncio.to_thread(_link_frames, frames, Path(links), ext)
            args = ffmpeg_arguments(executable, f"%06d.{ext}", rate, settings, linear, partial)
            code, tail = await ffmpeg_binary.run(args, cwd=Path(links))
        if code != 0:
            detail = " / ".join(tail) or "no error output"
            raise VideoError(f"ffmpeg could not build {output.name} (exit status {code}): {detail}")
        os.replace(partial, output)
    except ffmpeg_binary.FfmpegError as exc:
        raise VideoError(str(exc)) from None
    except OSError as exc:
        raise VideoError(f"Cannot write the video {output}: {exc.strerror or exc}.") from exc
    finally:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            partial.unlink()
    log.info("video %s: done, %d bytes", output, output.stat().st_size)
    return output


def remove_leftovers(folder: Path) -> int:
    """Delete what a video build killed half-way left in a folder (call before any build starts)."""
    removed = 0
    for container in set(CONTAINERS.values()):
        for partial in folder.glob(f".*.{container}.*.part"):
            partial.unlink(missing_ok=True)
            removed += 1
        for links in folder.glob(f".*.{container}.frames.*"):
            shutil.rmtree(links, ignore_errors=True)
            removed += 1
    return removed
