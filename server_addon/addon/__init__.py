"""The Blender side of the add-on: settings, operators, the panel, and the runtime that links them to the
server thread (runtime.py: the bpy glue; session.py: the state machine; bridge.py, outbox.py: the threads'
bridge; sending.py: jobs sent off the UI thread). Loaded by server_addon.register(), never by the headless
server; the bpy modules are imported in register() so that the others (no bpy) can be tested alone."""

from __future__ import annotations

from types import ModuleType


def _modules() -> tuple[ModuleType, ...]:
    from . import client_bundle, operators, panel, props, runtime

    # Registered in this order and unregistered in reverse: the panel needs the operators and the
    # properties; the runtime (server thread, timer) goes first on the way out.
    return props, operators, client_bundle, panel, runtime


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
