"""Scripted render clients and a status viewer for tests of what a farm server does, in what order.

A ScriptedClient speaks the real protocol over TCP and does nothing by itself beyond staying alive: the
test says when it reports a state, answers a probe, sends a frame or ends a lease, so what the server sends
each client comes in an order that depends on the server alone. It records everything the server sends
except the server's pings (which come on a timer). A Viewer follows the web interface's event stream (what
the page sees) and waits, without sleeping, until the farm shows a given state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from conftest import LOOPBACK, TEST_HEARTBEAT_S

from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.handshake import client_handshake
from protocol.messages import Role
from protocol.stream import MessageStream

#: Every wait for the server has this bound.
WAIT_S = 5.0
#: The Blender the scripted clients claim to run, and the one the test .blend says saved it.
BLENDER = "5.0.1"
BLEND_HEADER = b"BLENDER17-01v0500"


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


PNG = tiny_png()


def write_blend(path: Path, tag: str) -> Path:
    """A file the server takes for a .blend saved by Blender 5.0 (it reads the header only)."""
    path.write_bytes(BLEND_HEADER + tag.encode().ljust(64, b"\0"))
    return path


def scene(frame_end: int) -> dict[str, Any]:
    """What a probing client reports for a tiny scene of frames 1..frame_end."""
    return {"scene": "Scene", "engine": "CYCLES", "frame_start": 1, "frame_end": frame_end, "frame_step": 1,
            "fps": 24.0, "resolution_x": 64, "resolution_y": 36, "percentage": 100, "file_format": "PNG"}


class ScriptedClient:
    """One render client whose every step the test takes."""

    def __init__(self, name: str, stream: MessageStream) -> None:
        self.name = name
        self.stream = stream
        #: What the server sent, in order, as (kind, lease id, job id or frames ...); pings left out.
        self.received: list[tuple[Any, ...]] = []
        self._inbox: asyncio.Queue[m.Message] = asyncio.Queue()
        self._pings = 0
        self._pinged = asyncio.Condition()
        self._lock = asyncio.Lock()  # a heartbeat never interleaves with a frame, nor goes out stale
        self._state: dict[str, Any] | None = None  # what the keepalive repeats; None until the first report
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def join(cls, port: int, name: str, secret: str | None = None) -> ScriptedClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), WAIT_S)
        stream = MessageStream(reader, writer)
        await client_handshake(stream, role=Role.WORKER, name=name, secret=secret, blender=BLENDER, device="CPU",
                               devices=["CPU"], timeout=WAIT_S)
        client = cls(name, stream)
        client._tasks = [asyncio.create_task(client._read()), asyncio.create_task(client._keepalive())]
        return client

    # --- what the server sends ------------------------------------------------------------

    async def _read(self) -> None:
        with contextlib.suppress(ProtocolError, OSError):
            while True:
                message = await self.stream.recv()
                if isinstance(message, m.Heartbeat):
                    async with self._pinged:
                        self._pings += 1
                        self._pinged.notify_all()
                    continue
                self.received.append(record(message))
                self._inbox.put_nowait(message)

    async def next(self) -> m.Message:
        """The next message the server sends this client (pings aside)."""
        try:
            return await asyncio.wait_for(self._inbox.get(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"{self.name}: nothing came from the server; so far {self.received}") from None

    async def expect(self, kind: type[m.Message]) -> Any:
        message = await self.next()
        assert isinstance(message, kind), f"{self.name}: {record(message)} came, not {kind.TYPE.value}"
        return message

    async def quiet(self) -> None:
        """Let two server pings pass: whatever the server sent this client before them has come (one outbox,
        in order), and nothing else may be waiting in the inbox."""
        async with self._pinged:
            target = self._pings + 2
            try:
                await asyncio.wait_for(self._pinged.wait_for(lambda: self._pings >= target), WAIT_S)
            except TimeoutError:
                raise AssertionError(f"{self.name}: the server stopped pinging") from None
        assert self._inbox.empty(), f"{self.name}: unexpected {[record(x) for x in self._drain()]}"

    def _drain(self) -> list[m.Message]:
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    # --- what the client says ---------------------------------------------------------------

    async def _keepalive(self) -> None:
        with contextlib.suppress(ProtocolError, OSError):
            while True:
                await asyncio.sleep(TEST_HEARTBEAT_S)  # a heartbeat's period, not a synchronisation
                async with self._lock:
                    if self._state is not None:
                        await self.stream.send(m.Heartbeat(**self._state))

    async def report(self, state: str, lease: int | None = None, job: str | None = None,
                     frame: int | None = None) -> None:
        """Send a heartbeat now; the keepalive repeats it until the next report."""
        async with self._lock:
            self._state = {"state": state, "lease_id": lease, "job_id": job, "frame": frame, "device": "CPU"}
            await self.stream.send(m.Heartbeat(**self._state))

    async def probe_result(self, probe: m.Probe, frame_end: int) -> None:
        async with self._lock:
            await self.stream.send(m.ProbeResult(lease_id=probe.lease_id, ok=True, scene=scene(frame_end)))

    async def send_frame(self, lease: int, job: str, frame: int) -> None:
        async with self._lock:
            await self.stream.send(m.FrameBegin(lease_id=lease, job_id=job, frame=frame, ext="png", size=len(PNG),
                                                render_s=0.05))
            await self.stream.send(m.Chunk(data=PNG))
            await self.stream.send(m.End(sha256=hashlib.sha256(PNG).hexdigest()))

    async def render(self, assign: m.Assign, frame: int) -> None:
        """As a real client does for each frame of a lease: say which frame it renders, then send it."""
        await self.report("rendering", assign.lease_id, assign.job_id, frame)
        await self.send_frame(assign.lease_id, assign.job_id, frame)

    async def lease_done(self, lease: int) -> None:
        async with self._lock:
            await self.stream.send(m.LeaseDone(lease_id=lease))
            self._state = {"state": "idle", "device": "CPU"}  # repeated by the keepalive, not sent now

    async def fall_silent(self) -> None:
        """The client stops sending anything but keeps its connection open (a frozen machine)."""
        keepalive = self._tasks[1]
        keepalive.cancel()
        await asyncio.gather(keepalive, return_exceptions=True)

    async def drop(self) -> None:
        """The client goes away without a word (its process died)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stream.writer.transport.abort()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stream.aclose()


def record(message: m.Message) -> tuple[Any, ...]:
    """A message as the tests compare it."""
    if isinstance(message, m.Probe):
        return ("probe", message.lease_id, message.job_id)
    if isinstance(message, m.Assign):
        return ("assign", message.lease_id, message.job_id, list(message.frames))
    if isinstance(message, m.Revoke):
        return ("revoke", message.lease_id, list(message.frames))
    if isinstance(message, m.Error):
        return ("error", message.reason)
    return (message.TYPE.value,)


class Viewer:
    """The web interface's event stream, as an open page follows it."""

    def __init__(self, session: aiohttp.ClientSession, response: aiohttp.ClientResponse) -> None:
        self._session = session
        self._response = response
        self.latest: dict[str, Any] | None = None
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> Viewer:
        session = aiohttp.ClientSession()
        response = await session.get(f"http://{LOOPBACK}:{port}/api/events",
                                     timeout=aiohttp.ClientTimeout(total=None, connect=WAIT_S))
        assert response.status == 200
        return cls(session, response)

    async def _read(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
            async for line in self._response.content:
                if line.startswith(b"data: "):
                    snapshot = json.loads(line[len(b"data: "):])
                    async with self._changed:
                        self.latest = snapshot
                        self._changed.notify_all()

    async def until(self, show: Callable[[dict[str, Any]], Any], expected: Any, what: str) -> int:
        """Wait until show(status) is `expected`; returns the status's state version then."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.latest is not None and show(self.latest) == expected), WAIT_S)
            except TimeoutError:
                seen = show(self.latest) if self.latest is not None else None
                raise AssertionError(f"after {what}: the farm shows {seen!r}, not {expected!r}") from None
            assert self.latest is not None
            return int(self.latest["version"])

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._response.close()
        await self._session.close()
