"""The client's store of job files: each file under its sha256, so nothing is downloaded twice, and
checked against its sha256 before a job uses it, so a damaged file is fetched again, not rendered."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from protocol.stream import FileSink

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A partial download untouched for this long belongs to no running client.
STALE_PARTIAL_S = 3600.0
HASH_BLOCK_BYTES = 1024 * 1024


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "microfarm"


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)


class BlendCache:
    """<root>/files/<sha256>: every file of the jobs this client rendered (.blend files and what they need);
    job folders (client.layout) under <root>/jobs link to them."""

    def __init__(self, root: Path) -> None:
        self.base = root
        self.root = root / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        # sha -> the file's identity when this process last hashed it: hashed again only when it changed.
        self._verified: dict[str, tuple[int, int, int, int]] = {}
        # Downloads a stopped client left unfinished; a live download (maybe another client's, sharing
        # this cache) writes to its file all the time, so only long-untouched ones are removed.
        for partial in self.root.glob(".incoming-*"):
            with contextlib.suppress(OSError):
                if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
                    partial.unlink()

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"invalid sha256 {sha256!r}")
        return self.root / sha256

    def lookup(self, sha256: str, size: int, name: str = "") -> Path | None:
        """The stored file if it is there, of that size, and its content still has that sha256.

        A file whose checksum no longer matches (a damaged disk, a program that wrote into a job folder)
        is removed, so that it is fetched again. Hashing is skipped for a file this process already
        verified and that has not changed since (same inode, size and modification time). `name` (the file's
        place in a job) is what the log calls it.
        """
        path = self.path(sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if stat.st_size != size:
            self._discard(path, sha256, f"is {stat.st_size} bytes, not {size}", name)
            return None
        if self._verified.get(sha256) == _identity(stat):
            return path
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(HASH_BLOCK_BYTES):
                digest.update(block)
        if digest.hexdigest() != sha256:
            self._discard(path, sha256, "no longer matches its checksum", name)
            return None
        self._verified[sha256] = _identity(stat)
        return path

    def _discard(self, path: Path, sha256: str, why: str, name: str = "") -> None:
        log.warning("stored file %s%s %s: fetching it again", f"//{name} " if name else "", sha256[:12], why)
        self._verified.pop(sha256, None)
        with contextlib.suppress(OSError):
            path.unlink()

    def sink(self, sha256: str, size: int) -> FileSink:
        self.path(sha256)
        return FileSink(self.root, size, expected_sha256=sha256)

    def commit(self, sink: FileSink, sha256: str) -> Path:
        path = self.path(sha256)
        sink.commit(path)
        # Read-only: job folders hold hard links to this very file, and nothing may write through them.
        with contextlib.suppress(OSError):
            os.chmod(path, 0o444)
        with contextlib.suppress(OSError):
            self._verified[sha256] = _identity(path.stat())  # FileSink checked the digest as it wrote
        return path
