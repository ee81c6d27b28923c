"""What a scene needs beyond its .blend, as a probe reports it: missing files and scripts. Pure data.

A missing file is named as the artist wrote it (`//textures/wood.png`), with what uses it (image "wood"),
never by the place a client happened to look for it. Everything here arrives from the network and is
bounded and checked on the way in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from .limits import MAX_NAME_CHARS
from .schema import CHOICE, FORM, LONG, MISSING, SHORT, TYPE, ListOf, Str, record_of, validate

#: A probe reports at most this many missing files by name (and how many there are in all).
MAX_MISSING_FILES = 64
MAX_PATH_CHARS = 1024
#: Lines of a frame's render log that name missing files, kept per frame.
MAX_LOG_WARNINGS = 8
MAX_WARNING_CHARS = 512
#: What uses a file, as the sentence names it.
KINDS = {
    "image": "image", "sequence": "image sequence", "udim": "UDIM image", "movie": "movie", "library": "library",
    "font": "font", "sound": "sound", "volume": "volume", "cache_file": "cache file", "clip": "movie clip",
    "point_cache": "point cache", "fluid_cache": "fluid cache", "ocean_cache": "ocean cache", "file": "file",
}

#: What Blender prints while it renders when a file is not there (Cycles, fonts, libraries, packing).
LOG_MISSING = re.compile(r"does not exist|doesn't exist|not found|is missing|are missing|missing from|"
                          r"cannot read|cannot find|cannot open|unable to open|no such file", re.IGNORECASE)
#: Blender's log prefix: "00:00.337  cycles           | ERROR ".
_LOG_PREFIX = re.compile(r"^\s*\d\d:\d\d\.\d+\s+\S+\s*\|\s*(?:(?:ERROR|WARNING|INFO)\s+)?")


_PATH_WORDS = "a missing file has an empty or overlong path"


@dataclass(frozen=True)
class MissingFile:
    # as the artist wrote it: "//textures/wood.png"
    path: Annotated[str, Str(min_len=1, max_len=MAX_PATH_CHARS, printable=True,
                             message={MISSING: _PATH_WORDS, SHORT: _PATH_WORDS, LONG: _PATH_WORDS})]
    # a key of KINDS
    kind: Annotated[str, Str(choices=KINDS, message={MISSING: "a missing file has an unknown kind ''",
                                                     CHOICE: "a missing file has an unknown kind {value!r}"})]
    # the data-block that uses it: "wood"
    name: Annotated[str, Str(max_len=MAX_NAME_CHARS, printable=True,
                             message={LONG: "a missing file has an overlong name"})] = ""
    # the library the data-block comes from, as written ("//lib/props.blend"), if linked
    library: Annotated[str, Str(max_len=MAX_PATH_CHARS, printable=True, message={LONG: _PATH_WORDS})] = ""

    def describe(self) -> str:
        """'//textures/wood.png (image "wood")', '//lib/props.blend (library)'."""
        what = KINDS.get(self.kind, self.kind)
        if self.name:
            what += f' "{self.name}"'
        if self.library:
            what += f" of {self.library}"
        return f"{self.path} ({what})"

    def to_wire(self) -> dict[str, str]:
        wire = {"path": self.path, "kind": self.kind}
        if self.name:
            wire["name"] = self.name
        if self.library:
            wire["library"] = self.library
        return wire

    @classmethod
    def from_wire(cls, raw: Any) -> MissingFile:
        return cls(**validate(_MISSING_FILE, raw))


def clip_text(text: str, limit: int) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


_MISSING_FILE = record_of(MissingFile, message={TYPE: "a missing file must be a map"},
                          messages={TYPE: "a missing file has a field that is not text",
                                    FORM: "a missing file has a control character in it"})
_TOO_MANY = f"a probe reports a list of at most {MAX_MISSING_FILES} missing files"
MISSING_FILES = ListOf(_MISSING_FILE, max_len=MAX_MISSING_FILES, tuple_ok=True,
                       message={TYPE: _TOO_MANY, LONG: _TOO_MANY})


def missing_from_wire(raw: Any) -> tuple[MissingFile, ...]:
    return tuple(MissingFile(**item) for item in validate(MISSING_FILES, raw))


def missing_sentence(missing: tuple[MissingFile, ...] | list[MissingFile], total: int = 0) -> str:
    """'missing files: //textures/wood.png (image "wood"), //lib/props.blend (library)' (and N more)."""
    text = "missing files: " + ", ".join(m.describe() for m in missing)
    more = max(0, total - len(missing))
    return text + (f" and {more} more" if more else "")


def _count(number: int, one: str, many: str) -> str:
    return (f"a {one}" if one[0] not in "aeiou" else f"an {one}") if number == 1 else f"{number} {many}"


def scripts_sentence(python_drivers: int, registered_texts: int) -> str:
    """'the scene has 2 drivers with Python expressions and a registered text block; ...' ('' if none)."""
    parts = []
    if python_drivers:
        parts.append(_count(python_drivers, "driver with a Python expression", "drivers with Python expressions"))
    if registered_texts:
        parts.append(_count(registered_texts, "registered text block", "registered text blocks"))
    if not parts:
        return ""
    return (f"the scene has {' and '.join(parts)}; clients run with scripts off: they render without them "
            "(submit with --needs-scripts to send it only to clients started with --allow-scripts)")


def artist_path(path: str, blend_dir: str) -> str:
    """A path as the artist wrote it: relative to the .blend's folder as '//...', else unchanged."""
    base = blend_dir.rstrip("/\\")
    for sep in ("/", "\\"):
        if path.startswith(base + sep):
            return "//" + path[len(base) + 1:].replace("\\", "/")
    return path


def log_warnings(text: str, blend_dir: str = "") -> list[str]:
    """The lines of a render log that say a file is missing, with the client's folder shown as '//'."""
    found: list[str] = []
    for line in text.splitlines():
        # Cycles names a UDIM image by its <UDIM> pattern as "does not exist" even when every tile is there;
        # the tiles themselves are checked one by one when the file is opened.
        if not LOG_MISSING.search(line) or "<UDIM>" in line or "<UVTILE>" in line:
            continue
        line = _LOG_PREFIX.sub("", line).strip()
        if blend_dir:
            base = blend_dir.rstrip("/\\")
            line = line.replace(base + "/", "//").replace(base + "\\", "//")
        line = clip_text(line, MAX_WARNING_CHARS)
        if line and line not in found:
            found.append(line)
        if len(found) >= MAX_LOG_WARNINGS:
            break
    return found


_DIGITS_TAIL = re.compile(r"^(.*?)(\d+)(\D*)$")


def sequence_pattern(filename: str) -> re.Pattern[str] | None:
    """The files of an image sequence named like `filename` ('flip_0001.png' -> flip_<digits>.png)."""
    match = _DIGITS_TAIL.match(filename)
    if match is None:
        return None
    head, _, tail = match.groups()
    return re.compile(re.escape(head) + r"\d+" + re.escape(tail))


def udim_path(filepath: str, tile: int) -> str:
    """The file of one UDIM tile: the <UDIM> (1001) or <UVTILE> (u1_v1) token, or the 4-digit tile number
    Blender stores in older files, replaced by the tile's."""
    if "<UDIM>" in filepath:
        return filepath.replace("<UDIM>", str(tile))
    if "<UVTILE>" in filepath:
        u, v = (tile - 1001) % 10 + 1, (tile - 1001) // 10 + 1
        return filepath.replace("<UVTILE>", f"u{u}_v{v}")
    return re.sub(r"(?<!\d)1\d{3}(?!\d)(?=[^/\\\d]*$)", str(tile), filepath, count=1)
