"""MicroFarm server: the Blender add-on and the headless server share this package.

`python -m server_addon` runs the server without Blender; the core lives in `server_addon.core`
and never imports bpy.
"""

__version__ = "0.1.0"
