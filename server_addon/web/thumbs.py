"""Preview images of a job's latest frame.

PNG, JPEG, WebP and BMP frames are shown as they are. Other formats (EXR, TIFF, Targa) are turned
into a small PNG by ffmpeg, run as a child process so the loop never waits on it, cached under the
server's data folder and made once per frame even when several pages ask at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path

from ..core import ffmpeg
from ..core.video import LINEAR_EXTENSIONS

log = logging.getLogger(__name__)

#: Frame formats a browser shows directly.
BROWSER_IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp"})
THUMBNAIL_WIDTH = 320
THUMBNAIL_TIMEOUT_S = 30.0


class Thumbnails:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._making: dict[Path, asyncio.Task[Path | None]] = {}

    def clear(self) -> None:
        """Forget old previews (of jobs that may be gone); they are cheap to make again."""
        if self.cache_dir.is_dir():
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    async def preview(self, job_id: str, number: int, frame: Path) -> Path | None:
        """A file the browser can show for this frame, or None when there is none."""
        ext = frame.suffix.lower().lstrip(".")
        if ext in BROWSER_IMAGE_EXTENSIONS:
            return frame
        try:
            stamp = frame.stat().st_mtime_ns
        except OSError:
            return None
        target = self.cache_dir / f"{job_id}-{number}-{stamp}.png"
        if target.is_file():
            return target
        task = self._making.get(target)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._make(job_id, frame, target, ext in LINEAR_EXTENSIONS))
            self._making[target] = task
            task.add_done_callback(lambda _: self._making.pop(target, None))
        return await asyncio.shield(task)

    async def _make(self, job_id: str, frame: Path, target: Path, linear: bool) -> Path | None:
        try:
            executable = ffmpeg.find()
        except ffmpeg.FfmpegError as exc:
            log.info("job %s: no preview of %s: %s", job_id, frame.name, exc)
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        args = [*ffmpeg.quiet(executable), "-y"]
        if linear:
            args += ["-apply_trc", "iec61966_2_1"]  # scene-linear EXR -> sRGB display values
        args += ["-i", str(frame), "-frames:v", "1", "-vf", f"scale='min({THUMBNAIL_WIDTH},iw)':-2",
                 "-f", "image2", "-c:v", "png", str(partial)]
        try:
            code, tail = await ffmpeg.run(args, timeout_s=THUMBNAIL_TIMEOUT_S)
        except ffmpeg.FfmpegTimeout:
            log.warning("job %s: ffmpeg took over %.0f s to preview %s", job_id, THUMBNAIL_TIMEOUT_S, frame.name)
            return None
        except ffmpeg.FfmpegError as exc:
            log.warning("job %s: no preview of %s: %s", job_id, frame.name, exc)
            return None
        if code != 0 or not partial.is_file():
            log.warning("job %s: ffmpeg could not preview %s: %s", job_id, frame.name,
                        tail[-1] if tail else "no error output")
            with contextlib.suppress(OSError):
                partial.unlink()
            return None
        os.replace(partial, target)
        return target
