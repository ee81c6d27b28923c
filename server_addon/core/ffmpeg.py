"""ffmpeg for the whole server: which binary runs (one search order for videos, stitched JPEGs and previews)
and how it runs (a child process whose last lines of stderr are kept, killed when its caller gives up).

The search: the system's ffmpeg on PATH, else the binary the imageio-ffmpeg package ships (pip-installable,
for machines without one). Both runners keep only the tail of stderr, never the whole output.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

#: Lines of ffmpeg's stderr kept to explain a failure.
STDERR_TAIL_LINES = 8


class FfmpegError(Exception):
    """ffmpeg is missing, could not be started or took too long; the message is one sentence for the user."""


class FfmpegTimeout(FfmpegError):
    """ffmpeg ran past its time and was killed."""


def find() -> str:
    """The system's ffmpeg on PATH, else the binary shipped by the imageio-ffmpeg package."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # optional: a pip-installable ffmpeg for machines without one

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError, OSError):
        raise FfmpegError("ffmpeg is not installed: install it with your system's package manager "
                          "or run `pip install imageio-ffmpeg`.") from None


def available() -> bool:
    try:
        find()
    except FfmpegError:
        return False
    return True


def quiet(executable: str, *, stdin: bool = False) -> list[str]:
    """The start of every command line: no banner, errors only, and no reading of stdin unless it is the input."""
    return [executable, "-hide_banner", *(() if stdin else ("-nostdin",)), "-loglevel", "error"]


def _tail(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-STDERR_TAIL_LINES:]


def _not_started(args: Sequence[str], exc: OSError) -> FfmpegError:
    return FfmpegError(f"ffmpeg could not be started ({args[0]}): {exc.strerror or exc}.")


async def run(args: Sequence[str], *, cwd: Path | None = None, timeout_s: float | None = None
              ) -> tuple[int, list[str]]:
    """Run ffmpeg under asyncio; (exit status, last lines of stderr). Cancelling the caller or passing timeout_s
    (FfmpegTimeout) kills it."""
    try:
        proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise _not_started(args, exc) from None
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    async def read() -> int:
        assert proc.stderr is not None
        async for line in proc.stderr:
            text = line.decode(errors="replace").strip()
            if text:
                tail.append(text)
        return await proc.wait()

    try:
        async with asyncio.timeout(timeout_s):
            return await read(), list(tail)
    except TimeoutError:
        raise FfmpegTimeout(f"ffmpeg took longer than {timeout_s:.0f} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())


def run_blocking(args: Sequence[str], *, input: bytes = b"", timeout_s: float) -> tuple[int, list[str]]:
    """Run ffmpeg on this thread (never the event loop) with `input` on its stdin; (exit status, last lines of
    stderr). Past timeout_s it is killed: FfmpegTimeout."""
    try:
        result = subprocess.run(list(args), input=input, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FfmpegTimeout(f"ffmpeg took longer than {timeout_s:.0f} s") from None
    except OSError as exc:
        raise _not_started(args, exc) from None
    return result.returncode, _tail(result.stderr.decode(errors="replace"))
