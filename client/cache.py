"""The client's .blend cache: files stored under their sha256, so nothing is downloaded twice."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from protocol.stream import FileSink

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A partial download untouched for this long belongs to no running client.
STALE_PARTIAL_S = 3600.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "microfarm"


class BlendCache:
    def __init__(self, root: Path) -> None:
        self.root = root / "blends"
        self.root.mkdir(parents=True, exist_ok=True)
        # Downloads a stopped client left unfinished; a live download (maybe another client's, sharing
        # this cache) writes to its file all the time, so only long-untouched ones are removed.
        for partial in self.root.glob(".incoming-*"):
            with contextlib.suppress(OSError):
                if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
                    partial.unlink()

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"invalid sha256 {sha256!r}")
        return self.root / f"{sha256}.blend"

    def lookup(self, sha256: str, size: int) -> Path | None:
        """The cached file, if it is there with the expected size (it was verified when written)."""
        path = self.path(sha256)
        try:
            return path if path.stat().st_size == size else None
        except FileNotFoundError:
            return None

    def sink(self, sha256: str, size: int) -> FileSink:
        self.path(sha256)
        return FileSink(self.root, size, expected_sha256=sha256)

    def commit(self, sink: FileSink, sha256: str) -> Path:
        path = self.path(sha256)
        sink.commit(path)
        return path
