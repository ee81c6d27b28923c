"""Generate small project folders as artists lay them out: a .blend plus the files it uses at `//` paths.

    python -m tools.projects OUT_DIR [--texture] [--pack] [--library] [--deep] [--font] [--sequence] [--udim]
        [--particles] [--external DIR] [--script-driver] [--drivers N] [--text] [--frames 2] [--size 64x36]
        [--samples 2]

OUT_DIR/scene.blend is the tools.scenes cube scene plus what is asked for (each in view of the camera):
  --texture   the floor shows the image "wood" at //textures/wood.png (--pack: packed into the file)
  --library   a collection "Props" linked from //lib/props.blend, instanced in the scene; its sphere shows the
              library's own texture //tex/marble.png (OUT_DIR/lib/tex/marble.png: relative to the library)
  --deep      (with --library) props.blend links a collection "Rocks" from its //deep/rock.blend, whose cube shows
              rock.blend's own //tex/rock.png: a library two levels deep with its own texture
  --font      a text object "Title" with the font //fonts/title.ttf (a free font found on this machine; Blender's
              own .woff2 where there is none)
  --sequence  the cube shows the image sequence "flip" at //seq/flip_0001.png .. (one colour per frame)
  --udim      a plane shows the UDIM image "tiles" at //textures/tiles.<UDIM>.png, tiles 1001 and 1002
  --particles particles baked to a disk cache, //blendcache_scene/ (Blender finds it by the .blend's name)
  --external  a plane shows DIR/noise.png by its absolute path (outside the project)
  --script-driver  a registered text block defines mf_wobble(), which a driver on the cube's height calls:
              rendered with scripts allowed the cube is taller on odd frames
  --drivers N N drivers with Python expressions (not simple ones) on the cube
  --text      a registered text block (text.use_module) that does nothing
Prints the .blend's path. Textures are two-tone checkers, so that a missing or misplaced one shows.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from .scenes import build

#: Free fonts looked for on this machine, in order; Blender's own (a .woff2) where none is there.
FONTS = ("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
         "/usr/share/fonts/TTF/DejaVuSans.ttf",
         "/Library/Fonts/Arial Unicode.ttf",
         "C:/Windows/Fonts/arial.ttf")
DRIVER_SCRIPT = '''import bpy


def mf_wobble(frame):
    """The cube's height: taller on odd frames."""
    return 1.6 if int(frame) % 2 else 0.8


bpy.app.driver_namespace["mf_wobble"] = mf_wobble
'''


def font_file() -> Path:
    for candidate in FONTS:
        if Path(candidate).is_file():
            return Path(candidate)
    import bpy

    return Path(bpy.utils.system_resource("DATAFILES", path="fonts")) / "DejaVuSansMono.woff2"


def png(path: Path, color: tuple[float, float, float], size: int = 8) -> None:
    import bpy

    path.parent.mkdir(parents=True, exist_ok=True)
    image = bpy.data.images.new(f"tmp-{path.stem}", size, size)
    pixels: list[float] = []
    for y in range(size):
        for x in range(size):
            k = 1.0 if (x + y) % 2 else 0.4
            pixels += [color[0] * k, color[1] * k, color[2] * k, 1.0]
    image.pixels[:] = pixels
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)


def textured(obj: Any, image: Any, name: str) -> None:
    """Give obj one material showing image (nearest texel, so that a missing or other texture shows)."""
    import bpy

    material = bpy.data.materials.new(name)
    if material.node_tree is None:  # Blender 4.x; 5.0+ materials always have nodes
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


def _load(path: str, name: str) -> Any:
    import bpy

    image = bpy.data.images.load(path)
    image.name = name
    return image


def _instance(name: str, collection: Any, owner: Any) -> None:
    import bpy

    holder = bpy.data.objects.new(name, None)
    holder.instance_type = "COLLECTION"
    holder.instance_collection = collection
    owner.objects.link(holder)


def _link(path: str, collection: str) -> Any:
    import bpy

    with bpy.data.libraries.load(path, link=True, relative=True) as (_source, target):
        target.collections = [collection]
    return target.collections[0]


def _collection_with(name: str, add: Any, location: tuple[float, float, float], image: str, material: str) -> Any:
    """A collection `name` holding one new mesh object (add(location=...)) textured by the file's own `image`."""
    import bpy

    collection = bpy.data.collections.new(name)
    bpy.context.scene.collection.children.link(collection)
    add(location=location)
    obj = bpy.context.active_object
    for owner in list(obj.users_collection):
        owner.objects.unlink(obj)
    collection.objects.link(obj)
    textured(obj, _load(image, material.lower()), material)
    return collection


def _save(**options: Any) -> None:
    """Save without a .blend1 beside the file (factory settings, read before each file, turn it back on)."""
    import bpy

    bpy.context.preferences.filepaths.save_version = 0
    bpy.ops.wm.save_as_mainfile(**options)


def make_deep_library(path: Path) -> None:
    """lib/deep/rock.blend: a collection "Rocks" (a small cube) with rock.blend's own //tex/rock.png."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(filepath=str(path), compress=False)  # saved first: // is the library's folder
    png(path.parent / "tex" / "rock.png", (0.9, 0.9, 0.1))
    _collection_with("Rocks", lambda location: bpy.ops.mesh.primitive_cube_add(size=0.8, location=location),
                     (2.6, 1.6, 0.4), "//tex/rock.png", "Rock")
    _save(filepath=str(path), compress=False, relative_remap=True)


def make_library(path: Path, *, deep: bool = False) -> None:
    """lib/props.blend: a collection "Props" (a sphere) with the library's own //tex/marble.png."""
    import bpy

    if deep:
        make_deep_library(path.parent / "deep" / "rock.blend")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(filepath=str(path), compress=False)
    png(path.parent / "tex" / "marble.png", (0.2, 0.3, 0.9))
    props = _collection_with("Props", lambda location: bpy.ops.mesh.primitive_uv_sphere_add(radius=0.7,
                                                                                               location=location),
                             (1.2, 0.5, 0.7), "//tex/marble.png", "Marble")
    if deep:
        _instance("RocksInstance", _link("//deep/rock.blend", "Rocks"), props)
    _save(filepath=str(path), compress=False, relative_remap=True)


def _plane(name: str, size: float, location: tuple[float, float, float],
           rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Any:
    import bpy

    bpy.ops.mesh.primitive_plane_add(size=size, location=location, rotation=rotation)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def _udim(out_dir: Path) -> None:
    for tile, color in ((1001, (0.1, 0.8, 0.1)), (1002, (0.1, 0.8, 0.8))):
        png(out_dir / "textures" / f"tiles.{tile}.png", color, size=4)
    image = _load("//textures/tiles.1001.png", "tiles")
    image.source = "TILED"
    image.filepath = "//textures/tiles.<UDIM>.png"
    if len(image.tiles) < 2:
        image.tiles.new(tile_number=1002)
    board = _plane("Tiles", 1.6, (-0.6, 2.0, 1.1), (1.2, 0.0, 0.0))
    for loop in board.data.uv_layers.active.data:  # u from 0 to 2: the right half shows tile 1002
        loop.uv = (loop.uv[0] * 2.0, loop.uv[1])
    textured(board, image, "Tiles")


def _font(out_dir: Path) -> None:
    import bpy

    source = font_file()
    (out_dir / "fonts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out_dir / "fonts" / f"title{source.suffix}")
    curve = bpy.data.curves.new("Title", type="FONT")
    curve.body = "MF"
    curve.font = bpy.data.fonts.load(f"//fonts/title{source.suffix}")
    title = bpy.data.objects.new("Title", curve)
    title.location = (-1.0, 0.0, 2.2)
    title.rotation_euler = (1.1, 0.0, 0.0)
    bpy.context.scene.collection.objects.link(title)


def _particles() -> None:
    """30 grains thrown up from a plane at frame 1 and baked to //blendcache_<blend name>/ (the file is saved)."""
    import bpy

    scene = bpy.context.scene
    bpy.ops.mesh.primitive_ico_sphere_add(radius=0.12, subdivisions=1, location=(0.0, 0.0, -3.0))  # under the floor
    grain = bpy.context.active_object
    grain.name = "Grain"
    emitter = _plane("Emitter", 1.0, (0.8, -1.5, 1.2))
    emitter.modifiers.new("Spray", type="PARTICLE_SYSTEM")
    system = emitter.particle_systems[0]
    settings = system.settings
    settings.count = 30
    settings.frame_start = settings.frame_end = 1
    settings.lifetime = 100
    settings.normal_factor = 2.0
    settings.render_type = "OBJECT"
    settings.instance_object = grain
    settings.particle_size = 1.0
    emitter.show_instancer_for_render = False
    system.seed = 7
    cache = system.point_cache
    cache.use_disk_cache = True
    cache.frame_start, cache.frame_end = scene.frame_start, scene.frame_end
    with bpy.context.temp_override(scene=scene, object=emitter, active_object=emitter, point_cache=cache):
        bpy.ops.ptcache.bake(bake=True)
    if not cache.is_baked:
        raise RuntimeError("the particle cache did not bake")


def _script_driver() -> None:
    import bpy

    block = bpy.data.texts.new("mf_drivers.py")
    block.write(DRIVER_SCRIPT)
    block.use_module = True
    exec(compile(DRIVER_SCRIPT, "mf_drivers.py", "exec"), {})  # registered here too: the driver is valid when saved
    driver = bpy.data.objects["Cube"].driver_add("scale", 2).driver
    driver.type = "SCRIPTED"
    driver.expression = "mf_wobble(frame)"


def make(out_dir: Path, *, texture: bool = False, pack: bool = False, library: bool = False, deep: bool = False,
         font: bool = False, sequence: bool = False, udim: bool = False, particles: bool = False,
         external: Path | None = None, script_driver: bool = False, drivers: int = 0, text: bool = False,
         frames: int = 2, width: int = 64, height: int = 36, samples: int = 2) -> Path:
    import bpy

    out_dir.mkdir(parents=True, exist_ok=True)
    blend = (out_dir / "scene.blend").resolve()
    if library:
        make_library(out_dir / "lib" / "props.blend", deep=deep)
    build(blend, frames=frames, width=width, height=height, samples=samples, fps=24, engine="CYCLES",
          camera=True, file_format="PNG")  # saved: relative paths below are relative to it
    if texture:
        png(out_dir / "textures" / "wood.png", (0.6, 0.35, 0.1))
        image = _load("//textures/wood.png", "wood")
        if pack:
            image.pack()
        textured(bpy.data.objects["Floor"], image, "Wood")
    if sequence:
        for frame in range(1, frames + 1):
            png(out_dir / "seq" / f"flip_{frame:04d}.png", (0.9 * frame / frames, 0.9, 0.2), size=4)
        image = _load("//seq/flip_0001.png", "flip")
        image.source = "SEQUENCE"
        textured(bpy.data.objects["Cube"], image, "Flip")
    if udim:
        _udim(out_dir)
    if external is not None:
        png(external / "noise.png", (0.9, 0.1, 0.6))
        textured(_plane("Noise", 1.2, (-1.4, 0.8, 0.05)), _load(str((external / "noise.png").resolve()), "noise"),
                 "Noise")
    if library:
        _instance("PropsInstance", _link("//lib/props.blend", "Props"), bpy.context.scene.collection)
    if font:
        _font(out_dir)
    if particles:
        _particles()
    cube = bpy.data.objects["Cube"]
    for index in range(drivers):
        # A function call: not a simple expression, so only Python can evaluate it.
        driver = cube.driver_add("scale", index % 3).driver
        driver.type = "SCRIPTED"
        driver.expression = "max(1.0, abs(frame) ** 0.0)"
    if script_driver:
        _script_driver()
    if text:
        block = bpy.data.texts.new("setup.py")
        block.write("# registered: runs when the file is opened with scripts allowed\n")
        block.use_module = True
    # No remapping: an absolute path stays absolute, as the artist chose it.
    _save(filepath=str(blend), compress=False, relative_remap=False)
    return blend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.projects", description="Generate a project folder.")
    parser.add_argument("out", type=Path)
    for flag in ("texture", "pack", "library", "deep", "font", "sequence", "udim", "particles", "script-driver",
                 "text"):
        parser.add_argument(f"--{flag}", action="store_true")
    parser.add_argument("--external", type=Path, default=None, metavar="DIR")
    parser.add_argument("--drivers", type=int, default=0)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", default="64x36")
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(make(args.out, texture=args.texture, pack=args.pack, library=args.library, deep=args.deep,
               font=args.font, sequence=args.sequence, udim=args.udim, particles=args.particles,
               external=args.external, script_driver=args.script_driver, drivers=args.drivers, text=args.text,
               frames=args.frames, width=width, height=height, samples=args.samples))
    return 0


if __name__ == "__main__":
    from client.finish import exit_process

    exit_process(main())  # bpy 4.x cannot end by itself once a file's Python drivers were seen
