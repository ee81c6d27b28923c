"""Where files live on the server, and the rules that keep network input inside those places.

No name that arrives from the network becomes a path directly: job ids are generated here and
checked against a strict pattern, frame file names are built from an integer and an extension
from a fixed list, and job files (.blend files and what they need) are stored under their own sha256.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from protocol.settings import IMAGE_FORMATS
from protocol.stream import FileSink
from protocol.tiles import SPLIT_FORMATS
from protocol.units import human_bytes

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SLUG_DROP = re.compile(r"[^a-z0-9]+")
_EXTENSIONS = frozenset(IMAGE_FORMATS.values())
#: Temporary files of uploads in progress start with this (see protocol.stream.FileSink).
PARTIAL_PREFIX = ".incoming-"
#: The hidden folder inside a job's folder where the tiles of a split frame wait to be stitched.
TILES_DIR = ".tiles"
_TILE_EXTENSIONS = frozenset(SPLIT_FORMATS.values())
#: An upload is accepted only if the store's disk keeps at least this much free after it (the job database,
#: frames and videos live on the same disk more often than not).
FREE_SPACE_MARGIN_BYTES = 256 * 2**20
#: Files in the content store are read-only: one file serves every job with those bytes.
STORED_MODE = 0o444


class UnsafeName(ValueError):
    """A name from the network that must not become part of a path."""


class StoreFull(ValueError):
    """The store's disk has no room for the files a submission would add (the message says how much)."""


def is_job_id(text: str) -> bool:
    return bool(_JOB_ID.fullmatch(text))


def is_sha256(text: str) -> bool:
    return bool(_SHA256.fullmatch(text))


def new_job_id(name: str) -> str:
    """A readable, unique, path-safe id: the job name's slug and a random suffix."""
    stem = Path(name).stem if name else ""
    slug = _SLUG_DROP.sub("-", stem.lower()).strip("-")[:40] or "job"
    return f"{slug}-{secrets.token_hex(3)}"


def frame_name(number: int, ext: str) -> str:
    if ext not in _EXTENSIONS:
        raise UnsafeName(f"unknown frame extension {ext!r}")
    return f"frame_{number:04d}.{ext}"


def tile_name(frame: int, index: int, ext: str) -> str:
    if ext not in _TILE_EXTENSIONS:
        raise UnsafeName(f"unknown tile extension {ext!r}")
    return f"tile_{frame:04d}_{index:04d}.{ext}"


def _inside(root: Path, path: Path) -> Path:
    """`path` (under the resolved `root` by its name) as it resolves, refused if a link leads it outside.

    Only the parts below root are looked at (root itself was resolved once): one lstat each, and a full
    resolve only where one of them is a symbolic link. A frame is stored with 2 lstats, not 20."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise UnsafeName(f"{path} is outside {root}") from None
    current = root
    for part in parts:
        if part in (os.curdir, os.pardir):
            raise UnsafeName(f"{path} is outside {root}")
        current = current / part
        try:
            linked = stat.S_ISLNK(os.lstat(current).st_mode)
        except FileNotFoundError:
            return path  # nothing below a missing part exists: no link can lead anywhere from there
        if linked:
            resolved = path.resolve()
            if resolved != root and root not in resolved.parents:
                raise UnsafeName(f"{path} is outside {root}")
            return resolved
    return path


class OutputStore:
    """The output directory: one folder per job holding frame_NNNN.ext files."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise UnsafeName(f"invalid job id {job_id!r}")
        return _inside(self.root, self.root / job_id)

    def frame_path(self, job_id: str, number: int, ext: str) -> Path:
        return _inside(self.root, self.job_dir(job_id) / frame_name(number, ext))

    def tiles_dir(self, job_id: str) -> Path:
        return _inside(self.root, self.job_dir(job_id) / TILES_DIR)

    def tile_path(self, job_id: str, frame: int, index: int, ext: str) -> Path:
        return _inside(self.root, self.tiles_dir(job_id) / tile_name(frame, index, ext))

    def commit_tile(self, sink: FileSink, job_id: str, frame: int, index: int, ext: str) -> Path:
        destination = self.tile_path(job_id, frame, index, ext)
        destination.parent.mkdir(exist_ok=True)
        sink.commit(destination)
        return destination

    def frame_sink(self, job_id: str, size: int) -> FileSink:
        """A temporary file inside the job's folder, so the final rename stays on one filesystem."""
        return FileSink(self.job_dir(job_id), size)

    def remove_partials(self, job_id: str) -> int:
        """Delete uploads that a stopped server left half-written in a job's folder."""
        removed = 0
        for partial in self.job_dir(job_id).glob(f"{PARTIAL_PREFIX}*"):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed

    def commit_frame(self, sink: FileSink, job_id: str, number: int, ext: str) -> Path:
        # Only the folder is checked: a rename replaces a link of the frame's name, it never follows it (one lstat
        # a frame instead of three; a stored frame is on the server's hottest path).
        destination = self.job_dir(job_id) / frame_name(number, ext)
        sink.commit(destination)
        return destination


class ContentStore:
    """Content-addressed files: <root>/<sha256>, written once (verified, then renamed into place), read-only,
    shared by every job that uses the same bytes: .blend files and everything they need."""

    def __init__(self, root: Path, legacy: Path | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # Files of submissions in progress (a count per sha256): they are no job's yet, and must outlive the
        # deletion of a job that shares them. Pins come from the loop and from the add-on's worker threads.
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()
        if legacy is not None and legacy.is_dir():
            self._adopt(legacy)

    def _adopt(self, legacy: Path) -> None:
        """Move the .blend files of an older server (<legacy>/<sha256>.blend) into this store."""
        for old in legacy.glob("*.blend"):
            if is_sha256(old.stem):
                os.replace(old, self.root / old.stem)
        for partial in legacy.glob(f"{PARTIAL_PREFIX}*"):
            partial.unlink(missing_ok=True)
        try:
            legacy.rmdir()
        except OSError:
            pass

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise UnsafeName(f"invalid sha256 {sha256!r}")
        return self.root / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        try:
            stat = self.path(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or stat.st_size == size

    def sink(self, sha256: str, size: int) -> FileSink:
        self.path(sha256)  # validates the name before anything is written
        return FileSink(self.root, size, expected_sha256=sha256)

    def remove_partials(self) -> None:
        for partial in self.root.glob(f"{PARTIAL_PREFIX}*"):
            partial.unlink(missing_ok=True)

    def commit(self, sink: FileSink, sha256: str) -> Path:
        """Put a finished, verified transfer into the store (see move_in)."""
        return self.move_in(sink.path, sha256)

    def move_in(self, source: Path, sha256: str) -> Path:
        """Rename a file whose bytes are known to hash to sha256 into the store, read-only from then on (it is
        shared by every job that uses those bytes). `source` must be on the store's filesystem."""
        destination = self.path(sha256)
        os.replace(source, destination)
        os.chmod(destination, STORED_MODE)
        return destination

    @contextlib.contextmanager
    def pinned(self, shas: Iterable[str]) -> Iterator[None]:
        """Keep these files while a submission runs: taken before it asks has(), held until its job exists."""
        held = Counter(set(shas))
        with self._lock:
            self._pins.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(held)
                self._pins = +self._pins  # drop the zero counts

    def collect(self, used: Collection[str], candidates: Iterable[str] | None = None) -> int:
        """Delete the stored files (all, or `candidates`) that no job uses (`used`) and no submission pins;
        returns how many were deleted."""
        if candidates is None:
            candidates = [p.name for p in self.root.iterdir() if is_sha256(p.name)]
        removed = 0
        for sha in set(candidates) - set(used):
            with self._lock:  # a pin is either seen here or taken after the file is gone (then it is sent again)
                if self._pins[sha] > 0:
                    continue
                with contextlib.suppress(OSError, UnsafeName):
                    self.path(sha).unlink()
                    removed += 1
        return removed

    def check_room(self, needed: int) -> None:
        """Raise StoreFull unless the disk can take `needed` more bytes and keep its margin."""
        if needed <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free < needed + FREE_SPACE_MARGIN_BYTES:
            raise StoreFull(f"the farm server has {human_bytes(free)} free; this project needs "
                            f"{human_bytes(needed)} more (and the server keeps {human_bytes(FREE_SPACE_MARGIN_BYTES)} "
                            "spare)")


#: The store once held only .blend files; every place that reaches it by this name still works.
BlendStore = ContentStore
