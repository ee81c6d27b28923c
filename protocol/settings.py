"""Render settings that travel as data: what a user asks for, and what a probe reports.

Both are validated on arrival; a client applies them through the bpy API, never as code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .assets import MAX_MISSING_FILES, MissingFile, missing_from_wire
from .errors import ProtocolError
from .limits import MAX_FRAMES_PER_JOB
from .tiles import MAX_MARGIN, MAX_TILES, MIN_TILES, SPLIT_FORMATS, TileSpec

#: Image formats a job may produce, with the file extension the server stores them under.
IMAGE_FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpg",
    "OPEN_EXR": "exr",
    "OPEN_EXR_MULTILAYER": "exr",
    "TIFF": "tif",
    "BMP": "bmp",
    "TARGA": "tga",
    "WEBP": "webp",
}
DEFAULT_FORMAT = "PNG"
#: What a job may require of the clients that render it (None: any device).
DEVICE_KINDS = ("CPU", "GPU")
DEFAULT_CHUNK = 4
MAX_CHUNK = 10_000
MAX_SAMPLES = 1 << 20
MAX_PERCENTAGE = 1000
#: Highest frame rate a probe may report: far beyond any real one (Blender's fps field stops at 32767), low
#: enough that a frame's duration in a video stays a sane number.
MAX_FPS = 100_000.0
#: Blender's own frame limit: scene.frame_set() clamps anything beyond it without a word.
MAX_FRAME = 1_048_574
#: A job's Blender: "file" (the version that saved it) or MAJOR.MINOR[.PATCH].
BLENDER_FILE = "file"
_BLENDER_CHOICE = re.compile(r"\d{1,3}\.\d{1,3}(\.\d{1,4})?")


class SettingsError(ValueError):
    """A job's settings are invalid; the message says which and why."""


def _int_or_none(raw: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingsError(f"{key} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{key} must be between {low} and {high}, not {value}")
    return value


def _bool(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SettingsError(f"{key} must be true or false, not {value!r}")
    return value


def _blender_choice(value: Any) -> str | None:
    if value is None or value == BLENDER_FILE:
        return value
    if not isinstance(value, str) or not _BLENDER_CHOICE.fullmatch(value):
        raise SettingsError(f"blender must be {BLENDER_FILE!r} or a version such as 4.5 or 5.3.1, not {value!r}")
    return value


@dataclass(frozen=True)
class JobRequest:
    """What a submitter asks for; None means "take it from the .blend's scene"."""

    frame_start: int | None = None
    frame_end: int | None = None
    frame_step: int | None = None
    chunk: int = DEFAULT_CHUNK
    file_format: str | None = None
    samples: int | None = None
    percentage: int | None = None
    device: str | None = None  # "CPU" or "GPU": only clients rendering on that kind of device
    split: int | None = None  # one frame cut into this many tiles; 0: as many as the farm's clients suit
    # Which Blender renders it: None, the first client to render pins the job to its version; "file",
    # the version that saved the .blend; "5.3" any 5.3.x (then pinned to the first one); "5.3.1" exactly.
    blender: str | None = None
    # Render even though the probe found files missing (the job carries the list as a warning).
    allow_missing: bool = False
    # Only clients started with --allow-scripts render it (and read its scene): the scene needs its Python.
    needs_scripts: bool = False

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> JobRequest:
        limit = MAX_FRAME
        file_format = raw.get("file_format")
        if file_format is not None and file_format not in IMAGE_FORMATS:
            raise SettingsError(f"format must be one of {', '.join(IMAGE_FORMATS)}, not {file_format!r}")
        device = raw.get("device")
        if device is not None and device not in DEVICE_KINDS:
            raise SettingsError(f"device must be one of {', '.join(DEVICE_KINDS)}, not {device!r}")
        request = cls(
            frame_start=_int_or_none(raw, "frame_start", -limit, limit),
            frame_end=_int_or_none(raw, "frame_end", -limit, limit),
            frame_step=_int_or_none(raw, "frame_step", 1, limit),
            chunk=_int_or_none(raw, "chunk", 1, MAX_CHUNK) or DEFAULT_CHUNK,
            file_format=file_format,
            samples=_int_or_none(raw, "samples", 1, MAX_SAMPLES),
            percentage=_int_or_none(raw, "percentage", 1, MAX_PERCENTAGE),
            device=device,
            split=_int_or_none(raw, "split", 0, MAX_TILES),
            blender=_blender_choice(raw.get("blender")),
            allow_missing=_bool(raw, "allow_missing"),
            needs_scripts=_bool(raw, "needs_scripts"),
        )
        if request.split == 1:
            raise SettingsError(f"split must be 0 (auto) or between {MIN_TILES} and {MAX_TILES}, not 1")
        start, end = request.frame_start, request.frame_end
        if start is not None and end is not None and end < start:
            raise SettingsError(f"frame range {request.frame_start}-{request.frame_end} ends before it starts")
        return request


@dataclass(frozen=True)
class SceneInfo:
    """The settings a client read from a .blend's active scene."""

    scene: str
    engine: str
    frame_start: int
    frame_end: int
    frame_step: int
    fps: float
    resolution_x: int
    resolution_y: int
    percentage: int
    file_format: str
    has_camera: bool = True
    # What split-frame rendering needs to know: rows a band must be rendered beyond its edges for what
    # looks at neighbouring pixels (denoising, compositing), and how the stitched frame is encoded.
    split_margin: int = 0
    quality: int = 90  # JPEG quality
    exr_codec: str = "ZIP"
    # What the scene needs beyond the .blend (protocol.assets): files the probing client could not find
    # (at most MAX_MISSING_FILES by name, missing_total in all), and what only Python evaluates.
    missing: tuple[MissingFile, ...] = ()
    missing_total: int = 0
    python_drivers: int = 0
    registered_texts: int = 0

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        wire["missing"] = [m.to_wire() for m in self.missing]
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> SceneInfo:
        values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
        # An older client sends no list: nothing known to be missing.
        values["missing"] = missing_from_wire(values.get("missing", ()))
        try:
            info = cls(**values)
        except TypeError as exc:
            raise ProtocolError(f"probe result is incomplete: {exc}") from None
        for field in dataclasses.fields(cls):
            if field.name == "missing":
                continue
            value = getattr(info, field.name)
            expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[str(field.type)]
            if not isinstance(value, expected) or (field.type == "int" and isinstance(value, bool)):
                raise ProtocolError(f"probe result has a bad {field.name!r}")
            if field.type == "float" and not math.isfinite(value):
                raise ProtocolError(f"probe result has a {field.name!r} that is not a finite number: {value!r}")
        if info.frame_step < 1 or info.frame_end < info.frame_start or max(abs(info.frame_start),
                                                                           abs(info.frame_end)) > MAX_FRAME:
            raise ProtocolError(f"probe result has an impossible frame range {info.frame_start}-{info.frame_end}"
                                f" step {info.frame_step}")
        if not (0 < info.fps <= MAX_FPS and info.resolution_x > 0 and info.resolution_y > 0
                and 1 <= info.percentage <= MAX_PERCENTAGE):
            raise ProtocolError("probe result has an impossible frame rate, resolution or percentage")
        if not (0 <= info.split_margin <= MAX_MARGIN and 0 <= info.quality <= 100 and len(info.exr_codec) <= 32):
            raise ProtocolError("probe result has an impossible split margin, quality or EXR codec")
        counts = (info.missing_total, info.python_drivers, info.registered_texts)
        if not all(0 <= n <= 1 << 31 for n in counts) or len(info.missing) > max(info.missing_total,
                                                                                   MAX_MISSING_FILES):
            raise ProtocolError("probe result has impossible counts of missing files or scripts")
        return info


@dataclass(frozen=True)
class RenderSettings:
    """The resolved settings of a job, sent with every assignment."""

    frames: tuple[int, ...]
    chunk: int
    file_format: str
    samples: int | None
    percentage: int
    fps: float
    resolution_x: int
    resolution_y: int
    device: str | None = None
    tiles: int = 0  # a split frame: its work items are tiles 0..tiles-1 of frames[0]; 0: whole frames
    margin: int = 0  # rows rendered beyond each tile's band (see protocol.tiles)
    allow_missing: bool = False  # a client renders even where files of the scene are missing

    @property
    def ext(self) -> str:
        return IMAGE_FORMATS[self.file_format]

    @property
    def items(self) -> tuple[int, ...]:
        """What the scheduler leases: frame numbers, or the tile indices of a split frame."""
        return tuple(range(self.tiles)) if self.tiles else self.frames

    @property
    def tile_ext(self) -> str:
        """The lossless format tiles travel in (PNG for PNG and JPEG frames, EXR for EXR)."""
        return SPLIT_FORMATS[self.file_format]

    @property
    def split(self) -> TileSpec | None:
        if not self.tiles:
            return None
        return TileSpec(frame=self.frames[0], tiles=self.tiles, height=self.resolution_y, margin=self.margin)

    def to_assignment(self) -> dict[str, Any]:
        wire = {"file_format": self.file_format, "samples": self.samples, "percentage": self.percentage,
                "device": self.device, "allow_missing": self.allow_missing}
        if self.split is not None:
            wire["split"] = self.split.to_wire()
        return wire


def resolve(request: JobRequest, scene: SceneInfo, auto_tiles: int = MIN_TILES) -> RenderSettings:
    """Fill what the request left open from the scene, and check the result. A split job (request.split)
    gets request.split tiles, or `auto_tiles` (what the farm suits) when it asked for 0."""
    start = scene.frame_start if request.frame_start is None else request.frame_start
    end = scene.frame_end if request.frame_end is None else request.frame_end
    step = request.frame_step or scene.frame_step or 1
    if end < start:
        raise SettingsError(f"frame range {start}-{end} ends before it starts")
    count = (end - start) // step + 1
    if count > MAX_FRAMES_PER_JOB:
        raise SettingsError(f"{count} frames is more than the {MAX_FRAMES_PER_JOB} a job may have")
    file_format = request.file_format or scene.file_format
    if file_format not in IMAGE_FORMATS:
        # A scene set to write a movie (or an unusual format) renders frames as PNG on the farm.
        file_format = DEFAULT_FORMAT
    percentage = request.percentage or scene.percentage
    height = max(1, scene.resolution_y * percentage // 100)
    tiles = margin = 0
    chunk = request.chunk
    if request.split is not None:
        if count != 1:
            raise SettingsError(f"a split job renders one frame, not the {count} frames {start}-{end}; ask for one "
                                "frame (--frame N)")
        if file_format not in SPLIT_FORMATS:
            raise SettingsError(f"a split frame is stitched into {', '.join(SPLIT_FORMATS)}, not {file_format}")
        if height < MIN_TILES:
            raise SettingsError(f"an image {height} pixels high cannot be split")
        tiles = max(MIN_TILES, min(request.split or auto_tiles, height, MAX_TILES))
        margin = scene.split_margin
        chunk = 1  # one tile per lease: tiles spread over every client, a lost one goes elsewhere alone
    return RenderSettings(
        frames=tuple(range(start, end + 1, step)),
        chunk=chunk,
        file_format=file_format,
        samples=request.samples,
        percentage=percentage,
        fps=scene.fps,
        resolution_x=max(1, scene.resolution_x * percentage // 100),
        resolution_y=height,
        device=request.device,
        tiles=tiles,
        margin=margin,
        allow_missing=request.allow_missing,
    )


@dataclass(frozen=True)
class Assignment:
    """The settings of an ASSIGN message, checked on the client before they are applied."""

    file_format: str
    samples: int | None
    percentage: int | None
    device: str | None
    split: TileSpec | None = None
    allow_missing: bool = False


def validate_assignment(raw: dict[str, Any]) -> Assignment:
    file_format = raw.get("file_format")
    if file_format not in IMAGE_FORMATS:
        raise ProtocolError(f"assignment asks for unknown format {file_format!r}")
    device = raw.get("device")
    if device is not None and device not in DEVICE_KINDS:
        raise ProtocolError(f"assignment asks for unknown device kind {device!r}")
    try:
        samples = _int_or_none(raw, "samples", 1, MAX_SAMPLES)
        percentage = _int_or_none(raw, "percentage", 1, MAX_PERCENTAGE)
    except SettingsError as exc:
        raise ProtocolError(str(exc)) from None
    split = None
    if raw.get("split") is not None:
        split = TileSpec.from_wire(raw["split"])
        if file_format not in SPLIT_FORMATS:
            raise ProtocolError(f"assignment asks to split a {file_format} frame")
    allow_missing = raw.get("allow_missing", False)
    if not isinstance(allow_missing, bool):
        raise ProtocolError(f"assignment has a bad allow_missing {allow_missing!r}")
    return Assignment(file_format, samples, percentage, device, split, allow_missing)
