"""Path prefixes mapped per client (`--path-map FROM=TO`): a farm on shared storage that each machine reaches by
its own prefix (`P:\\projects` on the artist's Windows, `/mnt/projects` on a Linux client).

Applied after a .blend is opened and before its files are looked for: the absolute paths of libraries, images,
fonts, sounds, volumes, cache files and movie clips that start with FROM are rewritten to start with TO (the
first FROM that matches wins). Relative (`//`) paths are left alone. Only the open file in this Blender
changes; nothing is written to disk.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: bpy.data collections whose data-blocks read a file by `filepath`.
_FILE_BLOCKS = ("images", "fonts", "sounds", "volumes", "cache_files", "movieclips")
_DRIVE = re.compile(r"^[A-Za-z]:")


class PathMapError(ValueError):
    pass


def _slashes(path: str) -> str:
    return path.replace("\\", "/")


@dataclass(frozen=True)
class Mapping:
    source: str  # FROM, with forward slashes and no slash at the end
    target: str  # TO as given, without a separator at the end

    @classmethod
    def parse(cls, text: str) -> Mapping:
        source, sep, target = text.partition("=")
        source, target = _slashes(source.strip()).rstrip("/"), target.strip().rstrip("/\\")
        if not sep or not source or not target:
            raise PathMapError(f"--path-map wants FROM=TO (two absolute path prefixes), not {text!r}")
        if not (source.startswith("/") or _DRIVE.match(source)):
            raise PathMapError(f"--path-map {text!r}: {source!r} is not an absolute path prefix")
        return cls(source, target)

    @property
    def folds_case(self) -> bool:
        """Windows paths (a drive letter or a UNC share) match whatever their case."""
        return bool(_DRIVE.match(self.source)) or self.source.startswith("//")

    def apply(self, path: str) -> str | None:
        """`path` with this prefix replaced, or None when it does not start with it (at a folder boundary)."""
        plain = _slashes(path)
        head, rest = plain[:len(self.source)], plain[len(self.source):]
        same = head.lower() == self.source.lower() if self.folds_case else head == self.source
        if not same or (rest and not rest.startswith("/")):
            return None
        separator = "\\" if "\\" in self.target and "/" not in self.target else "/"
        return self.target + rest.replace("/", separator)


def map_path(mappings: tuple[Mapping, ...], path: str) -> str | None:
    if path.startswith("//"):  # relative to the .blend ('//' is not a UNC share in Blender's paths)
        return None
    for mapping in mappings:
        mapped = mapping.apply(path)
        if mapped is not None:
            return mapped
    return None


def apply(mappings: tuple[Mapping, ...]) -> int:
    """Rewrite the open file's paths; returns how many changed. Libraries first: reloaded from their new
    place, their own data (and their `//` paths) comes from there."""
    import bpy

    changed = 0
    for library in list(bpy.data.libraries):
        mapped = map_path(mappings, library.filepath)
        if mapped is not None and mapped != library.filepath:
            log.info("library %s is read from %s", library.filepath, mapped)
            library.filepath = mapped
            library.reload()
            changed += 1
    for collection in _FILE_BLOCKS:
        for block in getattr(bpy.data, collection, None) or ():
            if block.library is not None or getattr(block, "packed_file", None) is not None:
                continue
            path = getattr(block, "filepath", "")
            mapped = map_path(mappings, path) if path else None
            if mapped is not None and mapped != path:
                log.debug("%s %r: %s -> %s", collection, block.name, path, mapped)
                block.filepath = mapped
                changed += 1
    if changed:
        log.info("path map: %d paths rewritten", changed)
    return changed
