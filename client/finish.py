"""Ending a process that imported PyPI's bpy 4.x, which cannot always end by itself.

Once a file with Python drivers was opened (or `bpy.app.driver_namespace` read, whether scripts are allowed
or not), bpy 4.2 as a module crashes (SIGSEGV) and 4.5 hangs forever in a C++ static destructor after Python
has finished: a render client that rendered such a scene never stops, and a tool's exit code is lost. Here
Python's own exit work runs (bpy's atexit handler among it), the output is flushed and the session's temporary
folder removed as Blender would, and the process ends before the static destructors. Blender 5.x, a Blender
executable (`blender --python`), and a process without bpy end as they always did.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys


def _affected() -> bool:
    bpy = sys.modules.get("bpy")
    app = getattr(bpy, "app", None)
    if app is None or getattr(app, "binary_path", "x") != "":  # not bpy as a Python module
        return False
    return tuple(app.version) < (5, 0, 0)


def exit_process(code: int) -> None:
    """sys.exit(code), or where bpy 4.x would crash or hang on the way out, the same end without that."""
    if not _affected():
        sys.exit(code)
    import bpy

    tempdir = bpy.app.tempdir
    atexit._run_exitfuncs()  # noqa: SLF001 - Python's exit work, before ending without the C++ destructors
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if tempdir and os.path.basename(os.path.normpath(tempdir)).startswith("blender_"):
        shutil.rmtree(tempdir, ignore_errors=True)
    os._exit(code)
