"""Render settings that travel as data: what a user asks for, and what a probe reports.

Both are validated on arrival; a client applies them through the bpy API, never as code.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Annotated, Any

from .assets import MISSING_FILES, MissingFile
from .limits import MAX_FRAMES_PER_JOB
from .schema import (
    FINITE,
    LONG,
    MISSING,
    RANGE,
    TYPE,
    Bool,
    Float,
    Int,
    Record,
    Rule,
    SchemaError,
    Str,
    record_of,
    validate,
)
from .tiles import MAX_MARGIN, MAX_TILES, MIN_TILES, SPLIT_FORMATS, TILE_SPEC, TileSpec

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
#: A frame is declared hung when its render showed no progress (Cycles' samples, any change of Blender's render
#: stats) for this long: never for being slower than the job's other frames. Settable per job (JobRequest.hang_s).
DEFAULT_HANG_S = 600.0
MIN_HANG_S = 1.0
MAX_HANG_S = 7 * 24 * 3600.0
#: A job's Blender: "file" (the version that saved it) or MAJOR.MINOR[.PATCH].
BLENDER_FILE = "file"
_BLENDER_CHOICE = re.compile(r"\d{1,3}\.\d{1,3}(\.\d{1,4})?")
_IMPOSSIBLE_SIZE = "probe result has an impossible frame rate, resolution or percentage"
_IMPOSSIBLE_SPLIT = "probe result has an impossible split margin, quality or EXR codec"
_IMPOSSIBLE_COUNTS = "probe result has impossible counts of missing files or scripts"
_FORMAT_WORDS = f"format must be one of {', '.join(IMAGE_FORMATS)}, not {{value!r}}"
_DEVICE_WORDS = f"device must be one of {', '.join(DEVICE_KINDS)}, not {{value!r}}"
_BLENDER_WORDS = f"blender must be {BLENDER_FILE!r} or a version such as 4.5 or 5.3.1, not {{value!r}}"


class SettingsError(SchemaError, ValueError):
    """A job's settings are invalid; the message says which and why. (A SchemaError, so what a peer sends is
    refused with one error type; a ValueError, as it always was for the callers that check settings.)"""


#: How a setting's problem reads: the whole-number ones are named as the submitter wrote them.
_SETTING_WORDS = {TYPE: "{name} must be {expected}, not {value!r}",
                  RANGE: "{name} must be between {low} and {high}, not {value}"}


def _blender_choice(value: str) -> bool:
    return value == BLENDER_FILE or _BLENDER_CHOICE.fullmatch(value) is not None


@dataclass(frozen=True)
class JobRequest:
    """What a submitter asks for; None means "take it from the .blend's scene"."""

    frame_start: Annotated[int | None, Int(-MAX_FRAME, MAX_FRAME)] = None
    frame_end: Annotated[int | None, Int(-MAX_FRAME, MAX_FRAME)] = None
    frame_step: Annotated[int | None, Int(1, MAX_FRAME)] = None
    chunk: Annotated[int, Int(1, MAX_CHUNK, absent_if_none=True)] = DEFAULT_CHUNK
    file_format: Annotated[str | None, Str(choices=IMAGE_FORMATS, message=_FORMAT_WORDS)] = None
    samples: Annotated[int | None, Int(1, MAX_SAMPLES)] = None
    percentage: Annotated[int | None, Int(1, MAX_PERCENTAGE)] = None
    # "CPU" or "GPU": only clients rendering on that kind of device
    device: Annotated[str | None, Str(choices=DEVICE_KINDS, message=_DEVICE_WORDS)] = None
    # one frame cut into this many tiles; 0: as many as the farm's clients suit
    split: Annotated[int | None, Int(0, MAX_TILES)] = None
    # Which Blender renders it: None, the first client to render pins the job to its version; "file",
    # the version that saved the .blend; "5.3" any 5.3.x (then pinned to the first one); "5.3.1" exactly.
    blender: Annotated[str | None, Str(check=_blender_choice, message=_BLENDER_WORDS)] = None
    # Render even though the probe found files missing (the job carries the list as a warning).
    allow_missing: Annotated[bool, Bool(absent_if_none=True)] = False
    # Only clients started with --allow-scripts render it (and read its scene): the scene needs its Python.
    needs_scripts: Annotated[bool, Bool(absent_if_none=True)] = False
    # Seconds a frame's render may show no progress before it is declared hung (None: DEFAULT_HANG_S).
    hang_s: Annotated[float | None, Float(MIN_HANG_S, MAX_HANG_S)] = None
    # Keep Cycles' persistent data (BVH, images, shaders) between the frames a warm client renders: a static
    # scene seen by a moving camera renders without rebuilding its BVH. False: as the file was saved.
    persistent_data: Annotated[bool, Bool(absent_if_none=True)] = False

    @property
    def hang_limit_s(self) -> float:
        return DEFAULT_HANG_S if self.hang_s is None else self.hang_s

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> JobRequest:
        return cls(**validate(_JOB_REQUEST, raw, error=SettingsError))


_JOB_REQUEST = record_of(JobRequest, messages=_SETTING_WORDS, message={TYPE: "settings must be a map"}, rules=[
    Rule(lambda v: v.get("split") != 1, f"split must be 0 (auto) or between {MIN_TILES} and {MAX_TILES}, not 1"),
    Rule(lambda v: v.get("frame_start") is None or v.get("frame_end") is None or v["frame_end"] >= v["frame_start"],
         "frame range {frame_start}-{frame_end} ends before it starts"),
])


@dataclass(frozen=True)
class SceneInfo:
    """The settings a client read from a .blend's active scene."""

    scene: str
    engine: str
    frame_start: int  # (the frame range is a rule of the record below)
    frame_end: int
    frame_step: int
    fps: Annotated[float, Float(above=0, high=MAX_FPS, message={RANGE: _IMPOSSIBLE_SIZE})]
    resolution_x: Annotated[int, Int(1, message={RANGE: _IMPOSSIBLE_SIZE})]
    resolution_y: Annotated[int, Int(1, message={RANGE: _IMPOSSIBLE_SIZE})]
    percentage: Annotated[int, Int(1, MAX_PERCENTAGE, message={RANGE: _IMPOSSIBLE_SIZE})]
    file_format: str
    has_camera: bool = True
    # What split-frame rendering needs to know: rows a band must be rendered beyond its edges for what
    # looks at neighbouring pixels (denoising, compositing), and how the stitched frame is encoded.
    split_margin: Annotated[int, Int(0, MAX_MARGIN, message={RANGE: _IMPOSSIBLE_SPLIT})] = 0
    quality: Annotated[int, Int(0, 100, message={RANGE: _IMPOSSIBLE_SPLIT})] = 90  # JPEG quality
    exr_codec: Annotated[str, Str(max_len=32, message={LONG: _IMPOSSIBLE_SPLIT})] = "ZIP"
    # What the scene needs beyond the .blend (protocol.assets): files the probing client could not find
    # (at most MAX_MISSING_FILES by name, missing_total in all), and what only Python evaluates.
    # An older client sends no list: nothing known to be missing.
    missing: Annotated[tuple[MissingFile, ...], MISSING_FILES] = ()
    missing_total: Annotated[int, Int(0, 1 << 31, message={RANGE: _IMPOSSIBLE_COUNTS})] = 0
    python_drivers: Annotated[int, Int(0, 1 << 31, message={RANGE: _IMPOSSIBLE_COUNTS})] = 0
    registered_texts: Annotated[int, Int(0, 1 << 31, message={RANGE: _IMPOSSIBLE_COUNTS})] = 0

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        wire["missing"] = [m.to_wire() for m in self.missing]
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> SceneInfo:
        values = validate(_SCENE_INFO, raw)
        values["missing"] = tuple(MissingFile(**item) for item in values.get("missing", ()))
        return cls(**values)


_SCENE_INFO = record_of(
    SceneInfo, message={TYPE: "probe result is not a map"},
    messages={MISSING: "probe result is incomplete: it lacks {name!r}", TYPE: "probe result has a bad {name!r}",
              FINITE: "probe result has a {name!r} that is not a finite number: {value!r}"},
    rules=[Rule(lambda v: v["frame_step"] >= 1 and v["frame_start"] <= v["frame_end"]
                and max(abs(v["frame_start"]), abs(v["frame_end"])) <= MAX_FRAME,
                "probe result has an impossible frame range {frame_start}-{frame_end} step {frame_step}")])


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
    persistent_data: bool = False  # the client keeps Cycles' render data between frames (JobRequest)

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
                "device": self.device, "allow_missing": self.allow_missing,
                "persistent_data": self.persistent_data}
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
        persistent_data=request.persistent_data,
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
    persistent_data: bool = False


#: The settings of an ASSIGN message as they travel (what resolve() made of the request, to_assignment()).
_ASSIGNMENT = Record({
    "file_format": Str(choices=IMAGE_FORMATS, message="assignment asks for unknown format {value!r}"),
    "samples": Int(1, MAX_SAMPLES, optional=True, nullable=True),
    "percentage": Int(1, MAX_PERCENTAGE, optional=True, nullable=True),
    "device": Str(choices=DEVICE_KINDS, optional=True, nullable=True,
                  message="assignment asks for unknown device kind {value!r}"),
    "split": TILE_SPEC.but(optional=True, absent_if_none=True),
    "allow_missing": Bool(optional=True, message="assignment has a bad allow_missing {value!r}"),
    "persistent_data": Bool(optional=True, message="assignment has a bad persistent_data {value!r}"),
}, messages=_SETTING_WORDS, message={TYPE: "assignment settings must be a map"}, rules=[
    Rule(lambda v: "split" not in v or v["file_format"] in SPLIT_FORMATS,
         "assignment asks to split a {file_format} frame"),
])


def validate_assignment(raw: dict[str, Any]) -> Assignment:
    values = validate(_ASSIGNMENT, raw)
    split = values.get("split")
    return Assignment(values["file_format"], values.get("samples"), values.get("percentage"), values.get("device"),
                      None if split is None else TileSpec(**split), values.get("allow_missing", False),
                      values.get("persistent_data", False))
