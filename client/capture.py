"""Capture what Blender prints while it renders a frame, to keep the tail as the frame's log.

Blender's C code writes straight to file descriptors 1 and 2, so sys.stdout cannot catch it:
the descriptors are pointed at a file for the duration of the render and restored afterwards,
and what was captured is echoed to the real output so the client's own log stays complete.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

#: How much of the end of a frame's output is kept and sent with a failure.
LOG_TAIL_BYTES = 8 * 1024
#: Lines of the whole output that match what a caller watches for (kept wherever they are, not only in the tail).
MAX_MATCHED_LINES = 64


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library handle on this platform: Python's flush must do
        pass


class Tail:
    text: str = ""

    def __init__(self) -> None:
        self.matched: list[str] = []


def _match_lines(tail: Tail, watch: re.Pattern[str], data: bytes) -> None:
    for line in data.decode("utf-8", errors="replace").splitlines():
        if len(tail.matched) >= MAX_MATCHED_LINES:
            return
        if watch.search(line):
            tail.matched.append(line)


@contextmanager
def capture_output(watch: re.Pattern[str] | None = None, path: Path | None = None) -> Iterator[Tail]:
    """Capture fds 1 and 2; the tail of the output lands in .text, lines matching `watch` in .matched.
    With `path`, the output is caught in that file (left there: a render process that crashes mid-frame
    leaves its parent the output up to the crash), else in an anonymous one."""
    tail = Tail()
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError as exc:  # no usable descriptors (an embedded interpreter): render without a log
        log.debug("output capture unavailable: %s", exc)
        yield tail
        return
    with (open(path, "w+b") if path is not None else tempfile.TemporaryFile()) as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield tail
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _flush_c_stdio()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            size = sink.seek(0, os.SEEK_END)
            sink.seek(0)
            rest = b""
            for block in iter(lambda: sink.read(1024 * 1024), b""):
                os.write(1, block)
                if watch is not None:
                    lines, _, rest = (rest + block).rpartition(b"\n")
                    _match_lines(tail, watch, lines)
            if watch is not None:
                _match_lines(tail, watch, rest)
            sink.seek(max(0, size - LOG_TAIL_BYTES))
            tail.text = sink.read().decode("utf-8", errors="replace")
