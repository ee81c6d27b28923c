"""The bpy side of a client: open a .blend once, read its scene, render frames into files.

Only the main thread calls into this module. Settings arrive as validated data and are applied
through the bpy API; nothing from the network is executed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import bpy

from protocol.settings import Assignment, SceneInfo

from . import devices
from .capture import capture_output
from .devices import Device

log = logging.getLogger(__name__)


class RenderError(Exception):
    """Blender could not open a file or render a frame; the text is Blender's own."""

    def __init__(self, message: str, render_log: str = "") -> None:
        super().__init__(message)
        self.render_log = render_log


def blender_version() -> str:
    return bpy.app.version_string


class Renderer:
    def __init__(self, *, allow_scripts: bool = False, device: Device = devices.CPU,
                 threads: int | None = None) -> None:
        self.allow_scripts = allow_scripts
        self.device = device  # the client's device; CPU after a GPU failed
        self.threads = threads
        self.current_sha: str | None = None
        self._original: dict[str, Any] = {}
        self._job_device = device  # the device of the current assignment

    def open(self, path: Path, sha256: str) -> None:
        """Open the .blend unless it is already the open one (warm: one open per job file)."""
        if self.current_sha == sha256:
            return
        self.current_sha = None
        try:
            bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False, use_scripts=self.allow_scripts)
        except RuntimeError as exc:
            raise RenderError(_clean(exc)) from None
        scene = bpy.context.scene
        self._original = {
            "samples": _get_samples(scene),
            "percentage": scene.render.resolution_percentage,
        }
        self.current_sha = sha256
        log.info("opened %s (scene %r, engine %s)", path.name, scene.name, scene.render.engine)

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
        render.use_file_extension = True
        render.use_overwrite = True
        render.use_placeholder = False

    def render_frame(self, frame: int, directory: Path) -> Path:
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

    def _render_frame(self, frame: int, directory: Path) -> Path:
        scene = bpy.context.scene
        scene.frame_set(frame)
        if scene.frame_current != frame:  # Blender clamps frames beyond its range without a word
            raise RenderError(f"Blender cannot render frame {frame}: it is outside Blender's frame range")
        scene.render.filepath = str(directory / f"frame_{frame:04d}")
        error = None
        with capture_output() as output:
            try:
                bpy.ops.render.render(write_still=True, scene=scene.name)
            except RuntimeError as exc:
                error = _clean(exc)
        if error is not None:
            raise RenderError(error, output.text)
        path = Path(scene.render.filepath + scene.render.file_extension)
        if not path.is_file():
            raise RenderError(f"Blender reported no error but wrote no file for frame {frame}", output.text)
        return path


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
