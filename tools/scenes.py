"""Generate small animated .blend scenes with bpy (for the demo, the tests and the benchmarks).

    python -m tools.scenes OUT.blend [--frames 12] [--size 64x36] [--samples 4] [--fps 24]
        [--engine CYCLES] [--no-camera] [--fail] [--camera-move] [--subdivisions N] [--texture PIXELS]

A cube slides across the view and spins, so neighbouring frames differ where it moves. With --camera-move the
cube stands still and the camera travels instead: a static scene seen by a moving camera, whose BVH and images
Cycles can keep between frames (render.use_persistent_data). --subdivisions adds an ico sphere of 20 * 4^N
triangles, --texture an image of PIXELS x PIXELS random colours packed into the file, on the floor: what a
render has to build (BVH) and load (images) before its first sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def build(out: Path, *, frames: int, width: int, height: int, samples: int, fps: int, engine: str,
          camera: bool, file_format: str, fail: bool = False, view_transform: str | None = None,
          script_marker: Path | None = None, slow_frame: int | None = None, film_transparent: bool = False,
          color_depth: str | None = None, denoise: bool = False, adaptive: bool = True,
          python_driver: str | None = None, tile_size: int | None = None, camera_move: bool = False,
          subdivisions: int = 0, texture: int = 0) -> None:
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.name = "Demo"
    render = scene.render
    render.engine = engine
    render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
    render.fps, render.fps_base = fps, 1.0
    render.image_settings.file_format = file_format
    if film_transparent:
        # The world is not rendered: pixels the floor and the cube leave empty are transparent (RGBA output).
        render.film_transparent = True
        render.image_settings.color_mode = "RGBA"
    if color_depth:
        render.image_settings.color_depth = color_depth
    if view_transform:
        scene.view_settings.view_transform = view_transform
    scene.frame_start, scene.frame_end = 1, frames
    if engine == "CYCLES":
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = denoise
        scene.cycles.use_adaptive_sampling = adaptive
        scene.cycles.seed = 0
        if tile_size:
            # Tile by tile: a background Cycles reports its progress per tile (its samples only now and then).
            scene.cycles.use_auto_tile = True
            scene.cycles.tile_size = tile_size

    world = bpy.data.worlds.new("World")
    world.color = (0.05, 0.06, 0.08)
    scene.world = world

    mesh = bpy.data.meshes.new("Floor")
    mesh.from_pydata([(-6, -6, 0), (6, -6, 0), (6, 6, 0), (-6, 6, 0)], [], [(0, 1, 2, 3)])
    floor = bpy.data.objects.new("Floor", mesh)
    scene.collection.objects.link(floor)

    bpy.ops.mesh.primitive_cube_add(size=1.2, location=(-2.5, 0, 0.6))
    cube = bpy.context.active_object
    material = bpy.data.materials.new("Orange")
    material.diffuse_color = (1.0, 0.35, 0.05, 1.0)
    bsdf = material.node_tree.nodes.get("Principled BSDF") if material.node_tree else None
    if bsdf is not None:
        bsdf.inputs["Base Color"].default_value = (1.0, 0.35, 0.05, 1.0)
    cube.data.materials.append(material)
    if not camera_move:
        cube.keyframe_insert("location", frame=1)
        cube.keyframe_insert("rotation_euler", frame=1)
        cube.location.x = 2.5
        cube.rotation_euler.z = 3.0
        cube.keyframe_insert("location", frame=frames)
        cube.keyframe_insert("rotation_euler", frame=frames)
    if subdivisions:
        # Real geometry (no modifier): what costs is Cycles' BVH over it, not evaluating it.
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=subdivisions, radius=1.0, location=(1.8, 1.0, 1.0))
        bpy.context.active_object.data.materials.append(material)
    if texture:
        _textured_floor(bpy, floor, texture)

    light_data = bpy.data.lights.new("Sun", type="SUN")
    light_data.energy = 4.0
    light = bpy.data.objects.new("Sun", light_data)
    light.rotation_euler = (0.6, 0.2, 0.4)
    scene.collection.objects.link(light)

    if slow_frame is not None and engine == "CYCLES":
        # One frame with a thousand times the samples: it looks like a client that hangs.
        scene.cycles.use_adaptive_sampling = False
        for frame, count in ((slow_frame - 1, samples), (slow_frame, samples * 1000), (slow_frame + 1, samples)):
            scene.cycles.samples = count
            scene.keyframe_insert("cycles.samples", frame=frame)

    if python_driver is not None:
        # A Python driver on the floor's height (0 to keep the picture): it runs only with scripts allowed.
        driver = floor.driver_add("location", 2).driver
        driver.type = "SCRIPTED"
        driver.expression = python_driver

    if fail:
        # A render border of zero width: Blender refuses every frame with "Image too small".
        render.use_border = True
        render.border_min_x = render.border_max_x = 0.5

    if camera:
        cam_data = bpy.data.cameras.new("Camera")
        cam = bpy.data.objects.new("Camera", cam_data)
        cam.location = (0, -9, 4.5)
        cam.rotation_euler = (1.1, 0, 0)
        scene.collection.objects.link(cam)
        scene.camera = cam
        if camera_move:
            cam.location.x = -2.0
            cam.keyframe_insert("location", frame=1)
            cam.location.x = 2.0
            cam.keyframe_insert("location", frame=frames)

    if script_marker is not None:
        # A registered text block runs when the file is opened with scripts allowed, and leaves a mark.
        text = bpy.data.texts.new("marker.py")
        text.write(f"import pathlib\npathlib.Path({str(script_marker)!r}).write_text('ran')\n")
        text.use_module = True

    out.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(out.resolve()), compress=False)


def _textured_floor(bpy: Any, floor: Any, pixels: int) -> None:
    """An image of random colours (it compresses to nothing less than its size), packed, on the floor."""
    import numpy as np

    image = bpy.data.images.new("Noise", pixels, pixels)
    rng = np.random.default_rng(0)
    values = rng.random(pixels * pixels * 4, dtype=np.float32)
    values[3::4] = 1.0
    image.pixels.foreach_set(values)
    image.pack()
    material = bpy.data.materials.new("Noise")
    if material.node_tree is None:  # (Blender 5 gives every new material its nodes; use_nodes is going away)
        material.use_nodes = True
    tree = material.node_tree
    node = tree.nodes.new("ShaderNodeTexImage")
    node.image = image
    tree.links.new(node.outputs["Color"], tree.nodes["Principled BSDF"].inputs["Base Color"])
    floor.data.materials.append(material)
    floor.data.uv_layers.new(name="UVMap")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scenes", description="Generate an animated test scene.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", default="64x36", help="WIDTHxHEIGHT in pixels")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--engine", default="CYCLES")
    parser.add_argument("--format", default="PNG")
    parser.add_argument("--no-camera", action="store_true", help="leave the camera out")
    parser.add_argument("--fail", action="store_true", help="make every render fail with a Blender error")
    parser.add_argument("--slow-frame", type=int, help="give this frame a thousand times the samples")
    parser.add_argument("--script-marker", type=Path, help="embed a script that writes this file when it runs")
    parser.add_argument("--view-transform", help="colour view transform, e.g. Standard (default: Blender's)")
    parser.add_argument("--film-transparent", action="store_true",
                        help="transparent background, RGBA output (PNG, EXR)")
    parser.add_argument("--color-depth", help="bits per channel of the output: 8 or 16 (PNG), 16 or 32 (EXR)")
    parser.add_argument("--denoise", action="store_true", help="denoise the render (Cycles)")
    parser.add_argument("--no-adaptive-sampling", dest="adaptive", action="store_false",
                        help="render every sample of every pixel (Cycles): slow, evenly")
    parser.add_argument("--python-driver", metavar="EXPR",
                        help="a Python driver expression on the floor's height, e.g. to crash on a frame")
    parser.add_argument("--tile-size", type=int, help="render in tiles of this many pixels (Cycles)")
    parser.add_argument("--camera-move", action="store_true",
                        help="the camera travels and the cube stands still (a static scene, a moving camera)")
    parser.add_argument("--subdivisions", type=int, default=0, choices=range(0, 11), metavar="N",
                        help="add an ico sphere of 20 * 4^N triangles (0-10; 0: none)")
    parser.add_argument("--texture", type=int, default=0, metavar="PIXELS",
                        help="put an image of PIXELS x PIXELS random colours, packed into the file, on the floor")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size wants WIDTHxHEIGHT, not {args.size!r}", file=sys.stderr)
        return 2
    build(args.out, frames=args.frames, width=width, height=height, samples=args.samples, fps=args.fps,
          engine=args.engine, camera=not args.no_camera, file_format=args.format, fail=args.fail,
          view_transform=args.view_transform, script_marker=args.script_marker,
          slow_frame=args.slow_frame, film_transparent=args.film_transparent, color_depth=args.color_depth,
          denoise=args.denoise, adaptive=args.adaptive, python_driver=args.python_driver,
          tile_size=args.tile_size, camera_move=args.camera_move, subdivisions=args.subdivisions,
          texture=args.texture)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
