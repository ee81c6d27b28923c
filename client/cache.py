"""The client's store of job files: each file under its sha256, so nothing is downloaded twice, and
checked against its sha256 before a job uses it, so a damaged file is fetched again, not rendered.

The store is bounded (--cache-max): before a job's files are fetched, the least recently used files
(by access time, set on every use) are removed until the job fits, never one of the job being opened or
the job this client has open, nor one a job folder still links to (another client's open job, when
clients share the cache). A download that the disk has no room for fails at once, with a sentence
saying so, instead of leaving a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from protocol.stream import FileSink
from protocol.units import human_bytes

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A partial download untouched for this long belongs to no running client.
STALE_PARTIAL_S = 3600.0
HASH_BLOCK_BYTES = 1024 * 1024
#: A use marks a file's access time (the eviction order) at most this often: marking it changes its ctime, and so
#: its identity, which is then written down again.
TOUCH_INTERVAL_S = 600.0
#: Beside the store (<root>/verified/<sha256>): for each file, its identity when its content last matched its name.
VERIFIED_DIR = "verified"
#: --cache-max unless told: the textures and caches of a few productions, so that a project that comes back
#: sends nothing; the free-space check keeps a smaller disk from filling up.
DEFAULT_MAX_BYTES = 50 * 1024**3
#: Room the cache leaves free on its disk: Blender, the frames and the logs need some too.
FREE_MARGIN_BYTES = 64 * 1024**2


class CacheError(Exception):
    """The store cannot hold what a job needs."""


class CacheFull(CacheError):
    """No room on the cache's disk for a job's files."""



def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "microfarm"


def _writable(path: Path) -> None:
    """Windows will not remove or replace a read-only file (store files are 0444). POSIX asks only the folder,
    and the old file may still be linked from a job folder, so it keeps its mode there."""
    if sys.platform == "win32":
        os.chmod(path, stat.S_IWRITE)


Identity = tuple[int, int, int, int, int]


def _identity(stat: os.stat_result) -> Identity:
    """What changes whenever the file's content may have: a write or a replacement changes the inode, the size, the
    modification time or, at the least, the change time (which no program can set back, unlike the others)."""
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class BlendCache:
    """<root>/files/<sha256>: every file of the jobs this client rendered (.blend files and what they need);
    job folders (client.layout) under <root>/jobs link to them."""

    def __init__(self, root: Path, max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
        self.base = root
        self.max_bytes = max_bytes  # None: no bound but the disk
        self.pinned: frozenset[str] = frozenset()  # the shas of the job this client has open
        self.root = root / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        # sha -> the file's identity when its content was last found to match (here, or by an earlier run or
        # another client sharing the cache, as written in verified/): hashed again only when it changed.
        self._verified: dict[str, Identity] = {}
        self.verified_dir = root / VERIFIED_DIR  # beside files/, which holds the files alone
        self.verified_dir.mkdir(exist_ok=True)
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
        is removed, so that it is fetched again. Hashing is skipped for a file whose identity (inode, size,
        modification and change time) is the one noted when its content last matched (see _known). `name` (the
        file's place in a job) is what the log calls it.
        """
        path = self.path(sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if stat.st_size != size:
            self._discard(path, sha256, f"is {stat.st_size} bytes, not {size}", name)
            return None
        if self._known(sha256, _identity(stat)):
            self._touch(path, sha256, stat)
            return path
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            before = _identity(os.fstat(handle.fileno()))
            while block := handle.read(HASH_BLOCK_BYTES):
                digest.update(block)
            changed = _identity(os.fstat(handle.fileno())) != before  # written to while it was read
        if digest.hexdigest() != sha256 or changed:
            self._discard(path, sha256, "no longer matches its checksum", name)
            return None
        if self._verified.get(sha256) is not None or (self.verified_dir / sha256).exists():
            log.info("stored file %s%s changed on disk since it was checked; its content still matches",
                     f"//{name} " if name else "", sha256[:12])
        self._remember(sha256, before)
        self._touch(path, sha256, stat)
        return path

    def _known(self, sha256: str, identity: Identity) -> bool:
        """Is this the identity the file had when its content last matched? As this process remembers it, else
        as noted beside the store (by an earlier run, or by another client sharing the cache, whose use of the
        file changed its change time)."""
        if self._verified.get(sha256) == identity:
            return True
        try:
            noted = tuple(int(x) for x in (self.verified_dir / sha256).read_text().split())
        except (OSError, ValueError):
            return False
        if noted != identity:
            return False
        self._verified[sha256] = identity
        return True

    def _remember(self, sha256: str, identity: Identity) -> None:
        self._verified[sha256] = identity
        note = self.verified_dir / f".{sha256}.{os.getpid()}"
        try:
            note.write_text(" ".join(map(str, identity)))
            os.replace(note, self.verified_dir / sha256)
        except OSError as exc:  # only a cost: the next run hashes the file again
            log.debug("cannot note that %s was checked: %s", sha256[:12], exc)
            with contextlib.suppress(OSError):
                note.unlink()

    def _forget(self, sha256: str) -> None:
        self._verified.pop(sha256, None)
        with contextlib.suppress(OSError):
            (self.verified_dir / sha256).unlink()

    def _touch(self, path: Path, sha256: str, info: os.stat_result) -> None:
        """Mark a use (the access time orders eviction), now and then; the file's new change time is written down
        with it, so that the mark itself is not taken for a change."""
        if time.time() - info.st_atime < TOUCH_INTERVAL_S and info.st_atime_ns >= info.st_mtime_ns:
            return
        with contextlib.suppress(OSError):
            os.utime(path, ns=(time.time_ns(), info.st_mtime_ns))
            self._remember(sha256, _identity(path.stat()))

    def pin(self, shas: Iterable[str]) -> None:
        """The files of the job this client has open: never evicted."""
        self.pinned = frozenset(shas)

    def make_room(self, need: int, keep: Iterable[str] = ()) -> None:
        """Evict the least recently used files until `need` more bytes fit under the bound and on the disk;
        raises CacheFull when the disk cannot take them even so. `keep`: the shas of the job being opened."""
        keep = self.pinned | set(keep)
        stored: list[tuple[int, str, int]] = []  # (last use, sha, size) of the files that may go
        total = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not _SHA256.fullmatch(entry.name):
                    continue
                try:
                    info = os.stat(entry.path)  # st_nlink (DirEntry.stat has none on Windows)
                except OSError:
                    continue
                total += info.st_size
                # Linked from a job folder: some client's open job (this one's, or another's sharing the cache).
                if entry.name not in keep and info.st_nlink <= 1:
                    stored.append((info.st_atime_ns, entry.name, info.st_size))
        stored.sort()
        free = self.free_bytes()
        evicted = freed = 0
        for _, sha, size in stored:
            over = self.max_bytes is not None and total + need > self.max_bytes
            if not over and free >= need + FREE_MARGIN_BYTES:
                break
            if self._remove(self.path(sha)):
                total -= size
                free += size
                evicted += 1
                freed += size
        if evicted:
            log.info("cache: evicted %d least recently used files (%s) to make room for %s", evicted,
                     human_bytes(freed), human_bytes(need))
        self.check_free(need)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free(self, need: int) -> None:
        """Raises CacheFull unless the cache's disk has room for `need` bytes and the margin."""
        free = self.free_bytes()
        if free < need + FREE_MARGIN_BYTES:
            raise CacheFull(f"the client's cache disk is full: {human_bytes(need)} of job files do not fit in the "
                            f"{human_bytes(free)} free at {self.base} (the cache leaves "
                            f"{human_bytes(FREE_MARGIN_BYTES)} free; free space there or use --cache-dir)")

    def _remove(self, path: Path) -> bool:
        self._forget(path.name)
        try:
            _writable(path)
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cache: cannot remove %s: %s", path.name[:12], exc)
            return False
        return True

    def _discard(self, path: Path, sha256: str, why: str, name: str = "") -> None:
        log.warning("stored file %s%s %s: fetching it again", f"//{name} " if name else "", sha256[:12], why)
        self._remove(path)

    def sink(self, sha256: str, size: int) -> FileSink:
        self.path(sha256)
        return FileSink(self.root, size, expected_sha256=sha256)

    def commit(self, sink: FileSink, sha256: str) -> Path:
        path = self.path(sha256)
        with contextlib.suppress(OSError):
            _writable(path)  # a damaged copy in the way
        sink.commit(path)
        # Read-only: job folders hold hard links to this very file, and nothing may write through them.
        with contextlib.suppress(OSError):
            os.chmod(path, 0o444)
        with contextlib.suppress(OSError):
            self._remember(sha256, _identity(path.stat()))  # FileSink checked the digest as it wrote
        return path
