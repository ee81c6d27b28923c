"""The open file as a project, off Blender's UI thread: what travels (traced by server_addon.core.trace),
what the farm has already, what is missing on this disk, and putting what it lacks into the server's
content store by sha256. No bpy here.

The operator saved the copy of the open file with its `//` paths as the artist wrote them (relative to
the open file's folder, not to the copy's): the tracer reads the copy as if it lay where the open file
lies, so the job's folder is the artist's folder, the .blend keeps its file name, and nothing is ever
written there.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from protocol.limits import MAX_BLEND_BYTES
from protocol.manifest import Manifest, ManifestError, ProjectFile
from protocol.stream import TransferError
from protocol.units import human_bytes

from ..core.storage import ContentStore
from ..core.trace import Trace
from .errors import FarmError, sentence

#: A file never saved has no folder: it stands in here for the tracer (never read or written), so that
#: what it uses by absolute path goes to `_outside_project/` in the job, as for any file outside.
UNSAVED_LOCATION = Path(tempfile.gettempdir()) / "microfarm-unsaved" / "untitled.blend"
BLOCK_BYTES = 1 << 20
#: Hashes of unchanged files are remembered (by path, size, times and inode) between checks and jobs.
MAX_REMEMBERED_HASHES = 20_000
#: How many names a sentence or the panel lists before "and N more".
SHOWN_NAMES = 10


class Cancel(Protocol):
    """What raises to stop long work (submit.Work)."""

    def check(self) -> None: ...


@dataclass(frozen=True)
class Entry:
    relpath: str  # its place in the job folder
    source: Path  # the bytes to send
    original: Path  # where the file lies on this disk
    sha256: str
    size: int
    on_farm: bool  # the server's store has it already


@dataclass(frozen=True)
class FileCheck:
    """What travels with the open file, as Check Files and Create Job found it (made on a worker thread,
    drawn by the panel on the main thread)."""

    filepath: str  # the open file checked (bpy.data.filepath; "" if never saved)
    files: int
    size: int
    on_farm: int  # files the farm has already
    to_send: int  # bytes to send: each content the farm lacks, once
    outside: tuple[str, ...]  # files outside the project folder, as they lie on this disk
    missing: tuple[str, ...]  # as the artist wrote them (//textures/wood.png)
    packed: bool  # textures were packed into the .blend on the way
    job_id: str = ""  # the job these files were sent as ("" for Check Files, or a refused job)

    def summary(self) -> str:
        files = f"{self.files} file{'s' if self.files != 1 else ''} ({human_bytes(self.size)})"
        sent = f"sent as job {self.job_id}: " if self.job_id else ""
        return (f"{sent}{files} travel; the farm has {self.on_farm} of them already, "
                f"{self.files - self.on_farm} to send ({human_bytes(self.to_send)})")

    def refusal(self) -> str:
        """The one sentence Create Job says when files are missing and that is not allowed."""
        count = len(self.missing)
        return sentence(f"Not sent: {count} file{'s' if count != 1 else ''} the scene needs "
                        f"{'are' if count != 1 else 'is'} missing on this disk: {listed(self.missing)}; "
                        "turn on Render With Missing Files to send it anyway")



def listed(names: tuple[str, ...] | list[str]) -> str:
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")


class Hashes:
    """sha256 of files by (path, size, mtime, inode, ctime): a second check or job of the same project hashes
    only what changed. The inode and the status-change time catch a file replaced by one of the same size and
    modification time (a copy that keeps times, a checkout, a save that restores them). Shared by the worker
    threads."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def of(self, path: Path, work: Cancel, remember: bool = True) -> tuple[str, int]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known, stat.st_size
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(BLOCK_BYTES):
                work.check()
                digest.update(block)
        sha = digest.hexdigest()
        if remember:
            with self._lock:
                if len(self._known) >= MAX_REMEMBERED_HASHES:
                    self._known.clear()
                self._known[key] = sha
        return sha, stat.st_size


def survey(trace: Trace, copy: Path, store: ContentStore, hashes: Hashes, work: Cancel) -> list[Entry]:
    """Hash every file of the trace and ask the store which it has. `copy` is the saved copy of the open file
    (its hash is never remembered: every copy is new). Raises FarmError."""
    entries = []
    for traced in trace.files:
        work.check()
        try:
            sha, size = hashes.of(traced.source, work, remember=not traced.rewritten and traced.source != copy)
        except OSError as exc:
            raise FarmError(f"Could not read {traced.original}: {exc.strerror or exc}.") from None
        if size > MAX_BLEND_BYTES:
            raise FarmError(f"{traced.original} is {human_bytes(size)}; the farm takes at most "
                            f"{human_bytes(MAX_BLEND_BYTES)} per file.")
        entries.append(Entry(traced.relpath, traced.source, traced.original, sha, size, store.has(sha, size)))
    return entries


def check_of(filepath: str, trace: Trace, entries: list[Entry], packed: bool) -> FileCheck:
    lacking = {e.sha256: e.size for e in entries if not e.on_farm}  # one content is sent once
    return FileCheck(filepath=filepath, files=len(entries), size=sum(e.size for e in entries),
                     on_farm=sum(1 for e in entries if e.on_farm), to_send=sum(lacking.values()),
                     outside=tuple(str(e.original) for e in trace.outside), missing=tuple(trace.missing),
                     packed=packed)


def manifest(entries: list[Entry], main: str) -> Manifest:
    try:
        return Manifest.build([ProjectFile(e.relpath, e.sha256, e.size) for e in entries], main)
    except ManifestError as exc:
        raise FarmError(sentence(f"The project cannot be sent: {exc}")) from None


def send(entries: list[Entry], copy: Path, store: ContentStore, work: Cancel) -> int:
    """Put into the store every file it lacks (each content once), streamed and verified; the saved copy is
    moved in (one filesystem: it was saved inside the store's folder). Returns the bytes written."""
    written = 0
    done: set[str] = set()
    for entry in entries:
        work.check()
        if entry.sha256 in done or store.has(entry.sha256, entry.size):
            continue
        done.add(entry.sha256)
        if entry.source == copy:
            store.move_in(copy, entry.sha256)
        else:
            _copy_in(entry, store, work)
        written += entry.size
    return written


def _copy_in(entry: Entry, store: ContentStore, work: Cancel) -> None:
    sink = store.sink(entry.sha256, entry.size)
    try:
        with open(entry.source, "rb") as handle:
            while block := handle.read(BLOCK_BYTES):
                work.check()
                sink.write(block)
        sink.finish(entry.sha256)
        store.commit(sink, entry.sha256)
    except TransferError:
        sink.abort()
        raise FarmError(f"{entry.original} changed while it was being sent; try again.") from None
    except OSError as exc:
        sink.abort()
        raise FarmError(f"Could not send {entry.original}: {exc.strerror or exc}.") from None
    except BaseException:
        sink.abort()
        raise


def sent(check: FileCheck, job_id: str) -> FileCheck:
    return replace(check, job_id=job_id)
