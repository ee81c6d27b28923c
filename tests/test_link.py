"""The client's network side and the server's shutdown, over real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import Clients, Farm, RogueServer, connected, free_port

from client.cache import BlendCache
from client.link import Link, fixed_target
from protocol import messages as m
from protocol.handshake import client_handshake, server_handshake
from protocol.limits import PROTOCOL_VERSION
from protocol.messages import Role
from protocol.settings import JobRequest, SceneInfo
from protocol.stream import MessageStream
from server_addon.core.server import ServerConfig
from server_addon.core.thread import ServerThread

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
    thread.server.blends.path(sha).write_bytes(b"BLENDER-v405")
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
        server = thread.server
        while not any(c.frame == assign.frames[0] for c in server.farm.clients.values()):
            await server.wait_change(server.version, timeout=1.0)
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
