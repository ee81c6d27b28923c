"""What the open .blend needs beyond itself: files that are not there, and Python it cannot run.

Read once per opened file, before anything renders. Files are named as the artist wrote them (the
data-block's own path, `//textures/wood.png`), never by where this client looked. Packed data needs
no file; data-blocks nothing uses do not count. The bpy side of protocol.assets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import bpy

from protocol.assets import (
    MAX_MISSING_FILES,
    MAX_PATH_CHARS,
    MissingFile,
    clip_text,
    sequence_pattern,
    udim_path,
)
from protocol.limits import MAX_NAME_CHARS

log = logging.getLogger(__name__)

#: Image sources that read files (GENERATED and VIEWER images have none).
_FILE_SOURCES = {"FILE": "image", "SEQUENCE": "sequence", "TILED": "udim", "MOVIE": "movie"}
#: bpy.data collections whose data-blocks can carry drivers (missing ones, in some version, are skipped).
_ANIMATED = ("objects", "meshes", "materials", "node_groups", "scenes", "shape_keys", "worlds", "lights", "cameras",
             "curves", "textures", "armatures", "lattices", "metaballs", "particles", "speakers", "volumes",
             "pointclouds", "hair_curves", "grease_pencils", "linestyles", "masks", "movieclips", "cache_files")


@dataclass(frozen=True)
class Needs:
    missing: tuple[MissingFile, ...] = ()  # the first MAX_MISSING_FILES
    missing_total: int = 0
    python_drivers: int = 0
    registered_texts: int = 0


def scan() -> Needs:
    missing = list(dict.fromkeys(_missing()))
    drivers, texts = script_use()
    if missing:
        log.warning("%d files the scene uses are missing: %s", len(missing),
                    ", ".join(m.describe() for m in missing[:5]))
    return Needs(tuple(missing[:MAX_MISSING_FILES]), len(missing), drivers, texts)


def script_use() -> tuple[int, int]:
    """(drivers whose expression only Python evaluates, registered text blocks)."""
    drivers = 0
    for block in _ids(_ANIMATED):
        for owner in (block, getattr(block, "node_tree", None)):  # embedded node trees animate on their own
            data = getattr(owner, "animation_data", None) if owner is not None else None
            for curve in data.drivers if data is not None else ():
                driver = curve.driver
                if driver.type == "SCRIPTED" and not driver.is_simple_expression:
                    drivers += 1
    texts = sum(1 for text in bpy.data.texts if text.use_module)
    return drivers, texts


def _ids(names: Iterable[str]) -> Iterator[Any]:
    for name in names:
        yield from getattr(bpy.data, name, None) or ()


def _used(block: Any) -> bool:
    return block.users > int(getattr(block, "use_fake_user", False))


def _packed(block: Any) -> bool:
    return getattr(block, "packed_file", None) is not None or bool(getattr(block, "packed_files", None))


def _abs(path: str, library: Any) -> str:
    return os.path.normpath(bpy.path.abspath(path, library=library))


def _file(path: str, kind: str, name: str = "", library: Any = None) -> MissingFile:
    return MissingFile(path=clip_text(path, MAX_PATH_CHARS), kind=kind, name=clip_text(name, MAX_NAME_CHARS),
                       library=clip_text(library.filepath, MAX_PATH_CHARS) if library is not None else "")


def _sequence_present(absolute: str) -> bool:
    """Any file of the sequence `absolute` names one of (the frames a job renders differ by job)."""
    folder, filename = os.path.split(absolute)
    pattern = sequence_pattern(filename)
    if pattern is None:
        return os.path.exists(absolute)
    try:
        return any(pattern.fullmatch(entry) for entry in os.listdir(folder or "."))
    except OSError:
        return False


def _missing() -> Iterator[MissingFile]:
    seen: set[str] = set()  # paths looked at here (used or not): the catch-all below leaves them alone
    missing_libraries = set()
    for library in bpy.data.libraries:
        seen.add(library.filepath)
        if _packed(library):
            continue
        # Blender keeps every library's path relative to the main file, an indirect one's too (rebased on
        # load): resolved against its parent it would point one folder too deep.
        if getattr(library, "is_missing", False) or not os.path.isfile(_abs(library.filepath, None)):
            missing_libraries.add(library.name)
            yield _file(library.filepath, "library", library=library.parent)
    for image in bpy.data.images:
        kind = _FILE_SOURCES.get(image.source)
        if kind is None:
            continue
        seen.add(image.filepath)
        if not image.filepath or _packed(image) or not _used(image):
            continue
        absolute = _abs(image.filepath, image.library)
        if kind == "udim":
            for tile in image.tiles:
                if not os.path.isfile(udim_path(absolute, tile.number)):
                    yield _file(udim_path(image.filepath, tile.number), kind, image.name, image.library)
        elif kind == "sequence":
            if not _sequence_present(absolute):
                yield _file(image.filepath, kind, image.name, image.library)
        elif not os.path.isfile(absolute):
            yield _file(image.filepath, kind, image.name, image.library)
    simple = (("fonts", "font"), ("sounds", "sound"), ("volumes", "volume"), ("cache_files", "cache_file"),
              ("movieclips", "clip"))
    for collection, kind in simple:
        for block in getattr(bpy.data, collection, None) or ():
            path = getattr(block, "filepath", "")
            seen.add(path)
            if not path or path == "<builtin>" or _packed(block) or not _used(block):
                continue
            absolute = _abs(path, block.library)
            sequence = getattr(block, "is_sequence", False) or getattr(block, "source", "") == "SEQUENCE"
            if not (_sequence_present(absolute) if sequence else os.path.isfile(absolute)):
                yield _file(path, kind, block.name, block.library)
    yield from _caches(seen)
    # Whatever else Blender resolves by path (sequencer strips, ...): files only, since a folder (a cache
    # that was never baked) is not missing.
    try:
        written = bpy.utils.blend_paths(absolute=False, packed=False, local=False)
        resolved = bpy.utils.blend_paths(absolute=True, packed=False, local=False)
    except (TypeError, RuntimeError) as exc:
        log.debug("blend_paths unavailable: %s", exc)
        return
    if len(written) != len(resolved):
        return
    for path, absolute in zip(written, resolved, strict=True):
        if path in seen or "<" in path or not os.path.splitext(path)[1]:
            continue
        seen.add(path)
        if not os.path.exists(absolute):
            yield _file(path, "file")


def _caches(seen: set[str]) -> Iterator[MissingFile]:
    """Point caches baked to disk, and baked fluid and ocean caches."""
    for obj in bpy.data.objects:
        caches = [(getattr(mod, "point_cache", None), mod.name) for mod in obj.modifiers]
        caches += [(psys.point_cache, psys.name) for psys in getattr(obj, "particle_systems", ())]
        for mod in obj.modifiers:
            surfaces = getattr(getattr(mod, "canvas_settings", None), "canvas_surfaces", None) or ()
            caches += [(surface.point_cache, surface.name) for surface in surfaces]
        for cache, _ in caches:
            if cache is None or not (cache.use_disk_cache and cache.is_baked):
                continue
            seen.add(cache.filepath)
            written = cache.filepath if cache.use_external else _blendcache(obj.library)
            folder = _abs(written, obj.library)
            try:
                present = any(entry.endswith(".bphys") for entry in os.listdir(folder))
            except OSError:
                present = False
            if not present:
                yield _file(written, "point_cache", obj.name, obj.library)
        for mod in obj.modifiers:
            if mod.type == "FLUID" and getattr(mod, "fluid_type", "") == "DOMAIN":
                settings = mod.domain_settings
                seen.add(settings.cache_directory)
                if settings.has_cache_baked_any and not os.path.isdir(_abs(settings.cache_directory, obj.library)):
                    yield _file(settings.cache_directory, "fluid_cache", obj.name, obj.library)
            elif mod.type == "OCEAN":
                seen.add(mod.filepath)
                if mod.is_cached and not os.path.isdir(_abs(mod.filepath, obj.library)):
                    yield _file(mod.filepath, "ocean_cache", obj.name, obj.library)


def _blendcache(library: Any) -> str:
    """Where Blender keeps a disk cache of a file's objects: //blendcache_<file name>/ beside that file."""
    source = library.filepath if library is not None else bpy.data.filepath
    stem = os.path.splitext(os.path.basename(source.replace("\\", "/")))[0]
    return f"//blendcache_{stem}/"
