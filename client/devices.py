"""Which device Cycles renders on: find what this Blender can use, choose, apply, fall back.

`auto` takes the best GPU backend available (OptiX, then CUDA, HIP, Metal, oneAPI) and the CPU
when there is none. A backend asked for by name that is absent is an error at start-up, never a
silent switch to another device. A GPU that fails to render falls back to the CPU with the
reason logged (see Renderer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import bpy

log = logging.getLogger(__name__)

GPU_BACKENDS = ("OPTIX", "CUDA", "HIP", "METAL", "ONEAPI")
CHOICES = ("auto", "CPU", *GPU_BACKENDS)


class DeviceError(Exception):
    """The device asked for cannot be used here; the message says what can."""


@dataclass(frozen=True)
class Device:
    backend: str  # "CPU" or one of GPU_BACKENDS
    names: tuple[str, ...]  # the devices used, for status
    ids: tuple[str, ...] = ()

    @property
    def is_gpu(self) -> bool:
        return self.backend != "CPU"

    def describe(self) -> str:
        return self.backend if not self.names else f"{self.backend} ({', '.join(self.names)})"


CPU = Device("CPU", ())


def _cycles_prefs() -> Any:
    addon = bpy.context.preferences.addons.get("cycles")
    return addon.preferences if addon is not None else None


def available() -> dict[str, list[Any]]:
    """GPU devices per backend that this Blender can see (CPU entries left out)."""
    prefs = _cycles_prefs()
    if prefs is None:
        return {}
    found: dict[str, list[Any]] = {}
    for backend in GPU_BACKENDS:
        try:
            devices = [d for d in prefs.get_devices_for_type(backend) if d.type == backend]
        except (TypeError, ValueError, RuntimeError):  # backend not compiled into this build
            continue
        if devices:
            found[backend] = devices
    return found


def inventory() -> list[str]:
    """Every device, for the client's report: ["CPU", "OPTIX: NVIDIA ...", ...]."""
    return ["CPU", *(f"{backend}: {d.name}" for backend, devices in available().items() for d in devices)]


def choose(requested: str, gpu_index: int | None = None) -> Device:
    requested = requested.upper() if requested.lower() != "auto" else "auto"
    if requested not in CHOICES:
        raise DeviceError(f"unknown device {requested!r}; choose one of {', '.join(CHOICES)}")
    if requested == "CPU":
        return CPU
    found = available()
    if requested == "auto":
        backend = next((b for b in GPU_BACKENDS if b in found), None)
        if backend is None:
            log.info("no GPU found for Cycles; rendering on the CPU")
            return CPU
    else:
        backend = requested
        if backend not in found:
            have = ", ".join(["CPU", *found])
            raise DeviceError(f"{backend} was asked for, but this Blender finds no {backend} device "
                              f"(available: {have})")
    devices = found[backend]
    if gpu_index is not None:
        if not 0 <= gpu_index < len(devices):
            raise DeviceError(f"--gpu-index {gpu_index} is out of range: {backend} has {len(devices)} device(s)")
        devices = [devices[gpu_index]]
    return Device(backend, tuple(d.name for d in devices), tuple(d.id for d in devices))


def apply(scene: Any, device: Device, threads: int | None) -> None:
    """Point the open file's scene (and the Cycles preferences) at the chosen device."""
    render = scene.render
    if threads:
        render.threads_mode = "FIXED"
        render.threads = threads
    if render.engine != "CYCLES":
        return
    if not device.is_gpu:
        scene.cycles.device = "CPU"
        return
    prefs = _cycles_prefs()
    prefs.compute_device_type = device.backend
    for candidate in prefs.get_devices_for_type(device.backend):
        candidate.use = candidate.id in device.ids
    scene.cycles.device = "GPU"
