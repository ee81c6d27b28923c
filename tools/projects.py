"""Generate small project folders as artists lay them out: a .blend plus the files it uses at `//` paths.

    python -m tools.projects OUT_DIR [--texture] [--pack] [--library] [--font] [--sequence] [--udim]
        [--drivers N] [--text] [--frames 2] [--size 64x36] [--samples 2]

OUT_DIR/scene.blend is the tools.scenes cube scene plus what is asked for:
  --texture   the floor shows an image texture "wood" at //textures/wood.png (--pack: packed into the file)
  --library   a collection "Props" linked from //lib/props.blend (instanced in the scene)
  --font      a text object "Title" with the font //fonts/title.woff2 (a copy of one of Blender's own)
  --sequence  an image sequence "flip" at //seq/flip_0001.png .. (one file per frame)
  --udim      a UDIM image "tiles" at //udim/tiles.<UDIM>.png with tiles 1001 and 1002
  --drivers N N drivers with Python expressions (not simple ones) on the cube
  --text      a registered text block (text.use_module) that does nothing
Prints the .blend's path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .scenes import build


def _png(path: Path, width: int, height: int, color: tuple[float, float, float, float]) -> None:
    import bpy

    path.parent.mkdir(parents=True, exist_ok=True)
    image = bpy.data.images.new(f"tmp-{path.stem}", width, height)
    image.pixels[:] = list(color) * (width * height)
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)


def _floor_image(image: object) -> None:
    import bpy

    floor = bpy.data.objects["Floor"]
    material = bpy.data.materials.new("FloorMat")
    if material.node_tree is None:  # Blender 4.x; 5.0+ materials always have nodes
        material.use_nodes = True
    nodes = material.node_tree.nodes
    node = nodes.new("ShaderNodeTexImage")
    node.image = image
    bsdf = nodes.get("Principled BSDF")
    material.node_tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    floor.data.materials.append(material)


def make_library(path: Path) -> None:
    """A .blend holding a collection "Props" with one sphere (made in this process, then the file is reset)."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    collection = bpy.data.collections.new("Props")
    bpy.context.scene.collection.children.link(collection)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.8, location=(0, 1.5, 0.8))
    sphere = bpy.context.active_object
    for owner in list(sphere.users_collection):
        owner.objects.unlink(sphere)
    collection.objects.link(sphere)
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=False)


def make(out_dir: Path, *, texture: bool = False, pack: bool = False, library: bool = False, font: bool = False,
         sequence: bool = False, udim: bool = False, drivers: int = 0, text: bool = False, frames: int = 2,
         width: int = 64, height: int = 36, samples: int = 2) -> Path:
    import bpy

    out_dir.mkdir(parents=True, exist_ok=True)
    blend = (out_dir / "scene.blend").resolve()
    bpy.context.preferences.filepaths.save_version = 0  # no scene.blend1 beside it
    if library:
        make_library(out_dir / "lib" / "props.blend")
    build(blend, frames=frames, width=width, height=height, samples=samples, fps=24, engine="CYCLES",
          camera=True, file_format="PNG")  # saved: relative paths below are relative to it
    if texture:
        _png(out_dir / "textures" / "wood.png", 8, 8, (0.6, 0.35, 0.1, 1.0))
        image = bpy.data.images.load("//textures/wood.png")
        image.name = "wood"
        if pack:
            image.pack()
        _floor_image(image)
    if sequence:
        for frame in range(1, frames + 1):
            _png(out_dir / "seq" / f"flip_{frame:04d}.png", 4, 4, (frame / frames, 0.2, 0.2, 1.0))
        image = bpy.data.images.load("//seq/flip_0001.png")
        image.name = "flip"
        image.source = "SEQUENCE"
        _floor_image(image)
    if udim:
        for tile in (1001, 1002):
            _png(out_dir / "udim" / f"tiles.{tile}.png", 4, 4, (0.1, 0.5, 0.1, 1.0))
        image = bpy.data.images.load("//udim/tiles.1001.png")
        image.name = "tiles"
        image.source = "TILED"
        if len(image.tiles) < 2:
            image.tiles.new(tile_number=1002)
        _floor_image(image)
    if library:
        with bpy.data.libraries.load("//lib/props.blend", link=True, relative=True) as (source, target):
            target.collections = ["Props"]
        holder = bpy.data.objects.new("PropsInstance", None)
        holder.instance_type = "COLLECTION"
        holder.instance_collection = target.collections[0]
        bpy.context.scene.collection.objects.link(holder)
    if font:
        fonts = Path(bpy.utils.system_resource("DATAFILES", path="fonts"))
        (out_dir / "fonts").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fonts / "DejaVuSansMono.woff2", out_dir / "fonts" / "title.woff2")
        curve = bpy.data.curves.new("Title", type="FONT")
        curve.body = "MF"
        curve.font = bpy.data.fonts.load("//fonts/title.woff2")
        title = bpy.data.objects.new("Title", curve)
        title.location = (-1.0, 0.0, 2.2)
        title.rotation_euler = (1.1, 0.0, 0.0)
        bpy.context.scene.collection.objects.link(title)
    cube = bpy.data.objects["Cube"]
    for index in range(drivers):
        # A function call: not a simple expression, so only Python can evaluate it.
        driver = cube.driver_add("scale", index % 3).driver
        driver.type = "SCRIPTED"
        driver.expression = "max(1.0, abs(frame) ** 0.0)"
    if text:
        block = bpy.data.texts.new("setup.py")
        block.write("# registered: runs when the file is opened with scripts allowed\n")
        block.use_module = True
    bpy.ops.wm.save_as_mainfile(filepath=str(blend), compress=False, relative_remap=True)
    return blend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.projects", description="Generate a project folder.")
    parser.add_argument("out", type=Path)
    for flag in ("texture", "pack", "library", "font", "sequence", "udim", "text"):
        parser.add_argument(f"--{flag}", action="store_true")
    parser.add_argument("--drivers", type=int, default=0)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", default="64x36")
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(make(args.out, texture=args.texture, pack=args.pack, library=args.library, font=args.font,
               sequence=args.sequence, udim=args.udim, drivers=args.drivers, text=args.text, frames=args.frames,
               width=width, height=height, samples=args.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
