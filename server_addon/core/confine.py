"""A trace that looks only inside one folder (a web upload's staging folder), and bounded .blend decompression.

BAT 1.23 resolves what a .blend names on the disk it runs on: `<UDIM>` becomes `*` and is globbed (recursively),
a sequence becomes `stem*`, a folder is walked, and every match is a file of the trace. For a web upload the
server's disk is not the artist's: listing /etc, or the server's own store (file names are sha256s, and a known
sha256 lets a manifest skip uploading a file), for a stranger is a leak. While a Confinement is active on a
thread:

- a path outside its root is never globbed, stat'ed, opened or walked; trace.Planner asks `admits` first and the
  path is kept as the .blend wrote it (`/etc/<UDIM>`, `//../../x.png`) in `unread`;
- sequences, UDIM tiles and folders inside it are expanded from the list of the upload's files, not from the
  disk, with bounded work (MAX_EXPAND_WORK names compared per trace), the way Blender reads them: by file name
  in one folder;
- libraries outside it are not opened;
- a compressed .blend is decompressed by a streaming decompressor with a hard cap, into `scratch` (in the
  staging folder, never TMPDIR); BAT's own step wrote the whole stream to a NamedTemporaryFile, whatever size;
- the trace has a deadline, checked while decompressing, reading blocks and expanding.

The patches are installed once and read a contextvar: unconfined traces (tools.submit, the add-on) keep BAT's
behaviour, except that its unbounded decompression is replaced by the same capped one (MAX_BLEND_BYTES).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import glob
import gzip
import os
import posixpath
import string
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from protocol.blendfile import GZIP_MAGIC, ZSTD_MAGIC
from protocol.limits import MAX_BLEND_BYTES

#: Names compared while expanding sequences, UDIM tiles and cache folders, in one confined trace at most.
MAX_EXPAND_WORK = 2_000_000
_CHUNK = 1 << 20
#: The deadline is read once per this many blocks BAT reads or visits.
_TICKS = 512
_ACTIVE: contextvars.ContextVar[Confinement | None] = contextvars.ContextVar("microfarm_confined", default=None)


class TraceError(Exception):
    """The .blend cannot be traced (unreadable, or BAT is not there)."""


class TraceLimit(TraceError):
    """A limit was reached (decompressed size, time, work): the file is refused, it does not travel untraced."""


class TooLarge(TraceLimit):
    """A compressed .blend holds more than it may once decompressed."""


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} bytes"


def compression(head: bytes) -> str:
    """'gzip', 'zstd' or '' from a file's first four bytes (zstd skippable frames count as zstd, as in BAT)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or (len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"):
        return "zstd"
    return ""


def decompress(source: Path, out: BinaryIO, cap: int, check: Callable[[], None], shown: str) -> int:
    """Stream the decompressed bytes of `source` into `out`; TraceLimit beyond `cap` bytes. Returns the count."""
    with open(source, "rb") as raw:
        kind = compression(raw.read(4))
        raw.seek(0)
        damaged: tuple[type[BaseException], ...] = (OSError, EOFError)
        if kind == "gzip":
            reader: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            try:
                import zstandard
            except ImportError:
                raise TraceError(f"{shown} is zstd-compressed and this Python has no zstandard module to read it "
                                 "(pip install zstandard)") from None
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            damaged += (zstandard.ZstdError,)
        written = 0
        try:
            with reader:
                while chunk := reader.read(min(_CHUNK, cap - written + 1)):
                    written += len(chunk)
                    if written > cap:
                        raise TooLarge(f"refused: {shown} decompresses to more than {_size(cap)}, more than "
                                       "this farm accepts")
                    out.write(chunk)
                    check()
        except damaged as exc:
            raise TraceError(f"{shown}: the {kind}-compressed file is damaged ({exc})") from None
    return written


class Confinement:
    """What one confined trace may look at (`root` and its `files`), and what it may spend."""

    def __init__(self, root: Path, files: Iterable[str], scratch: Path, room: int, seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(os.path.abspath(root))
        self.scratch = scratch  # outside root: the decompressed copies are no files of the upload
        self.room = room  # decompressed bytes, all files together
        self.seconds = seconds
        self.clock = clock
        self.deadline = clock() + seconds
        self.unread: list[str] = []  # outside root, as the .blend wrote them: never looked at
        self._files = set(files)
        self._names: dict[str, list[str]] = {}  # folder relpath ('' is the root) -> names of its files
        self._folders = {""}
        for relpath in sorted(self._files):
            folder, _, name = relpath.rpartition("/")
            self._names.setdefault(folder, []).append(name)
            parts = relpath.split("/")
            self._folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        self._expanded: dict[str, list[Path] | None] = {}
        self._plain: dict[Path, Path] = {}
        self._work = 0
        self._ticks = 0

    # --- where and how long --------------------------------------------------------------------------------

    def relative(self, path: os.PathLike[str] | str) -> str | None:
        """The posix path below root ('' for root itself), or None outside it. Lexical only: no disk access."""
        try:
            relpath = PurePath(os.path.abspath(os.fspath(path))).relative_to(self.root).as_posix()
        except ValueError:
            return None
        return "" if relpath == "." else relpath

    def holds(self, path: os.PathLike[str] | str) -> bool:
        return self.relative(path) is not None

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def check(self) -> None:
        if self.clock() > self.deadline:
            raise TraceLimit(f"refused: tracing the upload took longer than {self.seconds:g} s, the limit for "
                             "a web upload")

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % _TICKS == 0:
            self.check()

    def admits(self, asset_path: Path, written: bytes, named_in: Path | None) -> bool:
        """True for a path inside root; else it is kept as written (and by which library) and never looked at."""
        self.tick()
        if self.holds(asset_path):
            return True
        text = bytes(written).decode("utf-8", "replace")
        where = self.relative(named_in) if named_in is not None else None
        self.unread.append(f"{text} (in {where})" if where else text)
        return False

    # --- sequences, UDIM tiles, folders ---------------------------------------------------------------------

    def expand(self, path: os.PathLike[str] | str) -> list[Path] | None:
        """What BAT's expand_sequence would find, from the upload's list of files; None: it does not exist."""
        self.check()
        relpath = self.relative(path)
        if relpath is None:
            return None
        if relpath not in self._expanded:
            self._expanded[relpath] = self._expand(relpath)
        return self._expanded[relpath]

    def _expand(self, relpath: str) -> list[Path] | None:
        folder, _, name = relpath.rpartition("/")
        name = name.replace("<UDIM>", "*")
        if "*" in folder:  # Blender expands file names in one folder; BAT's recursive glob is not followed
            return []
        if "*" in name:
            pattern = name
        elif relpath in self._files:
            stem, suffix = posixpath.splitext(name)
            base = stem.rstrip(string.digits)
            if base == stem:
                return [self.root / relpath]
            pattern = f"{glob.escape(base)}*{glob.escape(suffix)}"
        elif relpath in self._folders:  # a cache folder: every file below it
            self._spend(len(self._files))
            prefix = f"{relpath}/" if relpath else ""
            return [self.root / f for f in sorted(self._files) if f.startswith(prefix)]
        else:
            return None
        names = self._names.get(folder, [])
        self._spend(len(names))
        hidden = pattern.startswith(".")
        return [self.root / folder / n for n in names
                if (hidden or not n.startswith(".")) and fnmatch.fnmatchcase(n, pattern)]

    def _spend(self, names: int) -> None:
        self._work += names
        if self._work > MAX_EXPAND_WORK:
            raise TraceLimit(f"refused: expanding the upload's image sequences, UDIM tiles and cache folders "
                             f"compared more than {MAX_EXPAND_WORK} file names, the limit for a web upload")

    # --- compressed .blend files ------------------------------------------------------------------------------

    def prepare(self, relpaths: Iterable[str]) -> None:
        """Decompress the compressed ones among these files now (before the trace, which holds a lock)."""
        for relpath in relpaths:
            path = self.root / relpath
            with open(path, "rb") as f:
                if compression(f.read(4)):
                    self.plain_copy(path)

    def plain_copy(self, path: Path) -> Path:
        """The decompressed copy of a compressed file inside root, made once, counted against `room`."""
        key = Path(os.path.abspath(path))
        if key in self._plain:
            return self._plain[key]
        shown = self.relative(key)
        if shown is None:
            raise TraceError(f"{path} lies outside the upload")
        self.scratch.mkdir(parents=True, exist_ok=True)
        plain = self.scratch / f"{len(self._plain)}.blend"
        try:
            with open(plain, "xb") as out:
                written = decompress(key, out, min(self.room, MAX_BLEND_BYTES), self.check, shown)
        except BaseException:
            plain.unlink(missing_ok=True)
            raise
        self.room -= written
        self._plain[key] = plain
        return plain

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        install()
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


_installed = False


def install() -> None:
    """Wrap BAT where it looks things up (once; call with trace's lock held). Each wrapper reads the running
    thread's Confinement and, with none, does what BAT did (decompression capped at MAX_BLEND_BYTES)."""
    global _installed
    if _installed:
        return
    from blender_asset_tracer import blendfile, pack
    from blender_asset_tracer.blendfile import magic_compression
    from blender_asset_tracer.trace import blocks2assets, file2blocks, file_sequence, result

    expand_original = file_sequence.expand_sequence

    def expand_sequence(path: Path) -> Iterator[Path]:
        confine = _ACTIVE.get()
        if confine is None:
            yield from expand_original(path)
            return
        found = confine.expand(path)
        if found is None:
            raise file_sequence.DoesNotExist(path)
        yield from found

    file_sequence.expand_sequence = expand_sequence
    for module in (pack, result, blocks2assets, file2blocks):  # any module that bound the name itself
        if getattr(module, "expand_sequence", None) is expand_original:
            module.expand_sequence = expand_sequence

    open_original = magic_compression.open

    def open_blend(path: Path, mode: str, buffer_size: int) -> Any:
        confine = _ACTIVE.get()
        if confine is not None and not confine.holds(path):
            raise TraceError(f"{path} lies outside the upload")
        with open(path, "rb") as f:
            compressed = compression(f.read(4))
        if not compressed:
            return open_original(path, mode, buffer_size)
        if confine is not None:
            plain = confine.plain_copy(path)
            return magic_compression.DecompressedFileInfo(True, plain, open(plain, mode, buffering=buffer_size))
        tmp = tempfile.NamedTemporaryFile()  # noqa: SIM115 - BAT closes it with the BlendFile
        try:
            decompress(path, tmp, MAX_BLEND_BYTES, lambda: None, str(path))
        except BaseException:
            tmp.close()
            raise
        tmp.seek(0)
        return magic_compression.DecompressedFileInfo(True, Path(tmp.name), tmp)

    magic_compression.open = open_blend

    iterator = file2blocks.BlockIterator
    follow = iterator._visit_linked_blocks
    queue = iterator._queue_dependencies

    def visit_linked_blocks(self, blocks_per_lib):  # type: ignore[no-untyped-def]
        confine = _ACTIVE.get()
        if confine is not None:  # a library outside is named (blocks2assets reports it), never opened
            blocks_per_lib = {lib: ids for lib, ids in blocks_per_lib.items() if confine.holds(lib.to_path())}
        yield from follow(self, blocks_per_lib)

    def queue_dependencies(self, block):  # type: ignore[no-untyped-def]
        confine = _ACTIVE.get()
        if confine is not None:
            confine.tick()
        return queue(self, block)

    iterator._visit_linked_blocks = visit_linked_blocks
    iterator._queue_dependencies = queue_dependencies

    block_init = blendfile.BlendFileBlock.__init__

    def read_block(self, bfile):  # type: ignore[no-untyped-def]
        confine = _ACTIVE.get()
        if confine is not None:
            confine.tick()
        block_init(self, bfile)

    blendfile.BlendFileBlock.__init__ = read_block
    _installed = True
