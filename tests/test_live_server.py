"""A live FarmService on 127.0.0.1 facing misbehaving connections while a good one stays open."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from protocol import messages as m
from protocol.auth import new_nonce
from protocol.errors import AuthError, ConnectionClosed
from protocol.framing import encode, read_frame
from protocol.handshake import client_handshake
from protocol.limits import HANDSHAKE_MAX_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from protocol.messages import Role
from protocol.stream import MessageStream
from server_addon.core.config import ServerConfig
from server_addon.thread import ServerThread
from tools.control import Control, ToolError

pytestmark = pytest.mark.integration

TIMEOUT = 5.0
SECRET = "live-server-secret"


@pytest.fixture
def start_server(tmp_path):
    threads: list[ServerThread] = []

    def start(secret: str | None = None) -> ServerThread:
        thread = ServerThread(ServerConfig(output_dir=tmp_path / "out", host="127.0.0.1", port=0,
                                           secret=secret, farm_name="live-test"))
        thread.start()
        threads.append(thread)
        return thread

    yield start
    for thread in threads:
        thread.stop()


@pytest.fixture
def server(start_server):
    return start_server()


def refused(thread: ServerThread) -> int:
    return thread.call(lambda s: s.stats.connections_refused)


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)


async def until_closed(reader: asyncio.StreamReader) -> list[m.Message]:
    """Everything the server sends before it closes the connection (each read has a timeout)."""
    got: list[m.Message] = []
    while True:
        try:
            payload = await asyncio.wait_for(read_frame(reader), TIMEOUT)
        except ConnectionClosed:
            return got
        got.append(m.from_wire(payload))


def hello(version: int = PROTOCOL_VERSION, role: str = "worker") -> bytes:
    return encode(m.Hello(version=version, role=role, name="rude", nonce=new_nonce()).to_wire())


# Each misbehaviour writes its bytes and returns (reader, writer); the table gives the warning the
# server must log, and what the connection must have received before it was closed.

async def oversized(port):
    reader, writer = await open_raw(port)
    writer.write(struct.pack(">I", MAX_MESSAGE_BYTES + 1))  # no body follows, and no EOF
    return reader, writer


async def garbage(port):
    reader, writer = await open_raw(port)
    writer.write(struct.pack(">I", 8) + b"\xc1" * 8)
    return reader, writer


async def not_a_map(port):
    reader, writer = await open_raw(port)
    body = bytes([0x93, 1, 2, 3])  # msgpack [1, 2, 3]
    writer.write(struct.pack(">I", len(body)) + body)
    return reader, writer


async def truncated(port):
    reader, writer = await open_raw(port)
    writer.write(struct.pack(">I", 100) + b"0123456789")
    writer.write_eof()
    return reader, writer


async def wrong_version(port):
    reader, writer = await open_raw(port)
    writer.write(hello(version=PROTOCOL_VERSION + 41))
    return reader, writer


async def unknown_after_hello(port):
    reader, writer = await open_raw(port)
    writer.write(hello() + encode({"t": "launch_missiles"}))
    return reader, writer


async def control_then(port, payload):
    reader, writer = await open_raw(port)
    stream = MessageStream(reader, writer)
    await client_handshake(stream, role=Role.CONTROL, name="rude-tool", secret=None, timeout=TIMEOUT)
    writer.write(encode(payload))
    return reader, writer


async def control_unknown(port):
    return await control_then(port, {"t": "launch_missiles"})


async def control_heartbeat(port):
    return await control_then(port, m.Heartbeat(state="idle").to_wire())


async def control_frame_begin(port):
    return await control_then(port, m.FrameBegin(lease_id=1, job_id="x", frame=1, ext="png", size=1).to_wire())


# name: (misbehaviour, warning fragment, types received before the close, refused in the handshake)
CASES = {
    "oversized": (oversized, f"the limit is {HANDSHAKE_MAX_BYTES}", [], True),
    "garbage": (garbage, "undecodable message", [], True),
    "not-a-map": (not_a_map, "not a map", [], True),
    "truncated": (truncated, "stream ended after 10 of 100 message bytes", [], True),
    "wrong-version": (wrong_version, f"protocol version {PROTOCOL_VERSION + 41} is not supported",
                      [m.Error], True),
    "unknown-after-hello": (unknown_after_hello, "unknown message type 'launch_missiles'", [m.Welcome], True),
    "control-unknown": (control_unknown, "unknown message type 'launch_missiles'", [m.Error], False),
    "control-heartbeat": (control_heartbeat, "a control connection may not send heartbeat", [m.Error], False),
    "control-frame-begin": (control_frame_begin, "a control connection may not send frame_begin",
                            [m.Error], False),
}


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("server_addon")]


async def check_case(port: int, name: str, caplog) -> None:
    misbehave, fragment, expected, _ = CASES[name]
    reader, writer = await misbehave(port)
    try:
        got = await until_closed(reader)
    finally:
        writer.close()
    assert [type(msg) for msg in got] == expected, name
    if expected == [m.Error]:
        assert fragment in got[0].reason
    # The server logs before it closes, so the warning is there once we have seen the EOF.
    assert any(fragment in text for text in warnings_logged(caplog)), (name, warnings_logged(caplog))


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(CASES))
async def test_bad_connection_is_closed_and_logged(server, caplog, name):
    caplog.set_level(logging.INFO, logger="server_addon")
    good = await Control.connect(f"127.0.0.1:{server.port}", None)
    try:
        before = (await asyncio.wait_for(good.status(), TIMEOUT))
        await check_case(server.port, name, caplog)
        after = await asyncio.wait_for(good.status(), TIMEOUT)
    finally:
        await good.close()
    assert isinstance(after, m.Status) and after == before
    assert refused(server) == (1 if CASES[name][3] else 0)


@pytest.mark.asyncio
async def test_all_at_once_while_a_control_connection_stays_open(server, caplog):
    caplog.set_level(logging.INFO, logger="server_addon")
    good = await Control.connect(f"127.0.0.1:{server.port}", None)
    try:
        await asyncio.wait_for(good.status(), TIMEOUT)
        await asyncio.gather(*(check_case(server.port, name, caplog) for name in CASES))
        status = await asyncio.wait_for(good.status(), TIMEOUT)
    finally:
        await good.close()
    assert isinstance(status, m.Status) and status.jobs == [] and status.clients == []
    assert refused(server) == sum(1 for case in CASES.values() if case[3])


@pytest.mark.asyncio
async def test_server_with_secret_refuses_clients_without_it(start_server, caplog):
    caplog.set_level(logging.INFO, logger="server_addon")
    server = start_server(SECRET)
    good = await Control.connect(f"127.0.0.1:{server.port}", SECRET)
    try:
        for secret in (None, "not-the-secret"):
            reader, writer = await open_raw(server.port)
            with pytest.raises(AuthError):
                await client_handshake(MessageStream(reader, writer), role=Role.WORKER, name="intruder",
                                       secret=secret, timeout=TIMEOUT)
            try:
                assert await until_closed(reader) == []
            finally:
                writer.close()
        assert refused(server) == 2
        assert sum("refused" in text for text in warnings_logged(caplog)) == 2

        with pytest.raises(ToolError, match="--token"):
            await Control.connect(f"127.0.0.1:{server.port}", None)
        status = await asyncio.wait_for(good.status(), TIMEOUT)
        assert isinstance(status, m.Status) and status.clients == []
    finally:
        await good.close()


@pytest.mark.asyncio
async def test_a_stranger_cannot_make_the_server_hold_big_messages(server):
    """Before the handshake a message may not exceed HANDSHAKE_MAX_BYTES; after it, MAX_MESSAGE_BYTES."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 5)
    try:
        writer.write(struct.pack(">I", HANDSHAKE_MAX_BYTES + 1) + b"x" * 100)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the server closed the connection at once"
    finally:
        writer.close()
    assert HANDSHAKE_MAX_BYTES < MAX_MESSAGE_BYTES // 100
