"""Save Render Client: writes the render-client bundle zip (server_addon.core.client_bundle) to a folder.

The zip is built on a worker thread (it reads and compresses some 70 files); the result arrives as a notice.
"""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import StringProperty

from ..core.client_bundle import BUNDLE_DIR, BundleError, build_zip
from . import runtime
from .errors import FarmError


class MICROFARM_OT_save_client(bpy.types.Operator):
    """Save the render client for render nodes with a stock Blender 4.2 or newer: unzip it there and run its
    client/__main__.py with blender --background --python"""

    bl_idname = "microfarm.save_client"
    bl_label = "Save Render Client"

    directory: StringProperty(subtype='DIR_PATH', description="Folder to write microfarm-client-VERSION.zip to")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return runtime.current() is not None

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not self.directory:
            self.report({'ERROR'}, "Choose a folder to save the render client to.")
            return {'CANCELLED'}
        folder = Path(bpy.path.abspath(self.directory))
        try:
            rt = runtime.get()
        except FarmError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}

        def save() -> None:
            try:
                path = build_zip(folder)
            except (BundleError, OSError) as exc:
                rt.post("ERROR", f"Could not save the render client to {folder}: {exc}")
                return
            rt.post("INFO", f"Saved the render client as {path}: unzip it on a render node and run "
                            f"blender -b --python {BUNDLE_DIR}/client/__main__.py -- --name NODE")

        rt.spawn("saving the render client", save)  # the session tracks its worker threads for shutdown
        self.report({'INFO'}, f"Saving the render client to {folder}...")
        return {'FINISHED'}


classes = (MICROFARM_OT_save_client,)
register, unregister = bpy.utils.register_classes_factory(classes)
