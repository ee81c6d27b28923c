"""A job's project: the files it needs, by relative path, content and size, one of them the main .blend.

Relative paths arrive from the network and become paths on the server's and the clients' disks, so
one function (check_relpath) decides which are allowed, on every side: posix, relative to the project
root, no `..`, no drive letters or UNC prefixes, no empty parts, no control characters, bounded.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

from .limits import (
    MAX_BLEND_BYTES,
    MAX_PATH_PART_BYTES,
    MAX_PROJECT_BYTES,
    MAX_PROJECT_FILES,
    MAX_RELPATH_BYTES,
    MAX_RELPATH_PARTS,
)
from .schema import LONG, MISSING, SHORT, TYPE, Int, ListOf, SchemaError, Str, Value, record_of, validate

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DRIVE = re.compile(r"^[A-Za-z]:")
#: Names Windows will not create (in any folder, with any extension; spaces before the extension are
#: dropped first, so "con .txt" is CON too; COM¹-COM³ and LPT¹-LPT³ are devices as well).
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9\u00b9\u00b2\u00b3]|lpt[0-9\u00b9\u00b2\u00b3]) *(\..*)?$",
                               re.IGNORECASE)


def same_file_key(relpath: str) -> str:
    """What two paths that are one file on some client share: macOS and Windows fold case, and macOS also
    treats the NFC and NFD spellings of a name (é as one character or as e and an accent) as one."""
    return unicodedata.normalize("NFC", relpath).casefold()


class ManifestError(SchemaError):
    """A project manifest (or one path in it) that no side may act on."""


def check_relpath(text: Any) -> str:
    """The path itself if it is a safe relative posix path; raises ManifestError saying why not."""
    if not isinstance(text, str) or not text:
        raise ManifestError("a project file has an empty path")
    shown = repr(text[:80])
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RELPATH_BYTES:
        raise ManifestError(f"the project path {shown} is longer than {MAX_RELPATH_BYTES} bytes")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in text):
        raise ManifestError(f"the project path {shown} has a control character in it")
    if "\\" in text:
        raise ManifestError(f"the project path {shown} has a backslash (paths are posix, relative to the project)")
    if text.startswith("/") or _DRIVE.match(text):
        raise ManifestError(f"the project path {shown} is absolute; it must be relative to the project folder")
    parts = text.split("/")
    if len(parts) > MAX_RELPATH_PARTS:
        raise ManifestError(f"the project path {shown} is more than {MAX_RELPATH_PARTS} folders deep")
    for part in parts:
        if part in ("", ".", ".."):
            raise ManifestError(f"the project path {shown} has an empty, '.' or '..' part")
        if ":" in part or part.endswith((" ", ".")) or _WINDOWS_RESERVED.match(part):
            # A stream name, or a name Windows changes or refuses: it would not land where it says.
            raise ManifestError(f"the project path {shown} has a part no Windows client can hold: {part!r}")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_PART_BYTES:
            raise ManifestError(f"the project path {shown} has a part longer than {MAX_PATH_PART_BYTES} bytes")
    return text


@dataclass(frozen=True)
class ProjectFile:
    relpath: Annotated[str, Value(check=check_relpath, message={MISSING: "a project file has an empty path"})]
    sha256: Annotated[str, Str(pattern=_SHA256, message="the project file {record[relpath]!r} has no valid sha256")]
    size: Annotated[int, Int(0, MAX_BLEND_BYTES, message="the project file {record[relpath]!r} has an impossible size")]

    def to_wire(self) -> dict[str, Any]:
        return {"relpath": self.relpath, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_wire(cls, raw: Any) -> ProjectFile:
        return cls(**validate(_PROJECT_FILE, raw, error=ManifestError))


@dataclass(frozen=True)
class Manifest:
    """Every file of a job; `main` is the relative path of the .blend that is opened."""

    files: tuple[ProjectFile, ...]
    main: str

    @property
    def main_file(self) -> ProjectFile:
        return next(f for f in self.files if f.relpath == self.main)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def shas(self) -> set[str]:
        return {f.sha256 for f in self.files}

    def by_sha(self) -> dict[str, ProjectFile]:
        """One file per distinct content (the first that has it)."""
        found: dict[str, ProjectFile] = {}
        for f in self.files:
            found.setdefault(f.sha256, f)
        return found

    def files_wire(self) -> list[dict[str, Any]]:
        """The files as they travel; built once per manifest (a job's goes into every Probe and Assign), so
        the list is shared: read it, never change it."""
        wire = self.__dict__.get("_files_wire")
        if wire is None:
            wire = [f.to_wire() for f in self.files]
            object.__setattr__(self, "_files_wire", wire)  # not a field: equality ignores it
        return wire

    def to_wire(self) -> dict[str, Any]:
        return {"files": self.files_wire(), "main": self.main}

    @classmethod
    def single(cls, relpath: str, sha256: str, size: int) -> Manifest:
        """The project of a .blend that needs nothing else."""
        return cls.build([ProjectFile(check_relpath(relpath), sha256, size)], relpath)

    @classmethod
    def from_wire(cls, files: Any, main: Any) -> Manifest:
        return cls.build([ProjectFile(**raw) for raw in validate(_FILES, files, error=ManifestError)], main)

    @classmethod
    def build(cls, files: list[ProjectFile], main: Any) -> Manifest:
        check_relpath(main)
        if not main.lower().endswith(".blend"):
            raise ManifestError(f"the main file {main!r} of a project is not a .blend")
        seen: dict[str, str] = {}
        for f in files:
            key = same_file_key(f.relpath)
            if key in seen:
                raise ManifestError(f"the project lists {f.relpath!r} twice")
            seen[key] = f.relpath
        for key in seen:
            parent = key.rpartition("/")[0]
            while parent:
                if parent in seen:
                    raise ManifestError(f"the project path {seen[parent]!r} is both a file and a folder")
                parent = parent.rpartition("/")[0]
        if seen.get(same_file_key(main)) != main:
            raise ManifestError(f"the main file {main!r} is not among the project's files")
        if sum(f.size for f in files) > MAX_PROJECT_BYTES:
            raise ManifestError(f"a project holds at most {MAX_PROJECT_BYTES} bytes")
        return cls(tuple(files), main)


#: A project file as it travels (the relpath is check_relpath's, which words its own refusals), and the list.
_PROJECT_FILE = record_of(ProjectFile, message={TYPE: "a project file must be a map"})
_FILES = ListOf(_PROJECT_FILE, min_len=1, max_len=MAX_PROJECT_FILES, tuple_ok=True,
                message={TYPE: "a project lists at least its .blend", SHORT: "a project lists at least its .blend",
                         LONG: "a project has at most {high} files, not {count}"})


def safe_blend_name(name: str) -> str:
    """A file name for the main .blend of a job submitted without a manifest (only its name is known)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch if ch.isprintable() and ch not in ':*?"<>|' else "_" for ch in base).strip(" .")
    if not base.lower().endswith(".blend"):
        base += ".blend"
    try:
        return check_relpath(base)
    except ManifestError:
        return "scene.blend"
