"""The client's network side as the render thread sees it: a thin thread-safe bridge to the connection.

The connection (client.connection) runs on its own thread's asyncio loop: it connects (and reconnects
with backoff), sends heartbeats, downloads .blend files into the cache and streams rendered frames back,
while the main thread renders. A render holds no lock that the loop needs (bpy releases the GIL while
Cycles works), so a long frame never looks like a dead client.

The two threads share nothing unguarded: what the loop publishes (the epoch, the revocations, a fatal
refusal) is read under the lock of `Shared`; what the render thread asks for (a message, an upload, its
state, its device, a download, the stop) is handed to the loop with call_soon_threadsafe or
run_coroutine_threadsafe, and a download is waited for with a timeout. The queue of tasks, the
`connected` event and the upload slots are thread-safe by themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol import messages as m

from .cache import BlendCache
from .connection import Connection, LinkLost, Refused, Report, Resolver, Shared, Task, Upload

__all__ = ["DOWNLOAD_TIMEOUT_S", "MAX_PENDING_UPLOADS", "Link", "LinkLost", "Refused", "Resolver", "Task",
           "fixed_target", "fixed_targets"]

log = logging.getLogger(__name__)

#: Rendered frames waiting to be uploaded before the renderer waits for the network.
MAX_PENDING_UPLOADS = 4
#: The longest a .blend download may take before the task is given up.
DOWNLOAD_TIMEOUT_S = 6 * 3600.0
#: How long stop() waits for the loop's thread to end.
STOP_TIMEOUT_S = 5.0


def fixed_target(host: str, port: int) -> Resolver:
    """The resolver of a client given one --server: always the same address."""
    return lambda: (host, port)


def fixed_targets(servers: list[tuple[str, int]]) -> Resolver:
    """The resolver of a client given --server more than once: each in turn, so that one that is down
    or refused (a rogue server, a farm of another version) does not keep the client from the others."""
    turn = itertools.cycle(list(servers))
    return lambda: next(turn)


class Link:
    def __init__(self, resolve: Resolver, *, name: str, secret: str | None, cache: BlendCache,
                 blender: str = "", device: str = "CPU", devices: list[str] | None = None,
                 allow_scripts: bool = False, refused: Refused | None = None,
                 exit_on_refusal: bool = False, health_file: Path | None = None) -> None:
        self.name = name
        self.cache = cache
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.connected = threading.Event()
        self._shared = Shared()
        self._upload_slots = threading.Semaphore(MAX_PENDING_UPLOADS)
        self._core = Connection(resolve, self._shared, self.tasks, self.connected, self._upload_slots.release,
                                name=name, secret=secret, cache=cache, blender=blender, device=device,
                                devices=devices or [device], allow_scripts=allow_scripts, refused=refused,
                                exit_on_refusal=exit_on_refusal, health_file=health_file)
        self._device = device
        # Guards the hand-over door: _loop is set before the loop's thread starts and cleared (under this
        # lock) once that loop stops taking work, so nothing is handed to a loop that will never run it.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        with self._lock:
            self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop,), name="microfarm-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._call_soon(self._core.shutdown)
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._core.run())
            with self._lock:
                self._loop = None  # the door closes: later hand-overs are refused on the caller's side
            # What was handed over before the door closed still runs (and fails: there is no session), so
            # that no caller waits on it and no upload's file and slot are left behind.
            loop.run_until_complete(_finish_pending())
        finally:
            loop.close()

    # --- what the renderer calls ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._shared.epoch

    @property
    def draining(self) -> bool:
        """Told to stop: the render thread takes no new task and ends once the one in hand is done."""
        return self._shared.draining

    def drain(self, timeout: float) -> None:
        """Stop gracefully (see Connection.begin_drain). Called from a signal handler, on the render thread
        that may hold any lock: it takes none (call_soon_threadsafe appends to the loop's queue and wakes it)."""
        self._shared.draining = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile: nothing left to hand back)
                loop.call_soon_threadsafe(self._core.begin_drain, timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until what the render thread handed over went out (its last frames, LEASE_DONE); False if that
        took longer than `timeout` or the link is stopped."""
        coro = self._core.flush()
        with self._lock:
            if self._loop is None:
                coro.close()
                return False
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result(timeout)
        except (TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            return False
        return True

    @property
    def fatal(self) -> str | None:
        """Why the link gave up for good (a refusing server with exit_on_refusal), or None."""
        return self._shared.fatal

    @property
    def device(self) -> str:
        with self._lock:
            return self._device

    @device.setter
    def device(self, device: str) -> None:
        with self._lock:  # stored and handed over in one step: two setters cannot leave the loop the older one
            self._device = device
            if self._thread is None:
                self._core.device = device  # no loop thread yet: nothing else touches the core
            elif self._loop is not None:
                self._loop.call_soon_threadsafe(self._core.set_device, device)

    def next_task(self, timeout: float) -> Task | None:
        try:
            task = self.tasks.get(timeout=timeout)
        except queue.Empty:
            return None
        return task if task.epoch == self._shared.epoch else None

    def wanted(self, epoch: int, lease_id: int, frame: int | None = None) -> bool:
        return self._shared.wanted(epoch, lease_id, frame)

    def set_state(self, state: str, job_id: str | None = None, frame: int | None = None, *,
                  epoch: int | None = None, lease_id: int | None = None) -> None:
        """What the renderer is doing, for the heartbeats; epoch and lease tie it to one session's work."""
        self._call_soon(self._core.report, Report(state, job_id, frame, epoch, lease_id))

    def progress(self, count: int) -> None:
        """The frame being rendered made progress (any thread may say so); sent with the next heartbeat."""
        self._call_soon(self._core.set_progress, count)

    def frame_revoked(self, lease_id: int, frame: int) -> bool:
        """Was this very frame taken back (stored by another client)? Then its upload is pointless."""
        return self._shared.frame_revoked(lease_id, frame)

    def send(self, epoch: int, message: m.Message) -> None:
        self._call_soon(self._core.post, epoch, message)

    def upload(self, epoch: int, begin: m.FrameBegin, path: Path) -> None:
        """Queue a rendered frame for upload; the file is deleted once it is sent (or dropped)."""
        self._upload_slots.acquire()
        item = Upload(begin, path)
        if not self._call_soon(self._core.post, epoch, item):
            self._core.drop_upload(item)  # no loop takes it: deleting a file and a slot is safe from here

    def fetch_blend(self, epoch: int, sha256: str, size: int, timeout: float = DOWNLOAD_TIMEOUT_S,
                    name: str = "") -> Path:
        """A job file (the .blend or one it needs, at `name` in the job) from the store, downloaded first if it is
        not there intact. Raises LinkLost, or CacheFull when the disk has no room for it."""
        try:
            cached = self.cache.lookup(sha256, size, name)
        except ValueError as exc:
            raise LinkLost(f"the server named a file badly: {exc}") from None
        if cached is not None:
            log.info("file %s found in the cache", sha256[:12])
            return cached
        self.cache.check_free(size)  # raises CacheFull: a clear sentence, not a half-written file
        coro = self._core.fetch(epoch, sha256, size)
        with self._lock:
            if self._loop is None:
                coro.close()
                raise LinkLost("not connected")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise LinkLost("the connection closed during the download") from None
        except TimeoutError:
            future.cancel()
            raise LinkLost(f"the file {sha256[:12]} did not arrive within {timeout:.0f} s") from None

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Hand a call to the loop; False when no loop will run it (not started, or stopped)."""
        with self._lock:
            if self._loop is None:
                return False
            self._loop.call_soon_threadsafe(fn, *args)
            return True


async def _finish_pending() -> None:
    await asyncio.sleep(0)  # hand-overs queued before the door closed become tasks and take their first step
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
