"""MicroFarm server: the Blender add-on and the headless server share this package.

`python -m server_addon` runs the server without Blender; the core lives in `server_addon.core`
and never imports bpy. Inside Blender (an extension built by tools.build_addon), register()
loads the bpy part from `server_addon.addon` only then, so importing this package needs no bpy.
"""

__version__ = "0.1.0"


def register() -> None:
    from . import addon

    addon.register()


def unregister() -> None:
    from . import addon

    addon.unregister()
