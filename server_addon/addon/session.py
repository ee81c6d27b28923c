"""The add-on's state machine: the farm server's lifecycle, what the panel shows, and work off the UI thread.
No bpy: plain data in (ServerSettings, JobSubmission, job actions), plain data out (State, FarmView, Notice,
FileCheck, frame paths), so it runs, and is tested, without Blender.

Threads and who owns what:
- Blender's main thread (operators, panels, the drain timer in runtime.py) reads `state`, `address` and
  `view`, and never waits on a socket, a hash or a subprocess.
- Short-lived worker threads start and stop the server and send jobs (sending.py); they report back
  through the Outbox (outbox.py), which the main thread drains within a time budget.
- The server's own loop thread publishes the farm's state into the Outbox (bridge.ServerLink).

The lifecycle: STOPPED -> STARTING -> RUNNING -> STOPPING -> STOPPED. Start and Stop only begin a move (a
second click while one is under way is refused with a sentence); a worker thread ends it. Shutdown (add-on
disabled, Blender quitting) ends in STOPPED from anywhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bridge import ServerLink, ServerSettings
from .errors import FarmError
from .outbox import FarmView, Notice, Outbox
from .project import FileCheck
from .sending import Sender
from .submit import JobSubmission

if TYPE_CHECKING:
    from ..thread import ServerThread

log = logging.getLogger(__name__)

#: How long one drain of the Outbox may take on the main thread.
DRAIN_BUDGET_S = 0.004
#: An operator waits this long for the server's answer, so that it can report it itself; a slower answer
#: still arrives, as a Notice.
OPERATOR_WAIT_S = 0.2
#: How long shutdown waits for the worker threads it told to stop.
JOIN_TIMEOUT_S = 15.0

NOT_RUNNING = "The farm server is not running; start it first."


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class Session:
    def __init__(self, blender_binary: str = "") -> None:
        self._lock = threading.Lock()
        self._state_changed = threading.Condition(self._lock)
        self.state = State.STOPPED
        self.address: tuple[str, int] | None = None
        self.web_url: str | None = None
        self.discovery = False
        self._link: ServerLink | None = None
        self._threads: set[threading.Thread] = set()
        self.outbox = Outbox()
        self._sender = Sender(self.outbox, self._require, blender_binary)
        # Main thread only: what the panel draws.
        self.view = FarmView()
        self.notice: Notice | None = None
        self.check: FileCheck | None = None  # what travels with the open file, as last found

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    @property
    def thread(self) -> ServerThread | None:
        """The running server's thread (scripts and tests reach the server core through its call())."""
        link = self._link
        return link.thread if link is not None else None

    def start(self, settings: ServerSettings) -> None:
        """Start the server on a worker thread; returns at once. Raises FarmError if it is not stopped."""
        with self._lock:
            if self.state is not State.STOPPED:
                raise FarmError(f"The farm server is already {self.state.value}.")
            self._move(State.STARTING)
        self.spawn("microfarm-start", self._start, settings)

    def _start(self, settings: ServerSettings) -> None:
        try:
            link = ServerLink.open(settings, self.outbox)
        except FarmError as exc:
            with self._lock:
                self._move(State.STOPPED)
            self.post("ERROR", str(exc))
            return
        port = link.port or settings.port
        web_port = link.web_port
        with self._lock:
            self._link = link
            self.address = (settings.host, port)
            self.web_url = f"http://{_url_host(settings.web_host)}:{web_port}/" if web_port else None
            self.discovery = settings.discovery
            self._move(State.RUNNING)
        self.post("INFO", f"Farm server listening on {settings.host}:{port}.")

    def stop(self) -> None:
        """Stop the server on a worker thread; returns at once."""
        with self._lock:
            if self.state is not State.RUNNING:
                raise FarmError(f"The farm server is {self.state.value}, not running.")
            self._move(State.STOPPING)
        self.spawn("microfarm-stop", self._stop)

    def _stop(self) -> None:
        self._close()
        self.post("INFO", "Farm server stopped.")

    def _close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()
        with self._lock:
            self.address = None
            self.web_url = None
            self._move(State.STOPPED)
        self.outbox.put_view(FarmView())

    def shutdown(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop everything and wait for it (add-on disabled, Blender quitting): no thread, no port left."""
        self._sender.kill()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._close()
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("MicroFarm: the %s thread did not stop within %.0f s", thread.name, timeout)

    def wait_for(self, state: State, timeout: float) -> bool:
        """Block until the state is `state` (scripts and tests; never called on a UI path)."""
        with self._lock:
            return self._state_changed.wait_for(lambda: self.state is state, timeout)

    def _move(self, state: State) -> None:
        """With the lock held."""
        self.state = state
        self._state_changed.notify_all()

    def spawn(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        """Run target on a worker thread that shutdown() waits for; a failure reaches the log and the user."""
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

    # --- what the main thread shows ----------------------------------------------------------

    def post(self, level: str, text: str) -> None:
        """A message for the user from any thread; the drain shows it in the panel and reports it."""
        self.outbox.post(level, text)

    def drain(self, budget_s: float = DRAIN_BUDGET_S) -> tuple[bool, list[Notice]]:
        """Main thread: take the latest view and the waiting notices, within a time budget.
        Returns (whether anything changed, the notices to report)."""
        deadline = time.perf_counter() + budget_s
        changed = False
        if (view := self.outbox.take_view()) is not None:
            self.view = view
            changed = True
        if (check := self.outbox.take_check()) is not None:
            self.check = check
            changed = True
        notices = self.outbox.take_notices(deadline)
        if notices:
            self.notice = notices[-1]
            changed = True
        return changed, notices

    def take_results(self) -> list[Path]:
        """Main thread: the frames that arrived for Render Current Frame since the last call."""
        return self.outbox.take_results()

    def wait_view(self, timeout: float) -> bool:
        """Block until the server publishes a view, and take it (scripts and tests; never on a UI path)."""
        view = self.outbox.take_view(timeout)
        if view is None:
            return False
        self.view = view
        return True

    # --- what the operators ask --------------------------------------------------------------

    def _require(self) -> ServerLink:
        link = self._link
        if self.state is not State.RUNNING or link is None or not link.alive:
            raise FarmError(NOT_RUNNING)
        return link

    def job_action(self, action: str, job_id: str = "", args: dict[str, Any] | None = None,
                   wait: float = OPERATOR_WAIT_S) -> str | None:
        """Ask the server for a job action. Returns its sentence if it answers within `wait`
        (None: the answer comes later as a Notice). Raises FarmError with the server's reason."""
        return self._require().job_action(action, job_id, args, wait)

    def blend_drop_path(self) -> Path:
        """Where the operator saves the copy of the open file: a temporary name inside the server's
        .blend store (which a server start clears of such leftovers)."""
        return self._require().drop_path()

    def submit(self, job: JobSubmission) -> None:
        """Pack, trace, hash, store and create the job (or only find what would travel) on a worker thread;
        returns at once."""
        self._require()
        self.spawn("microfarm-check" if job.check_only else "microfarm-submit", self._sender.run, job)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"  # listening everywhere: this computer reaches it on loopback
    return f"[{host}]" if ":" in host else host
