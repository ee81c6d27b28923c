"""Slots that strangers cannot hold: silent connections, a full farm, half-sent web requests and a server out of
file descriptors never keep a tool or a render client out, never pause a job, and never flood the log.

Real servers on 127.0.0.1 (in this process, or `python -m server_addon` as a process with a lowered open-files
limit), real TCP; the attackers bind 127.0.0.2-9 (loopback is a /8 on Linux) to be "a few addresses"; the render
clients are scripted (tests/scripted_farm.py) and speak the real protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LOOPBACK, Farm, repo_env
from scripted_farm import ScriptedClient, write_blend

from client.cache import BlendCache
from client.link import Link, fixed_target
from protocol import messages as m
from protocol.errors import ProtocolError
from tools.control import Control
from tools.localfarm import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

WAIT_S = 20.0
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 10)]
#: Half-sent web requests against a server limited to 1024 open files (1050 stopped the farm before).
HALF_SENT = 1050


def job_state(status: m.Status, job_id: str) -> str:
    return next(job["state"] for job in status.jobs if job["id"] == job_id)


async def render_job(port: int, control: Control, blend: Path, frames: int, name: str = "R") -> str:
    """Submit a job of `frames` frames and render it with one scripted client; returns the job id once done.
    Every state the job shows between two steps is checked: it never pauses."""
    job_id, _ = await control.submit(blend, {"frame_start": 1, "frame_end": frames, "chunk": 2})
    client = await ScriptedClient.join(port, name)
    try:
        await client.report("idle")
        probe = await client.expect(m.Probe)
        await client.probe_result(probe, frames)
        while True:
            message = await client.next()
            if isinstance(message, m.Assign):
                for frame in message.frames:
                    await client.render(message, frame)
                    state = job_state(await control.status(), job_id)
                    assert state in ("rendering", "done"), f"the job went {state}"
                await client.lease_done(message.lease_id)
            if job_state(await control.status(), job_id) == "done":
                return job_id
    finally:
        await client.close()


async def tool_status(address: str) -> dict[str, Any]:
    """The real status tool, as a process."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tools.status", "--server", address, "--json",
                                                cwd=REPO, env=repo_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


class SilentFlood:
    """`count` connections from a few addresses that say nothing, and connect again whenever one is closed."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.attempts = 0
        self._up = 0
        self.all_up = asyncio.Event()
        self._count = count
        self._tasks = [asyncio.create_task(self._one(ATTACKERS[i % len(ATTACKERS)])) for i in range(count)]

    async def _one(self, source: str) -> None:
        first = True
        while True:
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, self.port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.attempts += 1
            if first:
                first = False
                self._up += 1
                if self._up >= self._count:
                    self.all_up.set()
            try:
                while await reader.read(4096):
                    pass
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(0.1)  # (the attacker's pace, not a synchronisation)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.mark.asyncio
async def test_silent_reconnecting_connections_keep_neither_a_tool_nor_a_client_out(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="server_addon")
    interval = 2.0
    farm = Farm(tmp_path / "out", refusal_log_interval=interval)
    flood: SilentFlood | None = None
    try:
        started = time.monotonic()
        flood = SilentFlood(farm.port, 70)
        await asyncio.wait_for(flood.all_up.wait(), WAIT_S)
        # 70 silent connections from 8 addresses: all 64 handshake slots are taken (8 from each address) and
        # the rest wait for their address's turn.
        status = await tool_status(farm.address)
        assert status["jobs"] == []
        control = await asyncio.wait_for(Control.connect(farm.address, None, name="test-control"), WAIT_S)
        try:
            job_id = await asyncio.wait_for(render_job(farm.port, control, write_blend(tmp_path / "a.blend", "a"), 4),
                                            WAIT_S)
            assert job_state(await control.status(), job_id) == "done"
        finally:
            await control.close()
        assert sorted(p.name for p in (tmp_path / "out" / job_id).glob("*.png")) == [
            f"frame_{n:04d}.png" for n in range(1, 5)]
        refused = farm.call(lambda s: s.stats.connections_refused)
        attempts = flood.attempts
    finally:
        if flood is not None:
            await flood.stop()
        farm.stop()
    elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records
             if r.name == "server_addon.core.listener" and r.levelno >= logging.WARNING]
    # Each newcomer made an attacker give way (the tool, the control connection, the render client): the
    # attackers were refused and came back, again and again.
    assert refused >= 3 and attempts >= 70
    assert any("gave way" in line for line in caplog.messages)
    # One line for the first of each (address, reason) per interval and one count line at its end, at most.
    reasons = {re.sub(r".*: ", "", line) for line in lines}
    bound = 2 * len(ATTACKERS) * len(reasons) * (int(elapsed / interval) + 2)
    assert len(lines) <= bound, lines
    assert all("127.0.0.1" not in line for line in lines), lines  # no newcomer was refused


@pytest.mark.asyncio
async def test_a_full_farm_lets_tools_in_and_tells_a_refused_client_why(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    clients: list[ScriptedClient] = []
    link: Link | None = None
    async with server_process(tmp_path / "out", 4096, "--max-connections", "2") as server:
        try:
            clients = [await ScriptedClient.join(server.port, name) for name in ("A", "B")]
            with pytest.raises(ProtocolError, match="the farm is full: 2 render clients are connected"):
                await ScriptedClient.join(server.port, "C")
            # The operator is not locked out of a full farm.
            assert sorted(c["name"] for c in (await tool_status(server.address))["clients"]) == ["A", "B"]
            # A real client's link is refused too, hears why, and keeps trying with a growing delay...
            link = Link(fixed_target(LOOPBACK, server.port), name="D", secret=None,
                        cache=BlendCache(tmp_path / "cache"))
            link.start()
            await asyncio.wait_for(until_logged(caplog, "retrying in 1.0 s"), WAIT_S)
            assert not link.connected.is_set()
            # ... until a place is free.
            await clients.pop().close()
            assert await asyncio.to_thread(link.connected.wait, WAIT_S), "the client never got in"
        finally:
            if link is not None:
                link.stop()
            for client in clients:
                await client.close()
    tries = [line for line in messages(caplog, "client.connection") if "the farm is full" in line]
    assert tries and all("no session with" in line for line in tries)
    # The server said it once, then counted.
    assert len([line for line in server.log if "the farm is full" in line]) <= 2, server.log


async def until_logged(caplog, text: str) -> None:
    while not any(text in line for line in messages(caplog)):
        await asyncio.sleep(0.05)


def messages(caplog, logger: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger)]


# --- a server process with few file descriptors --------------------------------------------------------------------


class ServerProcess:
    """`python -m server_addon` with its open-files limit set to `nofile`; its log read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.web_port = 0
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, out: Path, nofile: int, *args: str) -> ServerProcess:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server_addon", "--host", LOOPBACK, "--port", "0", "--output-dir", str(out),
            "--no-discovery", *args, cwd=REPO, env=repo_env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=limit)
        server = cls(proc)
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT_S):
            while not server.port or ("--web-port" in args and not server.web_port):
                line = (await proc.stdout.readline()).decode()
                assert line, "the server ended before it listened"
                if found := re.search(r"listening on [\d.]+:(\d+)", line):
                    server.port = int(found[1])
                if found := re.search(r"web interface on http://[\d.]+:(\d+)", line):
                    server.web_port = int(found[1])
        server._reader = asyncio.create_task(server._read())
        return server

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def set_limit(self, soft: int) -> None:
        hard = resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))

    async def until_logged(self, text: str) -> None:
        try:
            async with asyncio.timeout(WAIT_S):
                while not any(text in line for line in self.log):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"the server never logged {text!r}: {self.log[-30:]}") from None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def server_process(out: Path, nofile: int, *args: str) -> AsyncIterator[ServerProcess]:
    server = await ServerProcess.start(out, nofile, *args)
    try:
        yield server
    finally:
        await server.stop()


class HalfSentRequests:
    """`count` web requests that stop halfway (headers, or a body) and start again when the server closes them."""

    HEAD = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Wait: "
    BODY = (b"POST /api/jobs/clear_completed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"a\": ")

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.attempts = 0
        self.closed_by_server = 0
        self._tasks = [asyncio.create_task(self._one(ATTACKERS[i % len(ATTACKERS)], i % 4 == 0))
                       for i in range(count)]

    async def _one(self, source: str, body: bool) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, self.port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self.attempts += 1
            try:
                writer.write(self.BODY if body else self.HEAD)
                while True:  # a byte now and then: never the end of the headers or of the body
                    try:
                        if not await asyncio.wait_for(reader.read(4096), 1.0):
                            break
                    except TimeoutError:
                        writer.write(b"1")
                self.closed_by_server += 1
            except OSError:
                self.closed_by_server += 1
            finally:
                writer.close()
            await asyncio.sleep(1.0)  # (the attacker's pace)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.mark.asyncio
async def test_half_sent_web_requests_under_a_low_open_files_limit_never_stop_the_farm(tmp_path: Path) -> None:
    async with server_process(tmp_path / "out", 1024, "--web-port", "0") as server:
        attack = HalfSentRequests(server.web_port, HALF_SENT)
        try:
            async with asyncio.timeout(WAIT_S):
                while attack.attempts < HALF_SENT:
                    await asyncio.sleep(0.05)
            control = await asyncio.wait_for(Control.connect(server.address, None), WAIT_S)
            try:
                job_id = await asyncio.wait_for(render_job(server.port, control,
                                                           write_blend(tmp_path / "w.blend", "w"), 6), WAIT_S)
            finally:
                await control.close()
            # The web itself still answers a newcomer: a connection still waiting for its headers gives way.
            reader, writer = await asyncio.open_connection(LOOPBACK, server.web_port)
            writer.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), WAIT_S)
            writer.close()
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            assert server.open_files() < 1024
        finally:
            await attack.stop()
        assert (await tool_status(server.address))["jobs"][0]["state"] == "done"
    assert attack.attempts >= HALF_SENT  # (the web holds 256 of them at a time: the others gave way and came back)
    log = server.log
    assert not [line for line in log if "paused" in line or "Too many open files" in line], log[-20:]
    # Counted lines, not one per refused or closed connection.
    web_lines = [line for line in log if "server_addon.web" in line]
    assert len(web_lines) < 200 and len(web_lines) < attack.attempts / 5, (len(web_lines), attack.attempts)
    assert job_id


@pytest.mark.asyncio
async def test_out_of_file_descriptors_drops_one_upload_and_recovers(tmp_path: Path) -> None:
    """The server's open-files limit is lowered to what it has open while a frame arrives and clients knock:
    the frame is dropped and rendered again (the job never pauses), accept() failures are counted, and both
    the upload and the port work again once descriptors are free."""
    async with server_process(tmp_path / "out", 1024) as server:
        control = await asyncio.wait_for(Control.connect(server.address, None), WAIT_S)
        client = await ScriptedClient.join(server.port, "R")
        knocking: list[asyncio.Task[Any]] = []
        try:
            job_id, _ = await control.submit(write_blend(tmp_path / "f.blend", "f"),
                                             {"frame_start": 1, "frame_end": 2, "chunk": 2})
            await client.report("idle")
            await client.probe_result(await client.expect(m.Probe), 2)
            lease = await client.expect(m.Assign)
            assert lease.frames == [1, 2]
            await client.render(lease, 1)
            await server.until_logged("frame 1 stored")
            server.set_limit(server.open_files())
            await client.render(lease, 2)
            await server.until_logged("a frame upload was dropped")
            knock = functools.partial(asyncio.open_connection, LOOPBACK, server.port, local_addr=(ATTACKERS[0], 0))
            knocking = [asyncio.create_task(knock()) for _ in range(10)]
            await server.until_logged("cannot accept connections")
            await asyncio.sleep(1.0)  # a while out of descriptors: the port retries accept() four times a second
            assert job_state(await control.status(), job_id) == "rendering"
            server.set_limit(1024)
            await client.lease_done(lease.lease_id)
            again = await client.expect(m.Assign)
            assert again.frames == [2]
            await client.render(again, 2)
            await client.expect(m.Revoke)
            assert job_state(await control.status(), job_id) == "done"
            # The port took the connections that waited, and takes new ones.
            other = await ScriptedClient.join(server.port, "S")
            await other.close()
        finally:
            for task in knocking:
                task.cancel()
            for result in await asyncio.gather(*knocking, return_exceptions=True):
                if isinstance(result, tuple):
                    result[1].close()
            await client.close()
            await control.close()
    log = server.log
    assert not [line for line in log if "paused" in line], log
    assert len([line for line in log if "accept" in line]) <= 3, log
    assert sorted(p.name for p in (tmp_path / "out" / job_id).glob("*.png")) == ["frame_0001.png", "frame_0002.png"]


async def busy(web: Any) -> int:
    return web.slots.busy_count


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, within: float) -> float:
    """Dribble a byte a tenth of a second until the server closes the connection; returns how long it took."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    if not await asyncio.wait_for(reader.read(4096), 0.1):
                        break
                except TimeoutError:
                    writer.write(b"1")
    except OSError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


@pytest.mark.asyncio
async def test_the_web_closes_slow_headers_and_stalled_bodies_and_makes_room_for_newcomers(tmp_path: Path,
                                                                                           caplog) -> None:
    from web_support import start_web_on, stop_web

    caplog.set_level(logging.INFO, logger="server_addon")
    farm = Farm(tmp_path / "out", web_header_timeout=1.0, web_body_timeout=1.0, web_max_connections=4)
    web = start_web_on(farm)
    try:
        async def connect(data: bytes, source: str = ATTACKERS[0]) -> tuple[asyncio.StreamReader,
                                                                            asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection(LOOPBACK, web.port, local_addr=(source, 0))
            writer.write(data)
            return reader, writer

        async def get_status() -> bytes:
            reader, writer = await connect(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                                           LOOPBACK)
            try:
                return await asyncio.wait_for(reader.read(), WAIT_S)
            finally:
                writer.close()

        # An open page's event stream outlives both timeouts: it is an answer being sent, not a slow request.
        events_reader, events_writer = await connect(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                                     LOOPBACK)
        # Headers that never end, and a body that stalls after its first bytes (a byte now and then does not
        # count for the headers; for a body, a second of silence ends it).
        head = await connect(HalfSentRequests.HEAD)
        elapsed = await closed_by_server(*head, within=WAIT_S)
        assert 1.0 <= elapsed < 4.0
        reader, writer = await connect(HalfSentRequests.BODY)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()
        assert 1.0 <= time.monotonic() - started < 4.0
        assert b"data: " in await asyncio.wait_for(events_reader.readuntil(b"data: "), WAIT_S)
        assert not events_reader.at_eof()

        # All four connections taken: by three waiting for their headers (and the stream), a newcomer still
        # gets its answer, and one of those gives way.
        waiting = [await connect(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(3)]
        assert (await get_status()).startswith(b"HTTP/1.1 200")
        # Taken by requests whose bodies still come, the newcomer is told to come back later.
        for _, writer in waiting:
            writer.close()
        bodies = [await connect(HalfSentRequests.BODY) for _ in range(3)]
        async with asyncio.timeout(WAIT_S):  # until the server has read their headers: busy, not waiting
            while await asyncio.to_thread(farm.thread.submit, busy(web), 5) < 4:
                await asyncio.sleep(0.02)
        for _, writer in bodies:
            writer.write(b"1")
        assert (await get_status()).startswith(b"HTTP/1.1 503")
        for _, writer in bodies:
            writer.close()
        events_writer.close()
    finally:
        stop_web(farm, web)
        farm.stop()
    web_lines = [r.getMessage() for r in caplog.records if r.name == "server_addon.web.slots"]
    assert any("request headers not complete within 1 s" in line for line in web_lines), web_lines
    assert any("request body stalled for 1 s" in line for line in web_lines), web_lines
    assert any("gave way to a newer connection" in line for line in web_lines), web_lines
    assert any("connections are busy" in line for line in web_lines), web_lines


@pytest.mark.asyncio
async def test_one_address_cannot_fill_the_port_with_connections_waiting_for_its_turn(tmp_path: Path) -> None:
    """Silent connections from one address beyond four times its handshake share are refused at once: with the
    port's room (here 8 clients + 64 tools + 64 handshakes) it could otherwise keep everyone else out."""
    farm = Farm(tmp_path / "out", max_connections=8)
    flood = SilentFlood(farm.port, 0)
    try:
        flood._tasks = [asyncio.create_task(flood._one("127.0.0.2")) for _ in range(150)]
        await asyncio.sleep(1.0)  # (the attacker's connections made and refused, again and again)
        for _ in range(5):
            control = await asyncio.wait_for(Control.connect(farm.address, None, name="test-control"), WAIT_S)
            await control.close()
        waiting = farm.call(lambda s: s.stats.connections_refused)
    finally:
        await flood.stop()
        farm.stop()
    assert waiting > 0 and flood.attempts > 150, "the attacker's extra connections were refused and came back"


@pytest.mark.asyncio
async def test_a_farm_behind_one_address_gets_every_client_in(tmp_path: Path) -> None:
    """Clients behind one address (a NAT, a benchmark's host) past its waiting bound are refused for a moment and
    come back: every one of them gets in, the bound counts handshakes, not sessions."""
    from scripted_farm import ScriptedClient

    farm = Farm(tmp_path / "out")
    clients: list = []
    try:
        async def join(i: int) -> None:
            while True:
                try:
                    clients.append(await ScriptedClient.join(farm.port, f"nat{i}"))
                    return
                except (OSError, ProtocolError, AssertionError, TimeoutError):
                    await asyncio.sleep(0.2)
        await asyncio.wait_for(asyncio.gather(*(join(i) for i in range(60))), 60)
        for client in clients:
            await client.report("idle")
        farm.wait_until(lambda s: sum(c.connected for c in s.farm.clients.values()) == 60, what="60 clients")
    finally:
        for client in clients:
            await client.close()
        farm.stop()
