"""Generate a project folder whose scene needs files beside it (run in its own bpy process).

    python tests/project_files_scene.py OUT_DIR EXTERNAL_DIR [--frames 2]

OUT_DIR/scene.blend (the tools.scenes cube scene, 64x36, 2 samples) with:
  - the floor textured by //textures/wood.png,
  - a collection "Props" linked from //lib/props.blend, whose sphere is textured by the library's own
    //tex/marble.png (OUT_DIR/lib/tex/marble.png: relative to the library, not to the scene),
  - the cube textured by the image sequence //seq/flip_0001.png .. (one colour per frame),
  - a plane textured by EXTERNAL_DIR/noise.png, an absolute path outside the project.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.scenes import build  # noqa: E402


def png(path: Path, color: tuple[float, float, float], size: int = 8) -> None:
    import bpy

    path.parent.mkdir(parents=True, exist_ok=True)
    image = bpy.data.images.new(f"tmp-{path.stem}", size, size)
    # A two-tone checker, so that a texture that is missing or misplaced shows.
    pixels = []
    for y in range(size):
        for x in range(size):
            k = 1.0 if (x + y) % 2 else 0.4
            pixels += [color[0] * k, color[1] * k, color[2] * k, 1.0]
    image.pixels[:] = pixels
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)


def textured(obj: object, image: object, name: str) -> None:
    import bpy

    material = bpy.data.materials.new(name)
    material.use_nodes = True
    nodes = material.node_tree.nodes
    node = nodes.new("ShaderNodeTexImage")
    node.image = image
    if image.source == "SEQUENCE":
        node.image_user.use_auto_refresh = True
        node.image_user.frame_duration = 100
    node.interpolation = "Closest"
    material.node_tree.links.new(node.outputs["Color"], nodes["Principled BSDF"].inputs["Base Color"])
    obj.data.materials.clear()
    obj.data.materials.append(material)


def library(path: Path) -> None:
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=False)  # saved first: // is the library's folder
    png(path.parent / "tex" / "marble.png", (0.2, 0.3, 0.9))
    collection = bpy.data.collections.new("Props")
    bpy.context.scene.collection.children.link(collection)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.7, location=(1.2, 0.5, 0.7))
    sphere = bpy.context.active_object
    for owner in list(sphere.users_collection):
        owner.objects.unlink(sphere)
    collection.objects.link(sphere)
    textured(sphere, bpy.data.images.load("//tex/marble.png"), "Marble")
    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=False, relative_remap=True)


def make(out: Path, external: Path, frames: int) -> Path:
    import bpy

    library(out / "lib" / "props.blend")
    blend = (out / "scene.blend").resolve()
    build(blend, frames=frames, width=64, height=36, samples=2, fps=24, engine="CYCLES", camera=True,
          file_format="PNG")
    png(out / "textures" / "wood.png", (0.6, 0.35, 0.1))
    for frame in range(1, frames + 1):
        png(out / "seq" / f"flip_{frame:04d}.png", (0.9 * frame / frames, 0.9, 0.2), size=4)
    png(external / "noise.png", (0.9, 0.1, 0.6))

    textured(bpy.data.objects["Floor"], bpy.data.images.load("//textures/wood.png"), "Wood")
    flip = bpy.data.images.load("//seq/flip_0001.png")
    flip.source = "SEQUENCE"
    textured(bpy.data.objects["Cube"], flip, "Flip")
    bpy.ops.mesh.primitive_plane_add(size=1.2, location=(-1.4, 0.8, 0.05))
    textured(bpy.context.active_object, bpy.data.images.load(str((external / "noise.png").resolve())), "Noise")
    with bpy.data.libraries.load("//lib/props.blend", link=True, relative=True) as (_source, target):
        target.collections = ["Props"]
    holder = bpy.data.objects.new("PropsInstance", None)
    holder.instance_type = "COLLECTION"
    holder.instance_collection = target.collections[0]
    bpy.context.scene.collection.objects.link(holder)
    bpy.ops.wm.save_as_mainfile(filepath=str(blend), compress=False, relative_remap=False)
    return blend


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("external", type=Path)
    parser.add_argument("--frames", type=int, default=2)
    args = parser.parse_args()
    print(make(args.out, args.external, args.frames))
    return 0


if __name__ == "__main__":
    sys.exit(main())
