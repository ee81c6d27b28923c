"""The render process: a second warm Blender that renders for the client, which supervises it.

The client (client.supervisor) starts it once, tells it over its stdin which .blend to open, which settings to
apply and which frame to render, one JSON line each, and reads the answers from its stdout: lines that start
with PREFIX (Blender's own output goes to stderr, the client's log). If Blender crashes on a frame, the client
sees this process end with its signal and reports the frame as failed, then starts another one; if the client
dies (SIGKILL, a crash), stdin closes and this process ends at once, also in the middle of a render.

    python client/child.py CONFIG                          (PyPI bpy: the client's own Python)
    blender --background --python client/child.py -- CONFIG

CONFIG is a JSON map: allow_scripts, device, gpu_index, threads, path_map ([FROM, TO] pairs), capture (the
file a frame's output is caught in). Settings arrive as data and are checked here as in the client.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:
    # Run by path (by Blender's --python, or by the client's Python): `client` and `protocol` resolve from here.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # the client folder itself is no package root (its modules would shadow others)
    sys.path.insert(0, _root)
if os.path.isdir(os.path.join(_root, "vendor")):
    sys.path.insert(0, os.path.join(_root, "vendor"))

#: Marks the lines of this protocol on stdout (anything else there is Blender's, printed before we took it).
PREFIX = b"@microfarm "
#: Progress is passed on at most this often (Cycles updates its stats many times a second).
PROGRESS_EVERY_S = 0.25


class _Out:
    """The protocol's side of stdout, written from the main thread and from Blender's render threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = PREFIX + json.dumps(message).encode() + b"\n"
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]


def _read_requests(requests: queue.Queue[dict[str, Any]]) -> None:
    for line in sys.stdin.buffer:
        try:
            requests.put(json.loads(line))
        except ValueError:
            continue
    # The client closed the pipe or died: nothing of this render is wanted any more.
    os._exit(0)


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    out = _Out(os.dup(1))
    os.dup2(2, 1)  # Blender's prints go to stderr from now on; stdout carries this protocol alone
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the client, which ends us
    # Its log lines go to stderr, the client's log, as the client's own do.
    logging.basicConfig(level=config.get("log_level", logging.INFO),
                        format="%(asctime)s %(levelname)s [" + str(config.get("name", "")) + "] %(name)s: %(message)s")
    from pathlib import Path

    from client import devices
    from client.pathmap import Mapping
    from client.render import Renderer, RenderError, blender_version
    from protocol.errors import ProtocolError
    from protocol.settings import validate_assignment

    requests: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_read_requests, args=(requests,), name="requests", daemon=True).start()
    try:
        device = devices.choose(config.get("device") or "CPU", config.get("gpu_index"))
    except devices.DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    renderer = Renderer(allow_scripts=bool(config.get("allow_scripts")), device=device, threads=config.get("threads"),
                        path_map=tuple(Mapping(source, target) for source, target in config.get("path_map", ())),
                        capture_path=Path(config["capture"]))
    out.send({"ready": blender_version(), "pid": os.getpid()})
    last = [0.0]

    def progress(count: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            out.send({"progress": count})

    while True:
        request = requests.get()
        op = request.get("op")
        try:
            if op == "open":
                renderer.open(Path(request["path"]), request["key"])
                reply: dict[str, Any] = {"missing": renderer.missing_sentence}
            elif op == "scene":
                reply = {"scene": renderer.scene_info().to_wire()}
            elif op == "apply":
                renderer.apply(validate_assignment(request["settings"]))
                reply = {}
            elif op == "render":
                path = renderer.render_frame(int(request["item"]), Path(request["dir"]), progress=progress)
                reply = {"path": str(path), "warnings": renderer.frame_warnings}
            else:
                reply = {"error": f"the render process knows no request {op!r}"}
        except (RenderError, ProtocolError) as exc:
            reply = {"error": str(exc), "log": getattr(exc, "render_log", "")}
        reply["device"] = renderer.device.backend
        out.send({"reply": reply})


if __name__ == "__main__":
    _args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    try:
        _code = main(_args)
    except BaseException:  # noqa: BLE001 - said on stderr; the client reports the process's end
        import traceback
        traceback.print_exc()
        _code = 1
    sys.stderr.flush()
    # Ended without Python's exit work: bpy 4.x as a module can crash or hang in its destructors (client.finish).
    os._exit(_code)
