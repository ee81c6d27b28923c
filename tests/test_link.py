"""The client's network side and the server's shutdown, over real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Clients, Farm, RogueServer, connected, free_port

from client.cache import BlendCache
from client.link import Link, LinkLost, fixed_target
from protocol import messages as m
from protocol.handshake import client_handshake, server_handshake
from protocol.limits import PROTOCOL_VERSION
from protocol.messages import Role
from protocol.settings import JobRequest, SceneInfo
from protocol.stream import MessageStream
from server_addon.core.config import ServerConfig
from server_addon.thread import ServerThread

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
SECRET = "studio-secret"


def test_client_leaves_a_server_that_went_silent(tmp_path: Path) -> None:
    """A server that accepts and then says nothing (frozen, or cut off) is left and found again."""
    sessions: list[float] = []
    second = threading.Event()

    async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = MessageStream(reader, writer)
        await server_handshake(stream, farm="mute", secret=None, assign_id=lambda peer: "c1", heartbeat_s=0.2)
        sessions.append(asyncio.get_running_loop().time())
        if len(sessions) >= 2:
            second.set()
        await reader.read()  # never answers, never pings; waits until the client hangs up

    async def main() -> None:
        server = await asyncio.start_server(silent_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = Link(fixed_target("127.0.0.1", port), name="t", secret=None, cache=BlendCache(tmp_path))
        link.start()
        try:
            assert await asyncio.to_thread(second.wait, TIMEOUT), "the client never reconnected"
        finally:
            link.stop()
            server.close()
        # It waited for the silence limit (5 pings of 0.2 s) before it gave up, not less.
        assert sessions[1] - sessions[0] >= 1.0

    asyncio.run(main())


@pytest.mark.asyncio
async def test_stopping_the_server_charges_no_frame_to_a_client(tmp_path: Path) -> None:
    thread = ServerThread(ServerConfig(output_dir=tmp_path / "out", host="127.0.0.1", port=0))
    thread.start()
    sha = "a" * 64
    thread.service.files.path(sha).write_bytes(b"BLENDER-v405")
    thread.call(lambda s: s.create_job("x.blend", sha, 12, JobRequest(chunk=2)))
    reader, writer = await asyncio.open_connection("127.0.0.1", thread.port)
    stream = MessageStream(reader, writer)
    await client_handshake(stream, role=Role.WORKER, name="w", secret=None, blender="5.0.1")
    await stream.send(m.Heartbeat(state="idle"))
    probe = await asyncio.wait_for(stream.recv(), TIMEOUT)
    assert isinstance(probe, m.Probe)
    info = SceneInfo(scene="S", engine="CYCLES", frame_start=1, frame_end=4, frame_step=1, fps=24.0,
                     resolution_x=64, resolution_y=36, percentage=100, file_format="PNG")
    await stream.send(m.ProbeResult(lease_id=probe.lease_id, ok=True, scene=info.to_wire()))
    await stream.send(m.LeaseDone(lease_id=probe.lease_id))
    assign = await asyncio.wait_for(stream.recv(), TIMEOUT)
    while not isinstance(assign, m.Assign):
        assign = await asyncio.wait_for(stream.recv(), TIMEOUT)
    await stream.send(m.Heartbeat(state="rendering", job_id=assign.job_id, frame=assign.frames[0],
                                  lease_id=assign.lease_id))

    async def frame_reported() -> None:
        server = thread.service
        while not any(c.frame == assign.frames[0] for c in server.farm.clients.values()):
            await server.feed.wait_change(server.version, timeout=1.0)
    thread.submit(asyncio.wait_for(frame_reported(), TIMEOUT), timeout=TIMEOUT + 1)
    await asyncio.to_thread(thread.stop)
    await stream.aclose()

    db = sqlite3.connect(tmp_path / "out" / ".microfarm" / "jobs.sqlite3")
    failures = db.execute("SELECT COALESCE(SUM(failures), 0) FROM frames").fetchone()[0]
    db.close()
    assert failures == 0, "a server that stops is nobody's failure"


# --- rogue servers -------------------------------------------------------------------------------------

def test_a_client_skips_rogue_servers_and_joins_the_real_one(tmp_path: Path, clients: Clients) -> None:
    """Servers that fail the secret or claim another version are said once and skipped, never obeyed: the
    client keeps retrying its --server addresses and joins the real farm when it appears."""
    with RogueServer("proof") as liar, RogueServer("version") as future:
        real_port = free_port()
        clients.start("keeper", liar.address, "--server", future.address, "--server", f"127.0.0.1:{real_port}",
                      "--token", SECRET)
        liar.wait_for(2)  # met, skipped and tried again with backoff: the client did not stop
        future.wait_for(2)
        farm = Farm(tmp_path / "out", secret=SECRET, port=real_port)
        try:
            farm.wait_until(connected(1), what="the client to join the real farm")
        finally:
            farm.stop()
    assert clients.procs["keeper"].poll() is None, "the client stopped"
    log = clients.log("keeper")
    assert log.count(f"server 127.0.0.1:{liar.port} could not prove it knows the farm secret") == 1, log
    assert log.count(f"speaks protocol version {PROTOCOL_VERSION + 1}") == 1, log
    assert f"connected to farm 'test-farm' at 127.0.0.1:{real_port}" in log


def test_a_client_told_to_exits_on_a_rogue_server(clients: Clients) -> None:
    with RogueServer("proof") as liar:
        proc = clients.start("strict", liar.address, "--token", SECRET, "--exit-on-auth-failure")
        assert proc.wait(timeout=60) == 2
    errors = [line for line in clients.log("strict").splitlines() if line.startswith("error:")]
    assert errors == [f"error: server 127.0.0.1:{liar.port} could not prove it knows the farm secret"]


# --- the bridge between the render thread and the link's loop ----------------------------------------------

class SessionServer:
    """A farm server on 127.0.0.1 that runs the real handshake and then a script: session 0 revokes frame 2 of
    lease 7, sends two probes and is dropped when the test says; later sessions send one probe and stay.
    It records what the client sent in each session."""

    def __init__(self) -> None:
        self.sessions: list[list[m.Message]] = []
        self._seen = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="session-server", daemon=True)
        self._drop: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    def _note(self, session: int, message: m.Message | None = None) -> None:
        with self._seen:
            if message is None:
                self.sessions.append([])
            else:
                self.sessions[session].append(message)
            self._seen.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        stream = MessageStream(reader, writer)
        children: list[asyncio.Task[object]] = []
        try:
            await server_handshake(stream, farm="script", secret=None, assign_id=lambda peer: "c1", heartbeat_s=30.0)
            with self._seen:
                session = len(self.sessions)
            self._note(session)

            async def record() -> None:
                while True:
                    self._note(session, await stream.recv())
            reading = asyncio.create_task(record())
            children.append(reading)
            probe = dict(job_id="j", blend_sha256="b" * 64, blend_size=12)
            if session == 0:
                await stream.send(m.Revoke(lease_id=7, frames=[2]))
                await stream.send(m.Probe(lease_id=1, **probe))
                await stream.send(m.Probe(lease_id=2, **probe))
                assert self._drop is not None
                dropped = asyncio.create_task(self._drop.wait())
                children.append(dropped)
                await asyncio.wait([reading, dropped], return_when=asyncio.FIRST_COMPLETED)  # or the client left
                reading.cancel()
                dropped.cancel()
            else:
                await stream.send(m.Probe(lease_id=3, **probe))
            await asyncio.gather(reading, return_exceptions=True)
        except Exception:  # noqa: BLE001 - the client hanging up is the expected end
            pass
        finally:
            for child in children:
                child.cancel()
            await asyncio.gather(*children, return_exceptions=True)
            await stream.aclose()

    def drop_first_session(self) -> None:
        assert self._drop is not None
        self._loop.call_soon_threadsafe(self._drop.set)

    def wait_for(self, what: str, ready: Callable[[list[list[m.Message]]], bool]) -> None:
        with self._seen:
            assert self._seen.wait_for(lambda: ready(self.sessions), TIMEOUT), f"{what}: {self.sessions}"

    def __enter__(self) -> SessionServer:
        async def open_server() -> asyncio.Server:
            self._drop = asyncio.Event()
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(open_server(), self._loop).result(TIMEOUT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for handler in self._handlers:
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        self._loop.close()


def _in_time(fn: Callable[[], object]) -> None:
    """Run a call that may block on the link (an upload waits for a free slot) and fail if it does not return."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)
        finally:
            done.set()
    threading.Thread(target=run, daemon=True).start()
    assert done.wait(TIMEOUT), "the call blocked"
    if failure:
        raise failure[0]


def test_work_of_an_earlier_session_never_reaches_the_next(tmp_path: Path) -> None:
    """The render thread's view of the link follows the loop's sessions: revocations hold for their session
    only, and a message, a frame or a state reported for an earlier session is dropped (the frame's file
    deleted and its upload slot freed), never sent on the new connection."""
    frames = tmp_path / "frames"
    frames.mkdir()
    with SessionServer() as server:
        link = Link(fixed_target("127.0.0.1", server.port), name="t", secret=None, cache=BlendCache(tmp_path / "c"),
                    device="CUDA")
        link.start()
        try:
            first = link.next_task(TIMEOUT)
            assert first is not None and first.message.lease_id == 1
            old = first.epoch
            assert old == link.epoch
            # The revoke came before the probe on the same connection: it holds for this session.
            assert link.frame_revoked(7, 2) and not link.frame_revoked(7, 3)
            assert not link.wanted(old, 7, 2) and link.wanted(old, 7, 3) and link.wanted(old, 8)

            server.drop_first_session()
            server.wait_for("a second session", lambda s: len(s) >= 2)
            assert link.next_task(TIMEOUT) is None, "the second probe of the dropped session was handed out"
            second = link.next_task(TIMEOUT)
            assert second is not None and second.message.lease_id == 3
            new = second.epoch
            assert new == link.epoch and new != old
            assert not link.wanted(old, 8), "work of the dropped session is still wanted"
            assert link.wanted(new, 7, 2) and not link.frame_revoked(7, 2), "a revocation outlived its session"

            link.device = "CPU"  # a GPU that failed: the next heartbeat says so
            link.send(old, m.LeaseDone(lease_id=1))
            paths = [frames / f"frame_{n}.png" for n in range(6)]  # more than the upload slots
            for n, path in enumerate(paths):
                path.write_bytes(b"\x89PNG frame")
                begin = m.FrameBegin(lease_id=1, job_id="j", frame=n, ext="png", size=path.stat().st_size)
                _in_time(lambda begin=begin, path=path: link.upload(old, begin, path))
            link.set_state("rendering", "j", 4, epoch=old, lease_id=1)
            link.send(new, m.LeaseDone(lease_id=3))
            server.wait_for("the marker", lambda s: m.LeaseDone(lease_id=3) in s[1])
        finally:
            link.stop()
    assert not any(path.exists() for path in paths), "a dropped frame's file was left behind"
    session = server.sessions[1]
    assert m.LeaseDone(lease_id=1) not in session
    assert not any(isinstance(message, (m.FrameBegin, m.Chunk, m.End)) for message in session)
    last = [message for message in session if isinstance(message, m.Heartbeat)][-1]
    assert (last.state, last.job_id, last.device) == ("busy", None, "CPU"), last


def test_a_stopped_link_refuses_work_without_blocking(tmp_path: Path) -> None:
    """Once its loop has stopped, the link takes no more work: frames handed to it are deleted and free their
    slots (the renderer never blocks on a dead loop), and a download fails with LinkLost."""
    with SessionServer() as server:
        link = Link(fixed_target("127.0.0.1", server.port), name="t", secret=None, cache=BlendCache(tmp_path / "c"))
        link.start()
        task = link.next_task(TIMEOUT)
        assert task is not None
        link.stop()
    paths = [tmp_path / f"frame_{n}.png" for n in range(6)]
    for n, path in enumerate(paths):
        path.write_bytes(b"\x89PNG frame")
        begin = m.FrameBegin(lease_id=1, job_id="j", frame=n, ext="png", size=path.stat().st_size)
        _in_time(lambda begin=begin, path=path: link.upload(task.epoch, begin, path))
    assert not any(path.exists() for path in paths)
    with pytest.raises(LinkLost, match="not connected"):
        link.fetch_blend(task.epoch, "d" * 64, 10, timeout=TIMEOUT)
    link.send(task.epoch, m.LeaseDone(lease_id=1))  # nothing to send it on: dropped, no error
    link.set_state("idle")
