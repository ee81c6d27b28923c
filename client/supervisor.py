"""The client's side of its render process (client.child): a Renderer that renders in a second Blender.

Blender crashing on a file or a frame then ends only that process: the client sees it end, reports the frame
as failed with the signal ("Blender crashed (signal 6, SIGABRT) while rendering frame 3"), and starts another
one, which opens the job's file again before the next frame. A crash is so told apart from a client that is
killed or loses its network, which the server takes for no failure at all. A frame the server takes back
(hung, delivered by another client, its job paused) is stopped by ending the process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import bpy

from protocol.settings import Assignment, SceneInfo
from protocol.tiles import TileSpec

from . import devices
from .capture import LOG_TAIL_BYTES
from .child import PREFIX
from .devices import Device
from .pathmap import Mapping
from .render import Progress, RenderError

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).resolve().parent / "child.py"
#: How often a wait for the render process looks whether its frame is still wanted.
POLL_S = 0.2
#: How long a render process may take to end once asked (its stdin closed), before it is killed.
STOP_TIMEOUT_S = 10.0


class RenderCrash(RenderError):
    """The render process ended while it worked: Blender crashed (or was killed) on this file or frame."""


class RenderAbandoned(Exception):
    """The frame is no longer wanted; its render was stopped (no failure of anyone's)."""


def child_command(config: dict[str, Any]) -> list[str]:
    """How to start a render process in this Blender: the Blender executable, or PyPI's bpy in this Python."""
    binary = getattr(bpy.app, "binary_path", "")
    if binary:
        return [binary, "--background", "--python", str(CHILD_SCRIPT), "--", json.dumps(config)]
    return [sys.executable, str(CHILD_SCRIPT), json.dumps(config)]


def describe_end(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"Blender crashed (signal {-code}, {name})"
    return f"Blender's render process ended (status {code})"


class RenderProcess:
    """What client.worker asks of a renderer, carried out by a supervised render process."""

    def __init__(self, *, allow_scripts: bool = False, device: Device = devices.CPU, gpu_index: int | None = None,
                 threads: int | None = None, path_map: tuple[Mapping, ...] = (), name: str = "") -> None:
        self.device = device
        self.current_sha: str | None = None
        self.missing_sentence = ""
        self.frame_warnings: list[str] = []
        self.split: TileSpec | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="microfarm-render-"))
        self._capture = self._folder / "output.log"
        self._config = {"allow_scripts": allow_scripts, "gpu_index": gpu_index, "threads": threads,
                        "path_map": [[m.source, m.target] for m in path_map], "capture": str(self._capture),
                        "name": name, "log_level": logging.getLogger().getEffectiveLevel()}
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._opened: tuple[str, str] | None = None  # what a new process opens before it goes on
        self._applied: dict[str, Any] | None = None

    # --- what the worker calls --------------------------------------------------------------

    def start(self) -> None:
        """Start the render process now (it is started when first needed otherwise)."""
        self._ensure()

    def open(self, path: Path, key: str) -> None:
        if self.current_sha == key:
            return
        self.current_sha, self._opened, self._applied = None, None, None
        reply = self._request({"op": "open", "path": str(path), "key": key}, "opening the .blend")
        self._opened = (str(path), key)
        self.current_sha = key
        self.missing_sentence = reply.get("missing", "")

    def scene_info(self) -> SceneInfo:
        return SceneInfo.from_wire(self._request({"op": "scene"}, "reading the scene")["scene"])

    def apply(self, job: Assignment) -> None:
        settings = {"file_format": job.file_format, "samples": job.samples, "percentage": job.percentage,
                    "device": job.device, "allow_missing": job.allow_missing,
                    "persistent_data": job.persistent_data}
        if job.split is not None:
            settings["split"] = job.split.to_wire()
        self._applied = None
        self._request({"op": "apply", "settings": settings}, "applying the job's settings")
        self._applied = settings
        self.split = job.split

    def render_frame(self, item: int, directory: Path, *, progress: Progress | None = None,
                     abandon: Callable[[], bool] | None = None) -> Path:
        what = f"tile {item} of frame {self.split.frame}" if self.split is not None else f"frame {item}"
        self.frame_warnings = []
        with contextlib.suppress(OSError):
            self._capture.write_bytes(b"")  # a crash's log is this frame's output, never an earlier one's
        reply = self._request({"op": "render", "item": item, "dir": str(directory)}, f"rendering {what}",
                              progress=progress, abandon=abandon, log_tail=True)
        self.frame_warnings = list(reply.get("warnings", []))
        return Path(reply["path"])

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()  # the process ends by itself when its stdin closes
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)

    # --- the process --------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure(self) -> None:
        if self._running():
            return
        self._config["device"] = self.device.backend
        self._replies = queue.Queue()
        self._proc = subprocess.Popen(child_command(self._config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      bufsize=0)
        threading.Thread(target=_read_replies, args=(self._proc.stdout, self._replies), name="render-process",
                         daemon=True).start()
        ready = self._wait("starting Blender")
        log.info("render process started (pid %s, Blender %s)", ready.get("pid"), ready.get("ready"))
        # A new process after a crash: the job's file is opened (and its settings applied) again, as they were.
        if self._opened is not None:
            path, key = self._opened
            self._request({"op": "open", "path": path, "key": key}, "opening the .blend again")
            if self._applied is not None:
                self._request({"op": "apply", "settings": self._applied}, "applying the job's settings")

    def _request(self, request: dict[str, Any], doing: str, *, progress: Progress | None = None,
                 abandon: Callable[[], bool] | None = None, log_tail: bool = False) -> dict[str, Any]:
        self._ensure()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        except OSError:
            pass  # the process is gone: the wait below says how it ended
        reply = self._wait(doing, progress, abandon, log_tail)["reply"]
        if reply.get("device") == "CPU" and self.device.is_gpu:
            self.device = devices.CPU  # its GPU failed: it renders on the CPU for good, and so do later processes
        if "error" in reply:
            raise RenderError(str(reply["error"]), str(reply.get("log", "")))
        return reply

    def _wait(self, doing: str, progress: Progress | None = None, abandon: Callable[[], bool] | None = None,
              log_tail: bool = False) -> dict[str, Any]:
        while True:
            if abandon is not None and abandon():
                self._kill()
                raise RenderAbandoned(doing)
            try:
                message = self._replies.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if message is None:
                raise self._ended(doing, log_tail)
            if "progress" in message:
                if progress is not None:
                    progress(int(message["progress"]))
            elif "reply" in message or "ready" in message:
                return message

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def _ended(self, doing: str, log_tail: bool) -> RenderCrash:
        proc, self._proc = self._proc, None
        assert proc is not None
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # its output closed but it lives on: it is of no use any more
            proc.kill()
            code = proc.wait()
        tail = ""
        if log_tail:
            with contextlib.suppress(OSError):
                data = self._capture.read_bytes()
                tail = data[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")
        text = f"{describe_end(code)} while {doing}"
        log.warning("%s; starting another render process", text)
        return RenderCrash(text, tail)


def _read_replies(stream: IO[bytes], replies: queue.Queue[dict[str, Any] | None]) -> None:
    """The render process's stdout: its answers go to the queue, anything else (Blender's banner) to our log."""
    try:
        for line in stream:
            if line.startswith(PREFIX):
                try:
                    replies.put(json.loads(line[len(PREFIX):]))
                except ValueError:
                    log.warning("the render process sent a line that is not JSON")
            else:
                with contextlib.suppress(OSError):
                    os.write(2, line)
    finally:
        replies.put(None)  # it ended (or closed its output): the waiter asks how
