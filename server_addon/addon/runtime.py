"""The add-on's live state: the farm server thread, what the panel shows, and work off the UI thread.

Threads and who owns what:
- Blender's main thread (operators, panels, the drain timer) is the only one that touches bpy.
  It reads `state`, `address` and `view`, and never waits on a socket, a hash or a subprocess.
- The server's asyncio loop runs in a ServerThread. A listener there publishes the farm's state as
  an immutable FarmView into a one-slot queue (the panel only needs the latest), at most every
  PUBLISH_INTERVAL_S however busy the farm is.
- Short-lived worker threads start and stop the server and prepare jobs (pack textures in a
  separate Blender process, trace what the file needs, hash it, put what the server lacks into its
  content store); they report back through a queue of Notices, and what travels through a one-slot
  queue of FileChecks. The timer drains the queues within a time budget.

This module imports no bpy (the glue that does lives in its last section, imported lazily), so its
logic also runs, and is tested, without Blender.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from protocol.limits import MAX_NAME_CHARS
from protocol.manifest import Manifest, safe_blend_name

from ..core.jobs import JobState
from ..core.scheduler import JobActionError
from ..core.server import FarmServer, ServerConfig
from ..core.storage import PARTIAL_PREFIX, UnsafeName
from ..core.thread import ServerThread
from ..core.trace import TraceError, traced
from . import project, submit
from .errors import Cancelled, FarmError, sentence
from .project import FileCheck
from .submit import JobSubmission

log = logging.getLogger(__name__)

#: How often the timer drains the queues, and how long one drain may take.
DRAIN_INTERVAL_S = 0.2
DRAIN_BUDGET_S = 0.004
#: The farm's state is snapshotted for the panel at most this often (a busy farm changes many times a second).
PUBLISH_INTERVAL_S = 0.1
#: An operator waits this long for the server's answer, so that it can report it itself; a slower answer
#: still arrives, as a Notice.
OPERATOR_WAIT_S = 0.2
#: Worker threads asking the server loop something.
CALL_TIMEOUT_S = 5.0
#: How long shutdown waits for the worker threads it told to stop.
JOIN_TIMEOUT_S = 15.0


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Notice:
    level: str  # "INFO", "WARNING" or "ERROR", as in Operator.report
    text: str


@dataclass(frozen=True)
class FarmView:
    """What the panel shows: the server's snapshot, frozen. Made on the loop thread, read on the main thread."""

    farm: str = ""
    jobs: tuple[Mapping[str, Any], ...] = ()
    clients: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(cls, snapshot: dict[str, Any]) -> FarmView:
        return cls(farm=snapshot.get("farm", ""),
                   jobs=tuple(MappingProxyType(job) for job in snapshot.get("jobs", ())),
                   clients=tuple(MappingProxyType(client) for client in snapshot.get("clients", ())))


@dataclass(frozen=True)
class ServerSettings:
    """What Start Server was given (from the add-on preferences)."""

    output_dir: Path
    host: str = "0.0.0.0"
    port: int = 9090
    secret: str = ""
    farm_name: str = ""
    discovery: bool = True
    web_port: int | None = None  # None: no web interface
    web_host: str = "127.0.0.1"

    def config(self) -> ServerConfig:
        config = ServerConfig(output_dir=self.output_dir, host=self.host, port=self.port, secret=self.secret or None)
        if self.farm_name:
            config.farm_name = self.farm_name
        return config


class Runtime:
    def __init__(self, blender_binary: str = "") -> None:
        self.blender_binary = blender_binary
        self._lock = threading.Lock()
        self._state_changed = threading.Condition(self._lock)
        self.state = State.STOPPED
        self.thread: ServerThread | None = None
        self.address: tuple[str, int] | None = None
        self.web_url: str | None = None
        self.discovery = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work = submit.Work()
        self._threads: set[threading.Thread] = set()
        # Main thread only: what the panel draws.
        self.view = FarmView()
        self.notice: Notice | None = None
        self.check: FileCheck | None = None  # what travels with the open file, as last found
        # Across threads.
        self._views: queue.Queue[FarmView] = queue.Queue(maxsize=1)
        self._notices: queue.Queue[Notice] = queue.Queue()
        self._results: queue.Queue[Path] = queue.Queue()  # frames to show in the Image Editor
        self._checks: queue.Queue[FileCheck] = queue.Queue(maxsize=1)  # the panel shows the latest
        self._hashes = project.Hashes()
        self._publish_pending = False  # loop thread only
        self._watched: set[str] = set()  # loop thread only: jobs whose frame goes to the Image Editor

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    def start(self, settings: ServerSettings) -> None:
        """Start the server on a worker thread; returns at once. Raises FarmError if it is not stopped."""
        with self._lock:
            if self.state is not State.STOPPED:
                raise FarmError(f"The farm server is already {self.state.value}.")
            self.state = State.STARTING
            self._state_changed.notify_all()
        self._spawn("microfarm-start", self._start_server, settings)

    def _start_server(self, settings: ServerSettings) -> None:
        where = f"{settings.host}:{settings.port}"
        try:
            settings.output_dir.mkdir(parents=True, exist_ok=True)
            web = {} if settings.web_port is None else {"web_port": settings.web_port, "web_host": settings.web_host}
            thread = ServerThread(settings.config(), discovery=settings.discovery, **web)
            thread.start()
        except Exception as exc:
            # asyncio's bind error repeats the address; the errno's text is the sentence a user needs.
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
            self._set_state(State.STOPPED)
            self.post("ERROR", f"Could not start the farm server on {where}: {reason}.")
            return
        try:
            self._loop = thread.call(self._attach, timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # the loop died under us: leave nothing running
            thread.stop()
            self._set_state(State.STOPPED)
            self.post("ERROR", f"The farm server stopped while starting: {exc}.")
            return
        port = thread.port or settings.port
        with self._lock:
            self.thread = thread
            self.address = (settings.host, port)
            web_port = getattr(thread, "web_port", None)
            self.web_url = f"http://{_url_host(settings.web_host)}:{web_port}/" if web_port else None
            self.discovery = settings.discovery
            self.state = State.RUNNING
            self._state_changed.notify_all()
        self.post("INFO", f"Farm server listening on {settings.host}:{port}.")

    def _attach(self, server: FarmServer) -> asyncio.AbstractEventLoop:
        """On the loop thread: follow the server's changes, and publish a first view."""
        server.listeners.append(lambda: self._on_change(server))
        self._publish(server)
        return asyncio.get_running_loop()

    def stop(self) -> None:
        """Stop the server on a worker thread; returns at once."""
        with self._lock:
            if self.state is not State.RUNNING:
                raise FarmError(f"The farm server is {self.state.value}, not running.")
            self.state = State.STOPPING
            self._state_changed.notify_all()
        self._spawn("microfarm-stop", self._stop_server)

    def _stop_server(self) -> None:
        self._stop_thread()
        self.post("INFO", "Farm server stopped.")

    def _stop_thread(self) -> None:
        with self._lock:
            thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop()  # withdraws the zeroconf service, closes every connection, frees the port
        with self._lock:
            self._loop = None
            self.address = None
            self.web_url = None
            self.state = State.STOPPED
            self._state_changed.notify_all()
        self._put_view(FarmView())

    def shutdown(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop everything and wait for it (add-on disabled, Blender quitting): no thread, no port left."""
        self._work.kill()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._stop_thread()
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("MicroFarm: the %s thread did not stop within %.0f s", thread.name, timeout)

    def wait_for(self, state: State, timeout: float) -> bool:
        """Block until the state is `state` (scripts and tests; never called on a UI path)."""
        with self._lock:
            return self._state_changed.wait_for(lambda: self.state is state, timeout)

    def _set_state(self, state: State) -> None:
        with self._lock:
            self.state = state
            self._state_changed.notify_all()

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except Exception:  # a bug must reach the log and the user, not vanish with the thread
                log.exception("MicroFarm: %s failed", name)
                self.post("ERROR", f"MicroFarm: {name} failed; see the system console.")
            finally:
                self._threads.discard(threading.current_thread())
        thread = threading.Thread(target=run, name=name, daemon=True)
        self._threads.add(thread)
        thread.start()
        return thread

    # --- server -> UI -----------------------------------------------------------------------

    def _on_change(self, server: FarmServer) -> None:
        """A FarmServer listener (loop thread): publish soon, once for any number of changes."""
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_later(PUBLISH_INTERVAL_S, self._publish, server)

    def _publish(self, server: FarmServer) -> None:
        self._publish_pending = False
        self._put_view(FarmView.of(server.snapshot()))
        if self._watched:
            self._check_watched(server)

    def _check_watched(self, server: FarmServer) -> None:
        """Loop thread: hand the frame of a finished Render Current Frame job to the main thread."""
        for job_id in list(self._watched):
            job = server.farm.jobs.get(job_id)
            if job is None or job.state in (JobState.FAILED, JobState.CANCELLED):
                self._watched.discard(job_id)
                if job is not None:
                    reason = f": {job.error}" if job.error else ""
                    self.post("ERROR", sentence(f"Render Current Frame: job {job_id} {job.state.value}{reason}"))
            elif job.state is JobState.DONE and job.settings is not None:
                self._watched.discard(job_id)
                path = server.outputs.frame_path(job.id, job.settings.frames[0], job.settings.ext)
                if path.is_file():
                    self._results.put(path)
                else:
                    self.post("WARNING", f"Job {job_id} ended without its frame.")

    def take_results(self) -> list[Path]:
        """Main thread: the frames that arrived for Render Current Frame since the last call."""
        results = []
        with contextlib.suppress(queue.Empty):
            while True:
                results.append(self._results.get_nowait())
        return results

    def _put_view(self, view: FarmView) -> None:
        _put_latest(self._views, view)

    def _put_check(self, check: FileCheck) -> None:
        _put_latest(self._checks, check)

    def post(self, level: str, text: str) -> None:
        """A message for the user from any thread; the drain shows it in the panel and reports it."""
        (log.error if level == "ERROR" else log.info)("MicroFarm: %s", text)
        self._notices.put(Notice(level, text))

    def drain(self, budget_s: float = DRAIN_BUDGET_S) -> tuple[bool, list[Notice]]:
        """Main thread: take the latest view and the waiting notices, within a time budget.
        Returns (whether anything changed, the notices to report)."""
        deadline = time.perf_counter() + budget_s
        changed = False
        with contextlib.suppress(queue.Empty):
            self.view = self._views.get_nowait()
            changed = True
        with contextlib.suppress(queue.Empty):
            self.check = self._checks.get_nowait()
            changed = True
        notices: list[Notice] = []
        while not notices or time.perf_counter() < deadline:
            try:
                notice = self._notices.get_nowait()
            except queue.Empty:
                break
            notices.append(notice)
        if notices:
            self.notice = notices[-1]
            changed = True
        return changed, notices

    def wait_view(self, timeout: float) -> bool:
        """Block until the server publishes a view, and take it (scripts and tests; never on a UI path)."""
        try:
            self.view = self._views.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    # --- UI -> server -----------------------------------------------------------------------

    def _server(self) -> tuple[ServerThread, asyncio.AbstractEventLoop, FarmServer]:
        thread, loop = self.thread, self._loop
        server = thread.server if thread is not None else None
        if self.state is not State.RUNNING or thread is None or loop is None or server is None:
            raise FarmError("The farm server is not running; start it first.")
        return thread, loop, server

    def job_action(self, action: str, job_id: str = "", args: dict[str, Any] | None = None,
                   wait: float = OPERATOR_WAIT_S) -> str | None:
        """Ask the server loop for a job action. Returns its sentence if it answers within `wait`
        (None: the answer comes later as a Notice). Raises FarmError with the server's reason."""
        _, loop, server = self._server()
        coro = server.job_action(action, job_id, args)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed a moment ago
            coro.close()
            raise FarmError("The farm server is not running; start it first.") from None
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(self._late_answer)
            return None
        except (JobActionError, UnsafeName) as exc:
            raise FarmError(sentence(str(exc))) from None

    def _late_answer(self, future: concurrent.futures.Future[str]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self.post("INFO", sentence(future.result()))
        else:
            self.post("ERROR", sentence(str(exc)))

    def blend_drop_path(self) -> Path:
        """Where the operator saves the copy of the open file: a temporary name inside the server's
        .blend store (which a server start clears of such leftovers)."""
        _, _, server = self._server()
        return server.blends.root / f"{PARTIAL_PREFIX}{secrets.token_hex(8)}.blend"

    def submit(self, job: JobSubmission) -> None:
        """Pack, trace, hash, store and create the job (or only find what would travel) on a worker thread;
        returns at once."""
        self._server()
        self._spawn("microfarm-check" if job.check_only else "microfarm-submit", self._submit, job)

    def _submit(self, job: JobSubmission) -> None:
        error = ""
        try:
            self._send(job)
        except Cancelled:
            pass
        except FarmError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"The farm server did not answer within {CALL_TIMEOUT_S:.0f} s; the render job was not created."
        except (OSError, ValueError, RuntimeError) as exc:
            error = f"Could not create the render job: {exc}"
        finally:
            # The copy goes before the user hears of a refusal: nothing of it is left in the store by then.
            submit.discard(job)
        if error:
            self.post("ERROR", error)

    def _send(self, job: JobSubmission) -> None:
        """The open file as a project: its folder is the job's, the copy stands where the open file lies."""
        base = job.location.parent if job.location is not None else None
        if job.pack:
            submit.pack(job.blend, self._work, self.blender_binary, base)
        self._work.check()
        _, _, server = self._server()
        location = job.location or project.UNSAVED_LOCATION.with_name(safe_blend_name(job.name))
        filepath = str(job.location) if job.location is not None else ""
        with contextlib.ExitStack() as pins:
            try:
                with traced(job.blend, location=location) as trace:
                    entries = project.survey(trace, job.blend, server.blends, self._hashes, self._work)
                    check = project.check_of(filepath, trace, entries, job.pack)
                    self._put_check(check)
                    if job.check_only:
                        missing = f"; missing on this disk: {project.listed(check.missing)}" if check.missing else ""
                        self.post("WARNING" if check.missing else "INFO", sentence(check.summary() + missing))
                        return
                    if check.missing and not job.request.allow_missing:
                        raise FarmError(check.refusal())
                    manifest = project.manifest(entries, trace.main)
                    # Held until the job exists: a job deleted meanwhile must not take the files send() reuses.
                    pins.enter_context(server.blends.pinned(manifest.shas()))
                    project.send(entries, job.blend, server.blends, self._work)
            except TraceError as exc:
                raise FarmError(sentence(f"Could not find the files the scene needs: {exc}")) from None
            thread, _, _ = self._server()
            name = "".join(ch for ch in job.name if ch.isprintable())[:MAX_NAME_CHARS] or "untitled.blend"
            job_id = thread.call(lambda s: self._create_job(s, job, name, manifest), timeout=CALL_TIMEOUT_S)
        self._put_check(project.sent(check, job_id))
        if job.show_result:
            self.post("INFO", f"Frame {job.request.frame_start} sent to the farm as job {job_id}.")
        elif check.missing:
            self.post("WARNING", f"Render job {job_id} sent to the farm without {project.listed(check.missing)} "
                                 "(missing on this disk).")
        else:
            self.post("INFO", f"Render job {job_id} sent to the farm.")

    def _create_job(self, server: FarmServer, job: JobSubmission, name: str, manifest: Manifest) -> str:
        """Loop thread: create the job, and follow it when its frame should be shown."""
        main = manifest.main_file
        created = server.create_job(name, main.sha256, main.size, job.request, start=True, priority=job.priority,
                                    video=job.video, project=manifest)
        if job.show_result:
            self._watched.add(created.id)
        return created.id


def _put_latest(slot: queue.Queue[Any], item: Any) -> None:
    # One slot: what nobody has drawn yet is replaced by the newer one.
    while True:
        try:
            slot.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                slot.get_nowait()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"  # listening everywhere: this computer reaches it on loopback
    return f"[{host}]" if ":" in host else host


# --- the one runtime of this Blender session, and its bpy glue --------------------------------

_runtime: Runtime | None = None


def current() -> Runtime | None:
    return _runtime


def get() -> Runtime:
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
    _runtime = Runtime(blender_binary=bpy.app.binary_path or "")
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
