"""The client's connection to the farm, all of it on the link's asyncio loop.

It connects (and reconnects with backoff), runs one session at a time (handshake, heartbeats, the read and
write loops), downloads job files into the cache and streams rendered frames back. Everything in `Connection`
runs on that one loop and touches its state only there, so it takes no lock of its own. What the render
thread must read (the session's epoch, the revocations, a fatal refusal) is published to `Shared`, the one
object both threads touch, behind its one lock. The render thread's side is client.link.Link, which hands
work over to this loop only through call_soon_threadsafe and run_coroutine_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocol import messages as m
from protocol.errors import AuthError, ConnectionClosed, ProtocolError, VersionMismatch
from protocol.handshake import client_handshake
from protocol.limits import HEARTBEAT_INTERVAL_S
from protocol.messages import Role
from protocol.names import printable
from protocol.stream import FileSink, MessageStream

from .cache import BlendCache, CacheFull

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
CONNECT_TIMEOUT_S = 5.0
#: A server that keeps refusing this client (another farm, or this client's secret is wrong) is logged once, then
#: in a counted line at most this often.
REFUSAL_SUMMARY_S = 600.0
#: The server pings every heartbeat interval; this many intervals of silence mean it is gone.
SERVER_SILENCE_INTERVALS = 5

#: Gives the address to connect to, asked anew before every connection attempt; None: no server
#: known yet (discovery found none), try again later. It may block (it runs on a worker thread).
Resolver = Callable[[], tuple[str, int] | None]
#: Told of a server that failed the farm-secret check or speaks another protocol version, with the
#: reason, so that discovery never chooses it again.
Refused = Callable[[str, int, str], None]


class LinkLost(Exception):
    """The connection dropped; work from that session is void."""


@dataclass(frozen=True)
class Task:
    epoch: int
    message: m.Probe | m.Assign


@dataclass(frozen=True)
class Upload:
    begin: m.FrameBegin
    path: Path


@dataclass(frozen=True)
class Flush:
    """Set once everything posted before it went out (the last frames and messages of a stopping client)."""

    future: asyncio.Future[None]


@dataclass(frozen=True)
class Report:
    """What the renderer is doing, for the heartbeats; epoch and lease tie it to one session's work."""

    state: str = "idle"
    job_id: str | None = None
    frame: int | None = None
    epoch: int | None = None
    lease_id: int | None = None


class Shared:
    """What the loop publishes and the render thread reads, always under the one lock. A session's end moves
    the epoch and clears its revocations in one step, so a reader never sees one session's epoch together
    with another session's revocations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._revoked: dict[int, set[int]] = {}  # lease -> frames taken back one by one
        self._whole: set[int] = set()  # leases taken back as a whole (a frame taken back before stays so)
        self._fatal: str | None = None
        # Set once (False -> True) when the client is told to stop, also from a signal handler, which must take
        # no lock: a plain attribute. From then on the client takes no new work (see Connection.begin_drain).
        self.draining = False

    # --- read by anyone ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    @property
    def fatal(self) -> str | None:
        with self._lock:
            return self._fatal

    def wanted(self, epoch: int, lease_id: int, frame: int | None = None) -> bool:
        with self._lock:
            if epoch != self._epoch or lease_id in self._whole:
                return False
            frames = self._revoked.get(lease_id)
            return frames is None or (frame is not None and frame not in frames)

    def frame_revoked(self, lease_id: int, frame: int) -> bool:
        with self._lock:
            return frame in self._revoked.get(lease_id, ())

    # --- written by the loop -----------------------------------------------------------------

    def end_session(self) -> None:
        with self._lock:
            self._epoch += 1
            self._revoked.clear()
            self._whole.clear()

    def revoke(self, lease_id: int, frames: list[int]) -> None:
        with self._lock:
            if frames:
                self._revoked.setdefault(lease_id, set()).update(frames)
            else:
                self._whole.add(lease_id)

    def fail(self, reason: str) -> None:
        with self._lock:
            self._fatal = reason


class Connection:
    """The async core: one instance per link, used only on that link's loop (apart from its constructor)."""

    def __init__(self, resolve: Resolver, shared: Shared, tasks: queue.Queue[Task], connected: threading.Event,
                 upload_done: Callable[[], None], *, name: str, secret: str | None, cache: BlendCache,
                 blender: str, device: str, devices: list[str], allow_scripts: bool, refused: Refused | None,
                 exit_on_refusal: bool, health_file: Path | None = None) -> None:
        self.resolve = resolve
        self.shared = shared
        self.tasks = tasks  # thread-safe: the render thread takes from it
        self.connected = connected
        self.upload_done = upload_done  # frees an upload slot (a thread-safe semaphore's release)
        self.name = name
        self.secret = secret
        self.cache = cache
        self.blender = blender
        self.device = device  # reported with every heartbeat: a GPU that failed turns into "CPU"
        self.devices = devices
        self.allow_scripts = allow_scripts  # told to the server: jobs that need scripts come only to such clients
        self.refused = refused
        # Scripts ask for it: a server that fails the secret or speaks another version ends the client.
        # Otherwise that server is skipped (a stranger answering must not stop a render client for good).
        self.exit_on_refusal = exit_on_refusal
        self.health_file = health_file  # touched while this loop runs: a container's health check reads it
        self.host = ""  # the address of the current (or last) connection attempt
        self.port = 0
        # What each refusing server was last logged for, the refusals since, and when that line was written.
        self._refusals: dict[tuple[str, int], tuple[str, int, float]] = {}
        self.refusal_summary_s = REFUSAL_SUMMARY_S
        self._report = Report()
        self._progress: int | None = None
        self._outbox: asyncio.Queue[m.Message | Upload | Flush] | None = None
        self._download: tuple[str, FileSink | None, asyncio.Future[Path]] | None = None
        self._download_size: int | None = None  # what the manifest says the file being downloaded holds
        self._discarding = False  # the rest of a download that failed here (a full disk) is read and dropped
        self._stopping = False
        # The leases this session was given and not yet ended (LEASE_DONE): their frames, in order.
        self._assigned: dict[int, list[int]] = {}
        self._drain_timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()  # a session watches it too: a cancellation can be lost (wait_for, 3.11)

    # --- what the bridge hands over (run on the loop) ----------------------------------------------

    def shutdown(self) -> None:
        self._stopping = True
        self._stopped.set()
        for task in asyncio.all_tasks():
            task.cancel()

    def post(self, epoch: int, item: m.Message | Upload) -> None:
        if epoch != self.shared.epoch or self._outbox is None:
            if isinstance(item, Upload):
                self.drop_upload(item)
            return
        if isinstance(item, m.LeaseDone):
            if item.lease_id not in self._assigned:
                return  # ended already (handed back when the drain ran out of time)
            del self._assigned[item.lease_id]
        self._outbox.put_nowait(item)

    async def flush(self) -> None:
        """Wait until what was posted so far went out (nothing to wait for without a session)."""
        if self._outbox is None:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait(Flush(future))
        await future

    # --- a graceful stop (SIGTERM from Kubernetes or a spot node's shutdown, Ctrl+C) ---------------

    def begin_drain(self, timeout: float) -> None:
        """Take no new work, give back at once what is not started, and let the frame being rendered finish
        within `timeout` seconds; then it is given back too (see _drain_expired)."""
        if self._drain_timer is not None:
            return
        self.shared.draining = True
        self._drain_timer = asyncio.get_running_loop().call_later(timeout, self._drain_expired)
        self._heartbeat_now()  # "draining" first: the server hands this client nothing more
        while True:  # tasks waiting for the render thread: none of their work began
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task.epoch == self.shared.epoch:
                self._give_back(task.message.lease_id, end=True)
        report = self._report
        for lease_id, frames in list(self._assigned.items()):  # the lease being worked on
            if report.lease_id == lease_id and report.frame in frames:
                rest = frames[frames.index(report.frame) + 1:]  # (those before it are rendered or failed)
            else:
                rest = frames  # still downloading or opening the job's files: nothing rendered yet
            self._give_back(lease_id, rest)
        log.info("stopping: no new work; the frame being rendered may finish within %.0f s", timeout)

    def _drain_expired(self) -> None:
        report = self._report
        for lease_id, frames in list(self._assigned.items()):
            current = [report.frame] if report.lease_id == lease_id and report.frame in frames else []
            log.warning("stopping: the drain time is up; %s given back", f"frame {current[0]}" if current
                        else f"lease {lease_id}")
            self._give_back(lease_id, current, end=True)
        if self._download is not None and not self._download[2].done():
            self._download[2].set_exception(LinkLost("the client is stopping"))

    def _give_back(self, lease_id: int, frames: list[int], *, end: bool = False) -> None:
        """Tell the server these frames of the lease will not be rendered here (end: the lease ends too), and the
        render thread that it must not render them (a frame being rendered is stopped)."""
        if frames:
            self.shared.revoke(lease_id, frames)
            if self._outbox is not None:
                self._outbox.put_nowait(m.HandBack(lease_id=lease_id, frames=list(frames)))
        if end:
            self.shared.revoke(lease_id, [])
            if self._outbox is not None and self._assigned.pop(lease_id, None) is not None:
                self._outbox.put_nowait(m.LeaseDone(lease_id=lease_id))

    def report(self, report: Report) -> None:
        self._report = report
        self._progress = None  # counted afresh for each frame
        self._heartbeat_now()

    def set_progress(self, count: int) -> None:
        """The frame being rendered shows signs of life; the next heartbeat carries the count."""
        self._progress = count

    def set_device(self, device: str) -> None:
        self.device = device

    async def fetch(self, epoch: int, sha256: str, size: int) -> Path:
        if epoch != self.shared.epoch or self._outbox is None:
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

    def drop_upload(self, item: Upload) -> None:
        with contextlib.suppress(OSError):
            item.path.unlink()
        self.upload_done()

    # --- connecting ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve the session, reconnect with backoff; until stopped or refused for good."""
        delay = RECONNECT_MIN_S
        while not self._stopping:
            self._alive()
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
                        self.shared.fail(str(exc))
                        log.error("%s", printable(exc))
                        return
                    self._refuse(str(exc))
                except (TimeoutError, ProtocolError, OSError) as exc:
                    if self.connected.is_set():
                        log.warning("connection to %s:%d lost: %s", self.host, self.port, printable(exc))
                    else:
                        # Refused in the handshake (a full farm says so) or cut off in it: try again, backing off.
                        log.warning("no session with %s:%d: %s; retrying in %.1f s", self.host, self.port,
                                    printable(exc), delay)
                finally:
                    if self.connected.is_set():
                        delay = RECONNECT_MIN_S  # a session that got going starts the backoff afresh
                    self._end_session()
                    await stream.aclose()
            if self._stopping:
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _refuse(self, reason: str) -> None:
        """Skip a server that failed the handshake's checks: said once per server, not on every retry."""
        key = (self.host, self.port)
        last = self._refusals.get(key)
        now = time.monotonic()
        if last is None or last[0] != reason:
            self._refusals[key] = (reason, 0, now)
            log.warning("%s; skipping it and still looking for the farm", printable(reason))
        elif now - last[2] >= self.refusal_summary_s:
            # A line now and then, not one per retry: the operator still learns that it goes on.
            self._refusals[key] = (reason, 0, now)
            log.warning("the server at %s:%d refused %d more time%s in the last %.0f s (%s); still looking",
                        self.host, self.port, last[1] + 1, "" if last[1] == 0 else "s", now - last[2],
                        printable(reason))
        else:
            self._refusals[key] = (reason, last[1] + 1, last[2])
            log.debug("the server at %s:%d refused again: %s", self.host, self.port, printable(reason))
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
        self.shared.end_session()
        self.connected.clear()
        outbox, self._outbox = self._outbox, None
        self._assigned.clear()
        while outbox is not None and not outbox.empty():
            item = outbox.get_nowait()
            if isinstance(item, Upload):
                self.drop_upload(item)
            elif isinstance(item, Flush) and not item.future.done():
                item.future.set_result(None)  # nothing more will go out
        if self._download is not None:
            _, sink, future = self._download
            if sink is not None:
                sink.abort()
            if not future.done():
                future.set_exception(LinkLost("the connection closed during the download"))
        self._discarding = False

    # --- one session -------------------------------------------------------------------------------

    async def _session(self, stream: MessageStream) -> None:
        welcome, accepted = await client_handshake(stream, role=Role.WORKER, name=self.name,
                                                   secret=self.secret, blender=self.blender,
                                                   device=self.device, devices=self.devices,
                                                   allow_scripts=self.allow_scripts)
        log.info("connected to farm %r at %s:%d as %s%s", welcome.farm, self.host, self.port, accepted.client_id,
                 " (TLS)" if stream.ssl_object is not None else "")
        self._refusals.pop((self.host, self.port), None)  # a later refusal there is news again
        self._outbox = asyncio.Queue()
        self.connected.set()
        interval = accepted.heartbeat_s if accepted.heartbeat_s > 0 else HEARTBEAT_INTERVAL_S
        tasks = [asyncio.create_task(self._write_loop(stream, self._outbox)),
                 asyncio.create_task(self._heartbeat_loop(interval)),
                 asyncio.create_task(self._read_loop(stream, interval * SERVER_SILENCE_INTERVALS)),
                 asyncio.create_task(self._stopped.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _heartbeat_now(self) -> None:
        if self._outbox is None:
            return
        report = self._report
        if self.shared.draining:
            self._outbox.put_nowait(m.Heartbeat(state="draining", job_id=report.job_id, frame=report.frame,
                                                lease_id=report.lease_id, device=self.device))
        elif report.epoch is not None and report.epoch != self.shared.epoch:
            # Still finishing work of an earlier connection, which the server took back: busy, not idle.
            self._outbox.put_nowait(m.Heartbeat(state="busy", device=self.device))
        else:
            self._outbox.put_nowait(m.Heartbeat(state=report.state, job_id=report.job_id, frame=report.frame,
                                                lease_id=report.lease_id, device=self.device,
                                                progress=self._progress if report.frame is not None else None))

    def _alive(self) -> None:
        """The network side works (connected, or trying to connect): said by the health file's time."""
        if self.health_file is not None:
            try:
                self.health_file.touch()
            except OSError as exc:
                log.warning("cannot touch the health file %s: %s", self.health_file, exc)
                self.health_file = None

    async def _heartbeat_loop(self, interval: float) -> None:
        while True:
            self._alive()
            self._heartbeat_now()
            await asyncio.sleep(interval)

    async def _write_loop(self, stream: MessageStream, outbox: asyncio.Queue[m.Message | Upload | Flush]) -> None:
        while True:
            item = await outbox.get()
            if isinstance(item, Flush):
                if not item.future.done():
                    item.future.set_result(None)
            elif isinstance(item, Upload):
                try:
                    # A frame of a paused or cancelled lease is still sent (the server keeps it if it
                    # wants it); one that another client already delivered is not.
                    if not self.shared.frame_revoked(item.begin.lease_id, item.begin.frame):
                        await stream.send_file(item.begin, item.path)
                    else:
                        log.info("frame %d was delivered by another client; not sent", item.begin.frame)
                finally:
                    self.drop_upload(item)
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
                self._assigned[message.lease_id] = list(message.frames) if isinstance(message, m.Assign) else []
                if self.shared.draining:  # sent before the server heard that this client stops
                    self._give_back(message.lease_id, self._assigned[message.lease_id], end=True)
                else:
                    self.tasks.put(Task(self.shared.epoch, message))
            elif isinstance(message, m.Revoke):
                self.shared.revoke(message.lease_id, message.frames)
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

    # --- a download --------------------------------------------------------------------------------

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
