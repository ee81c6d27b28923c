"""A private folder where one web upload's project is laid out before it is traced and stored.

Every file of the upload (a .blend, the entries of a .zip, the files of a folder) is written to
`<data dir>/staging/<random>/project/<relative path>`, hashed while it is written, under a name that
protocol.manifest.check_relpath accepts and no other file of the upload holds (case-folded, as Windows and
macOS clients see names). Files are created exclusively inside folders this module made, so nothing can
land outside the staging folder. The staging folder is on the store's filesystem: a needed file is renamed
into the ContentStore, the rest is deleted with the folder.

A .zip is read from a temporary file with zipfile after its directory was checked: the entry count (from
the end record, before zipfile parses anything), the directory's size, each name, symlinks and other
special entries, duplicates, and the total size declared; while extracting, the sizes actually read are
checked again (a zip can lie about them).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from protocol.limits import MAX_PROJECT_FILES
from protocol.manifest import ManifestError, check_relpath
from protocol.units import human_bytes

from .errors import WebError

log = logging.getLogger(__name__)

#: The folder holding every upload's staging folder, inside the server's data dir.
STAGING_DIR = "staging"
PROJECT_DIR = "project"
ARCHIVE_NAME = "upload.zip"
#: Entries a .zip may list (folders count too); a project has at most MAX_PROJECT_FILES files.
MAX_ZIP_ENTRIES = 2 * MAX_PROJECT_FILES
#: The zip's central directory is read into memory by zipfile: this bounds it (names, extra fields, comments).
MAX_ZIP_DIRECTORY_BYTES = 16 * 1024 * 1024
ZIP_READ_BYTES = 1024 * 1024
MACOS_METADATA = "__MACOSX/"
#: How a zip starts (a local file header, or the end record of an empty archive).
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_END = b"PK\x05\x06"
_END64_LOCATOR = b"PK\x06\x07"
_END64 = b"PK\x06\x06"
_END_BYTES = 22
_MAX_COMMENT = 0xFFFF


def looks_like_zip(head: bytes) -> bool:
    return any(head.startswith(magic) for magic in ZIP_MAGICS)


@dataclass(frozen=True)
class StagedFile:
    relpath: str
    sha256: str
    size: int


class Staging:
    """One upload's private folder; remove() always, when the request is over."""

    def __init__(self, root: Path) -> None:
        self.dir = root / secrets.token_hex(8)
        self.dir.mkdir(parents=True)
        self.project = self.dir / PROJECT_DIR
        self.project.mkdir()
        self.archive = self.dir / ARCHIVE_NAME
        self.files: dict[str, StagedFile] = {}  # relpath -> file
        self._taken: dict[str, str] = {}  # case-folded relpath -> relpath, files and folders alike
        self._folders: set[str] = set()  # case-folded

    @classmethod
    def create(cls, data_dir: Path) -> Staging:
        return cls((data_dir / STAGING_DIR).resolve())

    @staticmethod
    def clear_all(data_dir: Path) -> None:
        """Remove what a stopped server left behind (at start, before any upload)."""
        shutil.rmtree(data_dir / STAGING_DIR, ignore_errors=True)

    def path(self, relpath: str) -> Path:
        return self.project / relpath

    def claim(self, name: str) -> str:
        """The relative path for a file of the upload, checked and not yet used; raises WebError(400)."""
        try:
            relpath = check_relpath(name)
        except ManifestError as exc:
            raise WebError(400, f"refused: {exc}") from None
        if len(self.files) >= MAX_PROJECT_FILES:
            raise WebError(400, f"a project has at most {MAX_PROJECT_FILES} files")
        key = relpath.casefold()
        if key in self._taken or key in self._folders:
            raise WebError(400, f"refused: the upload holds {relpath!r} twice (or as a file and a folder)")
        parts = key.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in self._taken:
                raise WebError(400, f"refused: {self._taken[folder]!r} is both a file and a folder in the upload")
        self._folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        self._taken[key] = relpath
        return relpath

    def open_new(self, relpath: str) -> BinaryIO:
        """Create the file exclusively, its folders too; each folder must be a real folder inside the project."""
        path = self.path(relpath)
        folder = self.project
        for part in relpath.split("/")[:-1]:
            folder = folder / part
            try:
                folder.mkdir()
            except FileExistsError:
                pass
            if folder.is_symlink() or not folder.is_dir():
                raise WebError(400, f"refused: {relpath!r} does not fit in the upload's folders")
        return open(path, "xb")  # noqa: SIM115 - closed by the caller

    def add(self, relpath: str, sha256: str, size: int) -> None:
        self.files[relpath] = StagedFile(relpath, sha256, size)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- zip ---------------------------------------------------------------------------------------------

    def extract_zip(self, limit: int) -> None:
        """Lay the archive's entries out in the project folder; raises WebError(400) naming what is wrong."""
        entries, directory = _end_record(self.archive)
        if entries > MAX_ZIP_ENTRIES:
            raise WebError(400, f"refused: the zip lists {entries} entries; a project holds at most "
                                f"{MAX_PROJECT_FILES} files")
        if directory > MAX_ZIP_DIRECTORY_BYTES:
            raise WebError(400, f"refused: the zip's directory is {human_bytes(directory)}, more than the "
                                f"{human_bytes(MAX_ZIP_DIRECTORY_BYTES)} a project needs")
        try:
            with zipfile.ZipFile(self.archive) as archive:
                infos = archive.infolist()
                if len(infos) > MAX_ZIP_ENTRIES:
                    raise WebError(400, f"refused: the zip lists {len(infos)} entries; a project holds at most "
                                        f"{MAX_PROJECT_FILES} files")
                wanted = [(info, self._check_entry(info)) for info in infos]
                wanted = [(info, relpath) for info, relpath in wanted if relpath is not None]
                declared = sum(info.file_size for info, _ in wanted)
                if declared > limit:
                    raise WebError(400, f"refused: the zip unpacks to {human_bytes(declared)} ({declared} bytes), "
                                        f"more than the {human_bytes(limit)} this farm accepts")
                total = 0
                for info, relpath in wanted:
                    total += self._extract(archive, info, relpath, limit - total)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise WebError(400, f"refused: the zip is damaged or lies about its sizes: {exc}") from None
        except NotImplementedError as exc:
            raise WebError(400, f"refused: the zip uses what this server cannot unpack: {exc}") from None
        finally:
            self.archive.unlink(missing_ok=True)

    def _check_entry(self, info: zipfile.ZipInfo) -> str | None:
        """The entry's relative path, None for a folder; raises WebError for what must not be unpacked."""
        name = info.filename
        if name.startswith(MACOS_METADATA):
            return None  # what macOS's Compress adds beside the files: resource forks, never part of a project
        if info.orig_filename != name and info.orig_filename.replace("\\", "/") != name:
            raise WebError(400, f"refused: the zip entry {info.orig_filename[:80]!r} has a NUL in its name")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise WebError(400, f"refused: the zip entry {name[:80]!r} is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise WebError(400, f"refused: the zip entry {name[:80]!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise WebError(400, f"refused: the zip entry {name[:80]!r} is encrypted")
        if name.endswith("/") or kind == stat.S_IFDIR:
            try:
                check_relpath(name.rstrip("/"))
            except ManifestError as exc:
                raise WebError(400, f"refused: {exc}") from None
            return None
        return self.claim(name)

    def _extract(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, relpath: str, room: int) -> int:
        digest = hashlib.sha256()
        size = 0
        with self.open_new(relpath) as out, archive.open(info) as entry:
            while data := entry.read(ZIP_READ_BYTES):
                size += len(data)
                if size > info.file_size:
                    raise WebError(400, f"refused: the zip entry {relpath!r} holds more than the {info.file_size} "
                                        "bytes it declares")
                if size > room:
                    raise WebError(400, "refused: the zip unpacks to more than this farm accepts")
                digest.update(data)
                out.write(data)
        self.add(relpath, digest.hexdigest(), size)
        return size


def _end_record(path: Path) -> tuple[int, int]:
    """(entries, central directory bytes) from the zip's end record, read before zipfile parses anything."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        tail_size = min(size, _END_BYTES + _MAX_COMMENT + 20)
        f.seek(size - tail_size)
        tail = f.read(tail_size)
        at = tail.rfind(_END)
        if at < 0 or len(tail) - at < _END_BYTES:
            raise WebError(400, "refused: the file is not a zip (it has no end record)")
        entries, directory = struct.unpack("<HI", tail[at + 10:at + 16])
        if entries == 0xFFFF or directory == 0xFFFFFFFF:  # zip64: the real numbers are in the zip64 end record
            locator = tail[at - 20:at] if at >= 20 else b""
            if not locator.startswith(_END64_LOCATOR):
                raise WebError(400, "refused: the zip's zip64 end record is missing")
            (offset,) = struct.unpack("<Q", locator[8:16])
            f.seek(offset)
            record = f.read(56)
            if len(record) < 56 or not record.startswith(_END64):
                raise WebError(400, "refused: the zip's zip64 end record is damaged")
            entries, directory = struct.unpack("<QQ", record[32:48])
    return entries, directory

