"""Framing and message schemas, without sockets: bytes are fed into an asyncio.StreamReader."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from protocol import messages as m
from protocol.errors import ConnectionClosed, MessageTooLarge, ProtocolError
from protocol.framing import decode_body, encode, read_frame
from protocol.limits import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.unit

TIMEOUT = 2.0
SHA = "ab" * 32


def prefix(length: int) -> bytes:
    return struct.pack(">I", length)


def frame_of(body: bytes) -> bytes:
    return prefix(len(body)) + body


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read_message(data: bytes, eof: bool = True, max_bytes: int = MAX_MESSAGE_BYTES) -> m.Message:
    payload = await asyncio.wait_for(read_frame(reader_with(data, eof), max_bytes), TIMEOUT)
    return m.from_wire(payload)


# --- length prefix ------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_oversized_prefix_raises_before_any_body_arrives():
    # Only the prefix is fed and the stream stays open: a reader that waited for the body would hang.
    reader = reader_with(prefix(MAX_MESSAGE_BYTES + 1), eof=False)
    with pytest.raises(MessageTooLarge, match=str(MAX_MESSAGE_BYTES)):
        await asyncio.wait_for(read_frame(reader), TIMEOUT)


@pytest.mark.asyncio
async def test_oversized_prefix_leaves_the_body_unread():
    reader = reader_with(prefix(0xFFFFFFFF) + b"xyz", eof=False)
    with pytest.raises(MessageTooLarge):
        await asyncio.wait_for(read_frame(reader), TIMEOUT)
    assert await asyncio.wait_for(reader.read(3), TIMEOUT) == b"xyz"


@pytest.mark.asyncio
async def test_limit_is_inclusive():
    body = msgpack.packb({"t": "error", "reason": "x" * 40}, use_bin_type=True)
    message = await read_message(frame_of(body), max_bytes=len(body))
    assert message == m.Error(reason="x" * 40)
    with pytest.raises(MessageTooLarge):
        await read_message(frame_of(body), max_bytes=len(body) - 1)


def test_encode_refuses_messages_over_the_limit():
    with pytest.raises(MessageTooLarge):
        encode(m.Chunk(data=b"\0" * 100).to_wire(), max_bytes=50)
    assert len(encode(m.Chunk(data=b"\0" * 10).to_wire(), max_bytes=50)) > 10


@pytest.mark.asyncio
@pytest.mark.parametrize("data, fragment", [
    (prefix(100) + b"0123456789", "10 of 100"),
    (b"\x00\x00", "length prefix"),
    (b"", "closed"),
])
async def test_truncated_stream_raises_connection_closed(data, fragment):
    with pytest.raises(ConnectionClosed, match=fragment):
        await read_message(data)


@pytest.mark.asyncio
async def test_zero_length_message_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="empty"):
        await read_message(prefix(0))


# --- garbage bodies -------------------------------------------------------------------------

GARBAGE = {
    "reserved byte": b"\xc1" * 8,
    "cut msgpack": msgpack.packb({"t": "error", "reason": "abc"})[:-2],
    "two objects": msgpack.packb({"t": "status_request"}) + msgpack.packb(1),
    "list": msgpack.packb(["t", "error"]),
    "int": msgpack.packb(42),
    "string": msgpack.packb("hello"),
    "int keys": msgpack.packb({1: "error", 2: "x"}),
    "nested map key": b"\x81\x81\xa1a\x01\x01",  # {{"a": 1}: 1}
}


@pytest.mark.asyncio
@pytest.mark.parametrize("body", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_body_is_a_protocol_error(body):
    with pytest.raises(ProtocolError) as info:
        await read_message(frame_of(body))
    # A decoding problem is reported as such, not as a closed stream or an oversize.
    assert type(info.value) is ProtocolError


@pytest.mark.asyncio
async def test_map_with_bytes_keys_is_not_a_message():
    with pytest.raises(ProtocolError):
        await read_message(frame_of(msgpack.packb({b"t": "status_request"}, use_bin_type=True)))


def test_decode_body_rejects_bytes_keys():
    with pytest.raises(ProtocolError):
        decode_body(msgpack.packb({b"t": "status_request"}, use_bin_type=True))


# --- schemas ------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    {"t": "launch_missiles"}, {"t": 5}, {"t": None}, {"t": b"hello"}, {"reason": "no type at all"},
], ids=["unknown", "int", "none", "bytes", "missing"])
def test_unknown_message_type(payload):
    with pytest.raises(ProtocolError, match="unknown message type"):
        m.from_wire(payload)


FRAME_BEGIN = {"t": "frame_begin", "lease_id": 1, "job_id": "j", "frame": 3, "ext": "png", "size": 10}


def test_missing_field():
    payload = dict(FRAME_BEGIN)
    del payload["size"]
    with pytest.raises(ProtocolError, match="'size'"):
        m.from_wire(payload)


@pytest.mark.parametrize("payload, field", [
    ({**FRAME_BEGIN, "lease_id": True}, "lease_id"),          # bool is not an int
    ({**FRAME_BEGIN, "frame": 3.0}, "frame"),                 # nor is a float
    ({**FRAME_BEGIN, "size": "10"}, "size"),
    ({**FRAME_BEGIN, "job_id": b"j"}, "job_id"),               # bytes is not a str
    ({**FRAME_BEGIN, "ext": None}, "ext"),
    ({**FRAME_BEGIN, "render_s": "fast"}, "render_s"),
    ({"t": "chunk", "data": "text, not bytes"}, "data"),
    ({"t": "assign", "lease_id": 1, "job_id": "j", "blend_sha256": SHA, "blend_size": 1,
      "frames": [1, "2"], "settings": {}}, "frames"),
    ({"t": "assign", "lease_id": 1, "job_id": "j", "blend_sha256": SHA, "blend_size": 1,
      "frames": [1], "settings": {b"file_format": "PNG"}}, "settings"),
    ({"t": "status", "jobs": {"id": "j"}, "clients": []}, "jobs"),
    ({"t": "welcome", "version": 1, "farm": "f", "nonce": b"n", "auth_required": 1}, "auth_required"),
    ({"t": "auth", "proof": "not bytes"}, "proof"),
])
def test_wrongly_typed_field(payload, field):
    with pytest.raises(ProtocolError, match=repr(field)):
        m.from_wire(payload)


def test_int_is_accepted_where_a_float_is_expected():
    accepted = m.from_wire({"t": "accepted", "client_id": "c1", "heartbeat_s": 2})
    assert accepted == m.Accepted(client_id="c1", heartbeat_s=2)


def test_defaults_fill_optional_fields():
    assert m.from_wire({"t": "heartbeat"}) == m.Heartbeat(state="idle", job_id=None, frame=None)
    assert m.from_wire({"t": "revoke", "lease_id": 4}) == m.Revoke(lease_id=4, frames=[])


@pytest.mark.asyncio
async def test_unknown_keys_are_ignored():
    body = msgpack.packb({"t": "lease_done", "lease_id": 3, "future_field": [1, 2], "priority": "high"},
                         use_bin_type=True)
    assert await read_message(frame_of(body)) == m.LeaseDone(lease_id=3)


SAMPLES: dict[str, m.Message] = {
    "blend_refused": m.BlendRefused(sha256="ab" * 32, reason="job paused"),
    "hello": m.Hello(version=1, role="worker", name="box", nonce=bytes(range(32)), host="box.lan",
                     blender="5.0.1"),
    "welcome": m.Welcome(version=1, farm="farm", nonce=b"\x01" * 32, auth_required=True, proof=b"\xff" * 32),
    "auth": m.Auth(proof=b"\x02" * 32),
    "accepted": m.Accepted(client_id="c7", heartbeat_s=2.5),
    "error": m.Error(reason="nope ünïcode"),
    "heartbeat": m.Heartbeat(state="rendering", job_id="shot-abc123", frame=12),
    "probe": m.Probe(lease_id=1, job_id="j", blend_sha256=SHA, blend_size=1234, allow_scripts=True),
    "probe_result": m.ProbeResult(lease_id=1, ok=False, scene={"scene": "S", "frame_start": 1},
                                  error="cannot open"),
    "assign": m.Assign(lease_id=2, job_id="j", blend_sha256=SHA, blend_size=1234, frames=[1, 2, 3],
                       settings={"file_format": "PNG", "samples": None, "percentage": 50}),
    "revoke": m.Revoke(lease_id=2, frames=[3]),
    "lease_done": m.LeaseDone(lease_id=2),
    "hand_back": m.HandBack(lease_id=2, frames=[4, 5]),
    "frame_begin": m.FrameBegin(lease_id=2, job_id="j", frame=-5, ext="exr", size=99, render_s=1.25),
    "frame_failed": m.FrameFailed(lease_id=2, job_id="j", frame=1, error="boom", log="line 1\nline 2"),
    "blend_request": m.BlendRequest(sha256=SHA),
    "blend_begin": m.BlendBegin(sha256=SHA, size=1 << 40),
    "chunk": m.Chunk(data=bytes(range(256)) * 4),
    "end": m.End(sha256=SHA),
    "submit": m.Submit(name="shot.blend", blend_sha256=SHA, blend_size=10, settings={"chunk": 2}),
    "upload_ready": m.UploadReady(need_bytes=True),
    "submitted": m.Submitted(job_id="shot-abc123"),
    "status_request": m.StatusRequest(),
    "status": m.Status(jobs=[{"id": "j", "frames_done": 3}], clients=[{"id": "c1", "state": "idle"}]),
    "watch": m.Watch(job_id="j"),
    "job_update": m.JobUpdate(job={"id": "j", "state": "done", "resolution": [64, 36]}),
    "job_control": m.JobControl(action="priority", job_id="j", args={"priority": 5}),
    "job_control_done": m.JobControlDone(message="ok", jobs=[{"id": "j"}]),
    "frame_log_request": m.FrameLogRequest(job_id="j", frame=4),
    "frame_log": m.FrameLog(job_id="j", frame=4, failures=2, error="boom", log="tail", clients=["a", "b"]),
}


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(m.message_types())
    for kind, sample in SAMPLES.items():
        assert sample.TYPE.value == kind


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", sorted(m.message_types()))
async def test_round_trip(kind):
    sample = SAMPLES[kind]
    wire = encode(sample.to_wire())
    assert struct.unpack(">I", wire[:4])[0] == len(wire) - 4
    decoded = await read_message(wire)
    assert type(decoded) is m.message_types()[kind]
    assert decoded == sample


@pytest.mark.asyncio
async def test_consecutive_frames_are_read_one_at_a_time():
    reader = reader_with(encode(SAMPLES["heartbeat"].to_wire()) + encode(SAMPLES["end"].to_wire()))
    first = m.from_wire(await asyncio.wait_for(read_frame(reader), TIMEOUT))
    second = m.from_wire(await asyncio.wait_for(read_frame(reader), TIMEOUT))
    assert (first, second) == (SAMPLES["heartbeat"], SAMPLES["end"])
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(read_frame(reader), TIMEOUT)


@pytest.mark.asyncio
async def test_a_file_goes_as_chunks_with_its_digest_known_or_computed(tmp_path):
    """A file of the content store goes with the sha256 it was stored under (not hashed again for every client);
    the receiver checks the bytes against it all the same, so a file changed on disk never passes."""
    import hashlib

    from protocol.stream import FileSink, MessageStream

    data = bytes(range(256)) * 5000  # 1.28 MB: three chunks
    path = tmp_path / "file"
    path.write_bytes(data)
    good = hashlib.sha256(data).hexdigest()

    async def transfer(known: str | None) -> tuple[str, FileSink, m.End]:
        server = await asyncio.start_server(lambda r, w: received.put_nowait((r, w)), "127.0.0.1", 0)
        received: asyncio.Queue = asyncio.Queue()
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sender = MessageStream(reader, writer)
        inbound = MessageStream(*await received.get())
        sink = FileSink(tmp_path / "in", len(data))
        sent = asyncio.create_task(sender.send_file(None, path, sha256=known))
        while not isinstance(message := await inbound.recv(), m.End):
            assert isinstance(message, m.Chunk) and len(message.data) <= 512 * 1024
            sink.write(message.data)
        digest = await sent
        for stream in (sender, inbound):
            await stream.aclose()
        server.close()
        return digest, sink, message

    digest, sink, end = await transfer(None)
    assert digest == end.sha256 == good and sink.finish(end.sha256) == good
    digest, sink, end = await transfer(good)
    assert digest == end.sha256 == good and sink.finish(end.sha256) == good
    digest, sink, end = await transfer("0" * 64)  # what the sender believes, the bytes being other
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        sink.finish(end.sha256)
