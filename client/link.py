"""The client's network side: one thread with an asyncio loop that owns the connection.

It connects (and reconnects with backoff), sends heartbeats, downloads .blend files into the
cache and streams rendered frames back, while the main thread renders. A render holds no lock
that this thread needs (bpy releases the GIL while Cycles works), so a long frame never looks
like a dead client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocol import messages as m
from protocol.errors import AuthError, ConnectionClosed, ProtocolError, VersionMismatch
from protocol.handshake import client_handshake
from protocol.limits import HEARTBEAT_INTERVAL_S
from protocol.messages import Role
from protocol.stream import FileSink, MessageStream

from .cache import BlendCache, CacheFull

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
CONNECT_TIMEOUT_S = 5.0
#: Rendered frames waiting to be uploaded before the renderer waits for the network.
MAX_PENDING_UPLOADS = 4
#: The longest a .blend download may take before the task is given up.
DOWNLOAD_TIMEOUT_S = 6 * 3600.0
#: The server pings every heartbeat interval; this many intervals of silence mean it is gone.
SERVER_SILENCE_INTERVALS = 5


#: Gives the address to connect to, asked anew before every connection attempt; None: no server
#: known yet (discovery found none), try again later. It may block (it runs on a worker thread).
Resolver = Callable[[], tuple[str, int] | None]
#: Told of a server that failed the farm-secret check or speaks another protocol version, with the
#: reason, so that discovery never chooses it again.
Refused = Callable[[str, int, str], None]


def fixed_target(host: str, port: int) -> Resolver:
    """The resolver of a client given one --server: always the same address."""
    return lambda: (host, port)


def fixed_targets(servers: list[tuple[str, int]]) -> Resolver:
    """The resolver of a client given --server more than once: each in turn, so that one that is down
    or refused (a rogue server, a farm of another version) does not keep the client from the others."""
    turn = itertools.cycle(list(servers))
    return lambda: next(turn)


class LinkLost(Exception):
    """The connection dropped; work from that session is void."""


@dataclass(frozen=True)
class Task:
    epoch: int
    message: m.Probe | m.Assign


@dataclass(frozen=True)
class _Upload:
    begin: m.FrameBegin
    path: Path


class Link:
    def __init__(self, resolve: Resolver, *, name: str, secret: str | None, cache: BlendCache,
                 blender: str = "", device: str = "CPU", devices: list[str] | None = None,
                 allow_scripts: bool = False, refused: Refused | None = None,
                 exit_on_refusal: bool = False) -> None:
        self.resolve = resolve
        self.refused = refused
        # Scripts ask for it: a server that fails the secret or speaks another version ends the client.
        # Otherwise that server is skipped (a stranger answering must not stop a render client for good).
        self.exit_on_refusal = exit_on_refusal
        self._refusals: dict[tuple[str, int], str] = {}  # what each refusing server was last logged for
        self.device = device  # reported with every heartbeat: a GPU that failed turns into "CPU"
        self.devices = devices or [device]
        self.host = ""  # the address of the current (or last) connection attempt
        self.port = 0
        self.name = name
        self.secret = secret
        self.cache = cache
        self.blender = blender
        self.allow_scripts = allow_scripts  # told to the server: jobs that need scripts come only to such clients
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.fatal: str | None = None
        self.connected = threading.Event()
        self._epoch = 0
        self._revoked: dict[int, set[int] | None] = {}  # lease -> frames, None for all
        self._state: tuple[str, str | None, int | None, int | None, int | None] = ("idle", None, None, None, None)
        self._upload_slots = threading.Semaphore(MAX_PENDING_UPLOADS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stream: MessageStream | None = None
        self._outbox: asyncio.Queue[m.Message | _Upload] | None = None
        self._download: tuple[str, FileSink | None, asyncio.Future[Path]] | None = None
        self._download_size: int | None = None  # what the manifest says the file being downloaded holds
        self._discarding = False  # the rest of a download that failed here (a full disk) is read and dropped
        self._stopping = False
        self._lock = threading.Lock()

    # --- lifecycle (main thread) ----------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="microfarm-link", daemon=True)
        self._thread.start()
        ready.wait(5.0)

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _shutdown(self) -> None:
        for task in asyncio.all_tasks():
            task.cancel()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(self._connect_forever())
        loop.close()

    # --- what the renderer calls (main thread) --------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_task(self, timeout: float) -> Task | None:
        try:
            task = self.tasks.get(timeout=timeout)
        except queue.Empty:
            return None
        return task if task.epoch == self._epoch else None

    def wanted(self, epoch: int, lease_id: int, frame: int | None = None) -> bool:
        if epoch != self._epoch:
            return False
        with self._lock:
            if lease_id not in self._revoked:
                return True
            frames = self._revoked[lease_id]
            return frames is not None and frame is not None and frame not in frames

    def set_state(self, state: str, job_id: str | None = None, frame: int | None = None, *,
                  epoch: int | None = None, lease_id: int | None = None) -> None:
        """What the renderer is doing, for the heartbeats; epoch and lease tie it to one session's work."""
        self._state = (state, job_id, frame, epoch, lease_id)
        self._call_soon(self._heartbeat_now)

    def frame_revoked(self, lease_id: int, frame: int) -> bool:
        """Was this very frame taken back (stored by another client)? Then its upload is pointless."""
        with self._lock:
            frames = self._revoked.get(lease_id)
            return frames is not None and frame in frames

    def send(self, epoch: int, message: m.Message) -> None:
        self._call_soon(self._post, epoch, message)

    def upload(self, epoch: int, begin: m.FrameBegin, path: Path) -> None:
        """Queue a rendered frame for upload; the file is deleted once it is sent (or dropped)."""
        self._upload_slots.acquire()
        self._call_soon(self._post, epoch, _Upload(begin, path))

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
        if self._loop is None:
            raise LinkLost("not connected")
        self.cache.check_free(size)  # raises CacheFull: a clear sentence, not a half-written file
        future = asyncio.run_coroutine_threadsafe(self._fetch(epoch, sha256, size), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise LinkLost("the connection closed during the download") from None
        except TimeoutError:
            future.cancel()
            raise LinkLost(f"the file {sha256[:12]} did not arrive within {timeout:.0f} s") from None

    def _call_soon(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    # --- the loop thread ------------------------------------------------------------------

    def _post(self, epoch: int, item: m.Message | _Upload) -> None:
        if epoch != self._epoch or self._outbox is None:
            if isinstance(item, _Upload):
                self._drop_upload(item)
            return
        self._outbox.put_nowait(item)

    def _drop_upload(self, item: _Upload) -> None:
        with contextlib.suppress(OSError):
            item.path.unlink()
        self._upload_slots.release()

    def _heartbeat_now(self) -> None:
        if self._outbox is not None:
            state, job_id, frame, epoch, lease_id = self._state
            if epoch is not None and epoch != self._epoch:
                # Still finishing work of an earlier connection, which the server took back: busy, not idle.
                self._outbox.put_nowait(m.Heartbeat(state="busy", device=self.device))
            else:
                self._outbox.put_nowait(m.Heartbeat(state=state, job_id=job_id, frame=frame, lease_id=lease_id,
                                                    device=self.device))

    async def _fetch(self, epoch: int, sha256: str, size: int) -> Path:
        if epoch != self._epoch or self._outbox is None:
            raise LinkLost("the connection changed")
        if self._download is not None:
            raise ProtocolError("a download is already running")
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._download = (sha256, None, future)
        self._download_size = size
        log.info("downloading file %s (%d bytes)", sha256[:12], size)
        self._outbox.put_nowait(m.BlendRequest(sha256=sha256))
        try:
            return await future
        finally:
            self._download = None

    async def _connect_forever(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stopping:
            target = await self._resolve()
            if target is None:
                # The resolver already waited for a server to appear; no backoff on top of that.
                log.info("no farm server found yet; still looking")
                await asyncio.sleep(RECONNECT_MIN_S)
                continue
            self.host, self.port = target
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                        CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError) as exc:
                log.info("cannot reach %s:%d (%s); retrying in %.1f s", self.host, self.port, exc, delay)
            else:
                stream = MessageStream(reader, writer)
                try:
                    await self._session(stream)
                    delay = RECONNECT_MIN_S
                except (AuthError, VersionMismatch) as exc:
                    if self.exit_on_refusal:
                        self.fatal = str(exc)
                        log.error("%s", exc)
                        return
                    self._refuse(str(exc))
                except (TimeoutError, ProtocolError, OSError) as exc:
                    log.warning("connection to %s:%d lost: %s", self.host, self.port, exc)
                finally:
                    if self.connected.is_set():
                        delay = RECONNECT_MIN_S  # a session that got going starts the backoff afresh
                    self._end_session()
                    await stream.aclose()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _refuse(self, reason: str) -> None:
        """Skip a server that failed the handshake's checks: said once per server, not on every retry."""
        key = (self.host, self.port)
        if self._refusals.get(key) != reason:
            self._refusals[key] = reason
            log.warning("%s; skipping it and still looking for the farm", reason)
        else:
            log.debug("the server at %s:%d refused again: %s", self.host, self.port, reason)
        if self.refused is not None:
            try:
                self.refused(self.host, self.port, reason)
            except Exception as exc:  # the look-up's bookkeeping must never stop the link
                log.warning("cannot note the refused server %s:%d: %s", self.host, self.port, exc)

    async def _resolve(self) -> tuple[str, int] | None:
        try:
            return await asyncio.to_thread(self.resolve)
        except Exception as exc:  # a failing look-up is retried like an unreachable server
            log.warning("looking for the farm server failed: %s", exc)
            return None

    def _end_session(self) -> None:
        self._epoch += 1
        self.connected.clear()
        outbox, self._outbox = self._outbox, None
        while outbox is not None and not outbox.empty():
            item = outbox.get_nowait()
            if isinstance(item, _Upload):
                self._drop_upload(item)
        if self._download is not None:
            _, sink, future = self._download
            if sink is not None:
                sink.abort()
            if not future.done():
                future.set_exception(LinkLost("the connection closed during the download"))
        self._discarding = False
        with self._lock:
            self._revoked.clear()

    async def _session(self, stream: MessageStream) -> None:
        welcome, accepted = await client_handshake(stream, role=Role.WORKER, name=self.name,
                                                   secret=self.secret, blender=self.blender,
                                                   device=self.device, devices=self.devices,
                                                   allow_scripts=self.allow_scripts)
        log.info("connected to farm %r at %s:%d as %s", welcome.farm, self.host, self.port, accepted.client_id)
        self._refusals.pop((self.host, self.port), None)  # a later refusal there is news again
        self._outbox = asyncio.Queue()
        self._stream = stream
        self.connected.set()
        interval = accepted.heartbeat_s if accepted.heartbeat_s > 0 else HEARTBEAT_INTERVAL_S
        tasks = [asyncio.create_task(self._write_loop(stream, self._outbox)),
                 asyncio.create_task(self._heartbeat_loop(interval)),
                 asyncio.create_task(self._read_loop(stream, interval * SERVER_SILENCE_INTERVALS))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeat_loop(self, interval: float) -> None:
        while True:
            self._heartbeat_now()
            await asyncio.sleep(interval)

    async def _write_loop(self, stream: MessageStream, outbox: asyncio.Queue[m.Message | _Upload]) -> None:
        while True:
            item = await outbox.get()
            if isinstance(item, _Upload):
                try:
                    # A frame of a paused or cancelled lease is still sent (the server keeps it if it
                    # wants it); one that another client already delivered is not.
                    if not self.frame_revoked(item.begin.lease_id, item.begin.frame):
                        await stream.send_file(item.begin, item.path)
                    else:
                        log.info("frame %d was delivered by another client; not sent", item.begin.frame)
                finally:
                    self._drop_upload(item)
            else:
                await stream.send(item)

    async def _read_loop(self, stream: MessageStream, silence_limit: float) -> None:
        while True:
            try:
                message = await asyncio.wait_for(stream.recv(), silence_limit)
            except TimeoutError:
                # A frozen server, or a network that dropped without a word: find the farm again.
                raise ConnectionClosed(f"the server sent nothing for {silence_limit:.0f} s") from None
            if isinstance(message, m.Heartbeat):
                continue  # the server's ping: it is alive
            if isinstance(message, m.BlendRefused):
                self._download_refused(message)
            elif isinstance(message, (m.Probe, m.Assign)):
                self.tasks.put(Task(self._epoch, message))
            elif isinstance(message, m.Revoke):
                with self._lock:
                    if message.frames:
                        current = self._revoked.setdefault(message.lease_id, set())
                        if current is not None:
                            current.update(message.frames)
                    else:
                        self._revoked[message.lease_id] = None
                log.info("lease %d revoked (%s)", message.lease_id,
                         ",".join(map(str, message.frames)) or "all frames")
            elif isinstance(message, m.BlendBegin):
                self._download_begin(message)
            elif isinstance(message, m.Chunk):
                if not self._discarding:
                    await self._download_write(message.data)
            elif isinstance(message, m.End):
                if self._discarding:
                    self._discarding = False
                else:
                    self._download_end(message)
            elif isinstance(message, m.Error):
                raise ConnectionClosed(f"server closed the connection: {message.reason}")
            else:
                raise ProtocolError(f"unexpected {message.TYPE.value} from the server")

    def _download_begin(self, begin: m.BlendBegin) -> None:
        if self._download is None or self._download[0] != begin.sha256 or self._download[1] is not None:
            raise ProtocolError("the server sent a file that was not asked for")
        if self._download_size is not None and begin.size != self._download_size:
            raise ProtocolError(f"the server sent {begin.size} bytes for a file of {self._download_size}")
        sink = self.cache.sink(begin.sha256, begin.size)
        self._download = (begin.sha256, sink, self._download[2])

    def _download_refused(self, refused: m.BlendRefused) -> None:
        if self._download is None or self._download[0] != refused.sha256:
            return
        _, sink, future = self._download
        if sink is not None:
            sink.abort()
        if not future.done():
            future.set_exception(LinkLost(f"the server will not send the file: {refused.reason}"))

    async def _download_write(self, data: bytes) -> None:
        sink = self._download_sink()
        try:
            await asyncio.to_thread(sink.write, data)
        except OSError as exc:
            # The disk filled up (something else wrote to it since the check): this file fails with that
            # sentence, its partial file goes, and the connection carries on.
            assert self._download is not None
            sha, _, future = self._download
            sink.abort()
            self._discarding = True
            self._download = (sha, None, future)
            if not future.done():
                future.set_exception(CacheFull(f"the client's cache disk filled up while downloading a job file "
                                               f"into {self.cache.base} ({exc.strerror or exc})"))

    def _download_sink(self) -> FileSink:
        if self._download is None or self._download[1] is None:
            raise ProtocolError("data chunk outside a download")
        return self._download[1]

    def _download_end(self, end: m.End) -> None:
        sink = self._download_sink()
        assert self._download is not None
        sha, _, future = self._download
        try:
            sink.finish(end.sha256)
        except ProtocolError:
            sink.abort()
            raise
        path = self.cache.commit(sink, sha)
        log.info("file %s downloaded and verified", sha[:12])
        if not future.done():
            future.set_result(path)
