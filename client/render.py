"""The bpy side of a client: open a .blend once, read its scene, render frames into files.

Only the main thread calls into this module. Settings arrive as validated data and are applied
through the bpy API; nothing from the network is executed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bpy

from protocol.assets import LOG_MISSING, log_warnings, missing_sentence
from protocol.settings import Assignment, SceneInfo
from protocol.tiles import TileSpec

from . import assets, devices, pathmap
from .capture import capture_output
from .devices import Device

log = logging.getLogger(__name__)

#: Rows rendered beyond each band of a split frame, for what looks at neighbouring pixels (protocol.tiles):
#: Cycles' adaptive sampling looks one pixel around; OIDN/OptiX denoising shifts by less than 0.2 % of the
#: range with 32 rows (measured against a full-frame denoise); compositor filters (glare, blur) reach further;
#: EEVEE's screen-space effects (ambient occlusion, reflections, depth of field) look around too.
MARGIN_ADAPTIVE = 2
MARGIN_DENOISE = 32
MARGIN_EEVEE = 32
MARGIN_COMPOSITOR = 64
#: Compositor nodes that only pass the render through.
_PASS_THROUGH_NODES = {"R_LAYERS", "COMPOSITE", "GROUP_OUTPUT", "GROUP_INPUT", "VIEWER", "REROUTE", "FRAME"}
#: The file's own render-region settings, put back after a split frame.
_BORDER_SETTINGS = ("use_border", "use_crop_to_border", "border_min_x", "border_max_x", "border_min_y",
                    "border_max_y")


class RenderError(Exception):
    """Blender could not open a file or render a frame; the text is Blender's own."""

    def __init__(self, message: str, render_log: str = "") -> None:
        super().__init__(message)
        self.render_log = render_log


#: Told of the render's progress: a count that grows whenever Blender's render stats change.
Progress = Callable[[int], None]


@contextmanager
def watch_progress(progress: Progress | None) -> Iterator[None]:
    """Call `progress` with a growing count whenever Blender's render stats change while the block runs.

    Cycles reports "Sample N/M" (and tiles, "Synchronizing object", "Updating shaders") as it goes, EEVEE its
    samples: any change is a sign of life. The handler runs on Blender's render threads too; it only counts."""
    if progress is None:
        yield
        return
    state = {"count": 0, "last": None}

    def changed(stats: Any = None, *_: Any) -> None:
        if stats != state["last"]:
            state["last"] = stats
            state["count"] += 1
            progress(state["count"])

    handlers = bpy.app.handlers.render_stats
    handlers.append(changed)
    try:
        yield
    finally:
        if changed in handlers:
            handlers.remove(changed)


def blender_version() -> str:
    return bpy.app.version_string


class Renderer:
    def __init__(self, *, allow_scripts: bool = False, device: Device = devices.CPU,
                 threads: int | None = None, path_map: tuple[pathmap.Mapping, ...] = (),
                 capture_path: Path | None = None) -> None:
        self.allow_scripts = allow_scripts
        self.capture_path = capture_path  # where a frame's output is caught (a render process's parent reads it)
        self.path_map = path_map  # shared storage reached by another prefix here
        self.device = device  # the client's device; CPU after a GPU failed
        self.threads = threads
        self.current_sha: str | None = None
        self._original: dict[str, Any] = {}
        self._job_device = device  # the device of the current assignment
        self._split: TileSpec | None = None  # the current assignment renders tiles of one frame
        self.needs = assets.Needs()  # what the open file lacks (files) or needs (scripts)
        self.frame_warnings: list[str] = []  # the last frame's: files Blender found missing while rendering it
        self._blend_dir = ""

    def open(self, path: Path, sha256: str) -> None:
        """Open the .blend unless it is already the open one (warm: one open per job file)."""
        if self.current_sha == sha256:
            return
        self.current_sha = None
        try:
            bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False, use_scripts=self.allow_scripts)
        except RuntimeError as exc:
            raise RenderError(_clean(exc)) from None
        if self.path_map:
            try:
                pathmap.apply(self.path_map)
            except RuntimeError as exc:  # a library that cannot be reloaded from its mapped place
                raise RenderError(f"path map: {_clean(exc)}") from None
        scene = bpy.context.scene
        self._original = {
            "samples": _get_samples(scene),
            "percentage": scene.render.resolution_percentage,
            "exr_codec": scene.render.image_settings.exr_codec,
            "persistent_data": scene.render.use_persistent_data,
            "border": {name: getattr(scene.render, name) for name in _BORDER_SETTINGS},
        }
        # Every file the scene uses is looked for before anything renders (never a silent wrong frame).
        self.needs = assets.scan()
        self._blend_dir = str(path.resolve().parent)
        self.current_sha = sha256
        log.info("opened %s (scene %r, engine %s)", path.name, scene.name, scene.render.engine)

    @property
    def missing_sentence(self) -> str:
        """'missing files: //textures/wood.png (image "wood")' for the open file, '' when nothing is missing."""
        needs = self.needs
        return missing_sentence(needs.missing, needs.missing_total) if needs.missing else ""

    def scene_info(self) -> SceneInfo:
        scene = bpy.context.scene
        render = scene.render
        settings = render.image_settings
        file_format = settings.file_format
        if getattr(settings, "media_type", "IMAGE") == "VIDEO":
            file_format = "FFMPEG"
        return SceneInfo(
            scene=scene.name, engine=render.engine,
            frame_start=scene.frame_start, frame_end=scene.frame_end, frame_step=scene.frame_step,
            fps=render.fps / render.fps_base,
            resolution_x=render.resolution_x, resolution_y=render.resolution_y,
            percentage=render.resolution_percentage, file_format=file_format,
            has_camera=scene.camera is not None,
            split_margin=split_margin(scene), quality=settings.quality, exr_codec=settings.exr_codec,
            missing=self.needs.missing, missing_total=self.needs.missing_total,
            python_drivers=self.needs.python_drivers, registered_texts=self.needs.registered_texts,
        )

    def apply(self, job: Assignment) -> None:
        """Apply a job's settings; None restores the value the file was saved with."""
        scene = bpy.context.scene
        render = scene.render
        settings = render.image_settings
        if hasattr(settings, "media_type"):
            settings.media_type = "MULTI_LAYER_IMAGE" if job.file_format == "OPEN_EXR_MULTILAYER" else "IMAGE"
        settings.file_format = job.file_format
        render.resolution_percentage = job.percentage or self._original["percentage"]
        _set_samples(scene, job.samples if job.samples is not None else self._original["samples"])
        # A job that requires the CPU renders on it even on a GPU client.
        self._job_device = devices.CPU if job.device == "CPU" else self.device
        devices.apply(scene, self._job_device, self.threads)
        persistent = job.persistent_data or self._original["persistent_data"]
        if render.use_persistent_data != persistent:
            # Turned on, the next frames of this open file reuse Cycles' scene (BVH, images); turned off, it is freed.
            render.use_persistent_data = persistent
            log.info("persistent data %s (%s)", "on" if persistent else "off",
                     "the job's setting" if job.persistent_data else "as the file was saved")
        render.use_file_extension = True
        render.use_overwrite = True
        render.use_placeholder = False
        self._split = job.split
        if job.split is None:
            settings.exr_codec = self._original["exr_codec"]
            for name, value in self._original["border"].items():
                setattr(render, name, value)
            return
        # Tiles of a split frame travel losslessly, in the final format's colours and depth: PNG for PNG and
        # JPEG (which the server encodes once, after stitching), uncompressed EXR for EXR.
        height = render.resolution_y * render.resolution_percentage // 100
        if height != job.split.height:
            raise RenderError(f"this scene renders {height} rows, but the split frame has {job.split.height}")
        if job.file_format == "OPEN_EXR":
            settings.exr_codec = "NONE"
            crop = True  # only the rows rendered: nothing is quantised, so nothing depends on the position
        else:
            mode, depth = settings.color_mode, settings.color_depth  # what Blender allows for the final format
            settings.file_format = "PNG"
            settings.color_mode = mode
            settings.color_depth = depth if job.file_format == "PNG" else "8"
            # The whole canvas: 8-bit dithering follows the pixel's place in the image it is written from, so
            # only a full-size tile dithers like a full render. The rows outside the border compress to nothing.
            crop = False
        render.use_border = True
        render.use_crop_to_border = crop
        render.border_min_x, render.border_max_x = 0.0, 1.0

    @property
    def split(self) -> TileSpec | None:
        """The split frame the current assignment renders tiles of (None: whole frames)."""
        return self._split

    def render_frame(self, frame: int, directory: Path, *, progress: Progress | None = None,
                     abandon: Callable[[], bool] | None = None) -> Path:
        """Render into `directory`; `progress` is told of signs of life. (`abandon` is for a render process,
        which can stop a frame by ending its child; a render in this process cannot be stopped.)"""
        with watch_progress(progress):
            return self._render_with_fallback(frame, directory)

    def _render_with_fallback(self, frame: int, directory: Path) -> Path:
        try:
            return self._render_frame(frame, directory)
        except RenderError as exc:
            if not self._job_device.is_gpu:
                raise
            # The GPU failed: fall back to the CPU for good, with the reason in the log.
            log.warning("rendering on %s failed (%s); falling back to the CPU", self._job_device.describe(), exc)
            self.device = self._job_device = devices.CPU
            devices.apply(bpy.context.scene, devices.CPU, self.threads)
            return self._render_frame(frame, directory)

    def _render_frame(self, item: int, directory: Path) -> Path:
        """Render a frame, or (for a split frame) tile number `item` of it."""
        scene = bpy.context.scene
        frame, name = item, f"frame_{item:04d}"
        if self._split is not None:
            if not 0 <= item < self._split.tiles:
                raise RenderError(f"the split frame has no tile {item}")
            frame, name = self._split.frame, f"tile_{item:04d}"
            scene.render.border_min_y, scene.render.border_max_y = self._split.border(item)
        scene.frame_set(frame)
        if scene.frame_current != frame:  # Blender clamps frames beyond its range without a word
            raise RenderError(f"Blender cannot render frame {frame}: it is outside Blender's frame range")
        scene.render.filepath = str(directory / name)
        error = None
        self.frame_warnings = []
        with capture_output(LOG_MISSING, self.capture_path) as output:
            try:
                bpy.ops.render.render(write_still=True, scene=scene.name)
            except RuntimeError as exc:
                error = _clean(exc)
        # Blender's own words about files it could not find, with this client's folder shown as '//'.
        self.frame_warnings = log_warnings("\n".join(output.matched), self._blend_dir)
        if error is not None:
            raise RenderError(error, output.text)
        path = Path(scene.render.filepath + scene.render.file_extension)
        if not path.is_file():
            raise RenderError(f"Blender reported no error but wrote no file for frame {frame}", output.text)
        return path


def split_margin(scene: Any) -> int:
    """Rows a band of a split frame must be rendered beyond its edges for this scene (see the MARGIN_*)."""
    margin = 0
    engine = scene.render.engine
    if engine == "CYCLES":
        if scene.cycles.use_adaptive_sampling:
            margin = MARGIN_ADAPTIVE
        if scene.cycles.use_denoising and any(layer.use and layer.cycles.use_denoising
                                              for layer in scene.view_layers):
            margin = MARGIN_DENOISE
    elif engine.startswith("BLENDER_EEVEE"):
        margin = MARGIN_EEVEE
    if hasattr(scene, "compositing_node_group"):  # Blender 5.0+
        tree = scene.compositing_node_group
    else:
        tree = scene.node_tree if scene.use_nodes else None
    if scene.render.use_compositing and tree is not None:
        if any(node.type not in _PASS_THROUGH_NODES for node in tree.nodes):
            margin = max(margin, MARGIN_COMPOSITOR)
    return margin


def _get_samples(scene: Any) -> int | None:
    engine = scene.render.engine
    if engine == "CYCLES":
        return scene.cycles.samples
    if engine.startswith("BLENDER_EEVEE"):
        return scene.eevee.taa_render_samples
    return None


def _set_samples(scene: Any, samples: int | None) -> None:
    if samples is None:
        return
    engine = scene.render.engine
    if engine == "CYCLES":
        scene.cycles.samples = samples
    elif engine.startswith("BLENDER_EEVEE"):
        scene.eevee.taa_render_samples = samples


def _clean(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
