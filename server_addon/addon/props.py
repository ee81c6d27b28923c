"""Settings: add-on preferences (server defaults, farm secret), per-file job settings on Scene,
and the window manager's entry to the runtime (not saved in files)."""

from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, PointerProperty, StringProperty

from protocol.settings import DEFAULT_CHUNK, IMAGE_FORMATS, MAX_CHUNK
from protocol.tiles import MAX_TILES

from ..core.actions import MAX_PRIORITY
from ..core.video import CODECS, LOCATIONS, QUALITIES
from . import runtime, session

#: The add-on's module name: "bl_ext.<repository>.microfarm" as an extension, "server_addon" from a checkout.
ADDON_ID = __package__.rpartition(".")[0]
DEFAULT_PORT = 9090
DEFAULT_OUTPUT_DIR = os.path.join(os.path.expanduser("~"), "MicroFarm")

# EnumProperty items must stay referenced while registered, so they are module constants.
_FORMAT_LABELS = {"OPEN_EXR": "OpenEXR", "OPEN_EXR_MULTILAYER": "OpenEXR MultiLayer", "TARGA": "Targa",
                  "WEBP": "WebP"}
FORMAT_ITEMS = [("SCENE", "Scene's Format", "The output format set in the scene (a movie format renders PNG frames)")]
FORMAT_ITEMS += [(name, _FORMAT_LABELS.get(name, name), f"Frames as .{ext} files")
                 for name, ext in IMAGE_FORMATS.items()]
# The choices are core.video's; only their labels are the panel's.
_CODEC_LABELS = {"h264": ("H.264", "MP4, plays everywhere"), "h265": ("H.265", "MP4, smaller files"),
                 "prores": ("ProRes", "MOV, for editing")}
_LOCATION_LABELS = {"frames": ("Beside the Frames", "Inside the job's folder"),
                    "parent": ("Job Folder's Parent", "Next to the job's folder"),
                    "root": ("Output Folder", "The farm's output folder")}
CODEC_ITEMS = [(codec, *_CODEC_LABELS[codec]) for codec in CODECS]
QUALITY_ITEMS = [(quality, quality.title(), "") for quality in QUALITIES]
LOCATION_ITEMS = [(location, *_LOCATION_LABELS[location]) for location in LOCATIONS]


class MicroFarmPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    port: IntProperty(name="Port", default=DEFAULT_PORT, min=0, max=65535,
                      description="TCP port render clients connect to (0 picks a free one)")
    bind_address: StringProperty(name="Bind Address", default="0.0.0.0",
                                 description="Address the server listens on; 0.0.0.0 is every network interface")
    secret: StringProperty(name="Farm Secret", subtype='PASSWORD', default="",
                           description="Optional shared secret; clients must be started with the same --token")
    use_discovery: BoolProperty(name="Announce on the LAN", default=True,
                                description="Advertise the farm over zeroconf so clients find it without an address")
    farm_name: StringProperty(name="Farm Name", default="", description="Name clients see (default: this computer's)")
    output_dir: StringProperty(name="Output Folder", subtype='DIR_PATH', default=DEFAULT_OUTPUT_DIR,
                               description="Rendered frames go to OUTPUT/<job-id>/; the farm keeps its files there too")
    use_web: BoolProperty(name="Web Interface", default=False,
                          description="Also serve the farm's web pages (jobs, clients, uploads) while the server runs")
    web_host: StringProperty(name="Web Address", default="127.0.0.1",
                             description="Address of the web interface; 127.0.0.1 is this computer only "
                                         "(set a farm secret before opening it to the LAN)")
    web_port: IntProperty(name="Web Port", default=8080, min=0, max=65535,
                          description="TCP port of the web interface (0 picks a free one)")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "bind_address")
        layout.prop(self, "port")
        layout.prop(self, "output_dir")
        layout.prop(self, "farm_name")
        layout.prop(self, "secret")
        layout.prop(self, "use_discovery")
        layout.prop(self, "use_web")
        col = layout.column()
        col.active = self.use_web
        col.prop(self, "web_host")
        col.prop(self, "web_port")


class MicroFarmSceneSettings(bpy.types.PropertyGroup):
    """How this file is rendered on the farm (saved with the file)."""

    chunk: IntProperty(name="Frames per Chunk", default=DEFAULT_CHUNK, min=1, max=MAX_CHUNK,
                       description="Frames a client is given at a time")
    use_frame_range: BoolProperty(name="Override Frame Range", default=False,
                                  description="Render these frames instead of the scene's frame range")
    frame_start: IntProperty(name="Start", default=1, description="First frame to render")
    frame_end: IntProperty(name="End", default=250, description="Last frame to render")
    file_format: EnumProperty(name="Format", items=FORMAT_ITEMS, default="SCENE",
                              description="Image format of the rendered frames")
    pack_textures: BoolProperty(name="Pack Textures", default=False,
                                description="Also pack external images and fonts into the copy sent to the farm "
                                            "(not needed: the files the scene uses travel with it anyway, and are "
                                            "sent only once; the open file is left as it is)")
    allow_missing: BoolProperty(name="Render With Missing Files", default=False,
                                description="Send and render even if files the scene uses are missing, on this "
                                            "computer or on the farm's clients (the job shows which); otherwise "
                                            "Create Job refuses, or the job fails, naming them")
    needs_scripts: BoolProperty(name="Needs Scripts", default=False,
                                description="The scene needs its Python (drivers, registered text blocks): only "
                                            "clients started with --allow-scripts render it")
    persistent_data: BoolProperty(name="Persistent Data", default=False,
                                  description="Clients keep Cycles' render data (BVH, images) between frames: "
                                              "faster for a static scene with a moving camera, at the cost of "
                                              "memory (off: as the file is saved)")
    use_video: BoolProperty(name="Build a Video", default=False,
                            description="Turn the finished frames into a video with ffmpeg")
    video_codec: EnumProperty(name="Codec", items=CODEC_ITEMS, default="h264")
    video_quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default="high")
    video_location: EnumProperty(name="Location", items=LOCATION_ITEMS, default="frames")
    priority: IntProperty(name="Priority", default=0, min=-MAX_PRIORITY, max=MAX_PRIORITY,
                          description="Jobs with a higher priority render first")
    use_split: BoolProperty(name="Split Across Clients", default=False,
                            description="Render Current Frame cuts the frame into horizontal tiles that several "
                                        "clients render at once; the server stitches them into one image")
    split_tiles: IntProperty(name="Tiles", default=0, min=0, max=MAX_TILES,
                             description="How many tiles; 0 picks a count from the connected clients and their "
                                         "measured speed")


class MicroFarmWindowState(bpy.types.PropertyGroup):
    """Per-session UI state; the runtime itself (server thread, snapshots) is a module-level object."""

    show_finished: BoolProperty(name="Show Finished Jobs", default=True)

    @property
    def runtime(self) -> session.Session:
        return runtime.get()


def preferences(context: bpy.types.Context) -> MicroFarmPreferences:
    return context.preferences.addons[ADDON_ID].preferences


classes = (MicroFarmPreferences, MicroFarmSceneSettings, MicroFarmWindowState)
_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register_classes()
    bpy.types.Scene.microfarm = PointerProperty(type=MicroFarmSceneSettings)
    bpy.types.WindowManager.microfarm = PointerProperty(type=MicroFarmWindowState)


def unregister() -> None:
    del bpy.types.WindowManager.microfarm
    del bpy.types.Scene.microfarm
    _unregister_classes()
