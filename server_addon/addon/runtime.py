"""The bpy glue of the add-on's runtime: the one Session of this Blender session (session.py), the timer that
drains its Outbox on Blender's main thread, and what that timer does with bpy (reports, redraws, the Image
Editor). The only module of the runtime that imports bpy, and only inside its functions, so that the add-on
package imports without Blender; the state machine and the bridge to the server thread (session.py,
bridge.py) take and give plain data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import FarmError
from .outbox import Notice
from .session import Session

log = logging.getLogger(__name__)

#: How often the timer drains the Outbox (each drain keeps to session.DRAIN_BUDGET_S).
DRAIN_INTERVAL_S = 0.2

_runtime: Session | None = None


def current() -> Session | None:
    return _runtime


def get() -> Session:
    if _runtime is None:
        raise FarmError("The MicroFarm add-on is not enabled.")
    return _runtime


def _drain_timer() -> float | None:
    """bpy.app.timers callback: show what the threads reported, within DRAIN_BUDGET_S."""
    runtime = _runtime
    if runtime is None:
        return None
    try:
        changed, notices = runtime.drain()
        for notice in notices:
            _report(notice)
        for path in runtime.take_results():
            show_image(path)
        if changed:
            tag_redraw()
    except Exception:  # a timer that raises is unregistered by Blender: keep the panel alive
        log.exception("MicroFarm: updating the panel failed")
    return DRAIN_INTERVAL_S


def drain_now() -> bool:
    """Run the timer's work once (tests and scripts: timers do not fire while a script blocks)."""
    _drain_timer()
    return _runtime is not None


def tag_redraw() -> None:
    import bpy
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type == 'PROPERTIES':
                area.tag_redraw()


def show_image(path: Path) -> Any:
    """Main thread: load a frame from the farm and show it in an Image Editor (a new window if there is
    none; under `blender --background` it only becomes an image datablock). Returns the image."""
    import bpy
    image = bpy.data.images.load(str(path), check_existing=True)
    image.reload()  # the same file rendered again: show the new pixels
    wm = bpy.context.window_manager
    editors = [(window, area) for window in (wm.windows if wm else ()) if window.screen
               for area in window.screen.areas if area.type == 'IMAGE_EDITOR']
    if not editors and wm is not None and wm.windows and not bpy.app.background:
        try:
            with bpy.context.temp_override(window=wm.windows[0]):
                bpy.ops.wm.window_new()
            window = wm.windows[-1]
            area = max(window.screen.areas, key=lambda a: a.width * a.height)
            area.type = 'IMAGE_EDITOR'
            editors = [(window, area)]
        except (RuntimeError, IndexError, ValueError) as exc:  # no window could be opened: the image is still there
            log.info("MicroFarm: no Image Editor window for %s: %s", path.name, exc)
    for _, area in editors[:1]:
        area.spaces.active.image = image
        area.tag_redraw()
    _report(Notice("INFO", f"Frame {path.name} arrived from the farm: see the Image Editor ({image.name})."))
    return image


def _report(notice: Notice) -> None:
    """Put a worker's message in Blender's status bar and info log, as an operator report."""
    import bpy
    try:
        bpy.ops.microfarm.report(level=notice.level, message=notice.text)
    except (RuntimeError, AttributeError):  # no context for operators right now: the panel still shows it
        pass


def _shutdown_at_exit() -> None:
    if _runtime is not None:
        _runtime.shutdown()


def register() -> None:
    global _runtime
    import atexit

    import bpy
    _runtime = Session(blender_binary=bpy.app.binary_path or "")
    bpy.app.timers.register(_drain_timer, first_interval=DRAIN_INTERVAL_S, persistent=True)
    # Blender disables add-ons when it quits (which calls unregister); atexit covers a Python that
    # ends without that (a bpy script, a crash of the UI).
    atexit.register(_shutdown_at_exit)


def unregister() -> None:
    global _runtime
    import atexit

    import bpy
    atexit.unregister(_shutdown_at_exit)
    if bpy.app.timers.is_registered(_drain_timer):
        bpy.app.timers.unregister(_drain_timer)
    runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.shutdown()
