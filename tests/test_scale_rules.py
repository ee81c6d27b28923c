"""What keeps a big farm healthy, on a live server: its own stalls never cost a client its work, a queue of
thousands of jobs is read page after page, and hundreds of clients get in at once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
import time
from pathlib import Path

import pytest
from conftest import TEST_HEARTBEAT_TIMEOUT_S, Farm
from scripted_farm import BLEND_HEADER, ScriptedClient

from protocol import messages as m
from protocol.limits import HEARTBEAT_TIMEOUT_S, MAX_STATUS_JOBS
from protocol.settings import JobRequest
from tools.bench_scale import SimClient, Tally
from tools.control import Control, ToolError
from tools.localfarm import start_server

pytestmark = pytest.mark.integration

CLIENTS = 600


def test_a_stalled_server_drops_no_client(farm: Farm) -> None:
    async def scenario() -> list[dict]:
        clients = [await ScriptedClient.join(farm.port, f"steady{i}") for i in range(3)]
        try:
            for client in clients:
                await client.report("idle")
            farm.wait_until(lambda s: sum(c.connected and c.ready for c in s.farm.clients.values()) == 3,
                            what="three ready clients")
            # The server's loop itself holds still for longer than a client may be silent, and what the clients
            # would have said meanwhile is not there for it to read when it wakes (as when its machine was
            # held up with them): they speak again only after.
            for client in clients:
                await client.fall_silent()
            await asyncio.to_thread(farm.call, lambda s: time.sleep(TEST_HEARTBEAT_TIMEOUT_S + 1.5))
            await asyncio.sleep(TEST_HEARTBEAT_TIMEOUT_S / 4)
            for client in clients:
                await client.report("idle")
            await asyncio.sleep(TEST_HEARTBEAT_TIMEOUT_S / 2)  # the watchdog's rounds after the stall
            return farm.call(lambda s: s.snapshot())["clients"]
        finally:
            for client in clients:
                await client.close()
    clients = asyncio.run(scenario())
    assert sorted((c["name"], c["state"]) for c in clients) == [(f"steady{i}", "idle") for i in range(3)]


def test_a_long_queue_comes_in_pages(farm: Farm) -> None:
    count = 2 * MAX_STATUS_JOBS + 500
    blend = BLEND_HEADER + b"\0" * 64
    sha = hashlib.sha256(blend).hexdigest()

    def fill(service) -> None:  # type: ignore[no-untyped-def]
        service.files.path(sha).write_bytes(blend)
        for number in range(count):
            service.create_job(f"shot{number:05d}.blend", sha, len(blend), JobRequest(), start=False,
                               priority=number % 7)
    farm.thread.call(fill, timeout=120)

    async def read() -> tuple[m.Status, m.Status]:
        control = await Control.connect(farm.address, None)
        try:
            return await control.status(all_jobs=False), await control.status()
        finally:
            await control.close()
    first, everything = asyncio.run(read())
    assert len(first.jobs) == MAX_STATUS_JOBS and first.jobs_total == count
    assert len(everything.jobs) == count and len({j["id"] for j in everything.jobs}) == count
    expected = farm.call(lambda s: [j["id"] for j in s.snapshot()["jobs"]])
    assert [j["id"] for j in everything.jobs] == expected, "the pages together in the order of one status"


def test_pages_are_cut_to_what_one_message_carries(farm: Farm) -> None:
    """Jobs that show long failures do not fit a thousand to a message: a page holds what fits, the tool reads on."""
    from protocol.settings import SceneInfo, resolve
    from server_addon.core.jobs import FrameRecord

    blend = BLEND_HEADER + b"\0" * 64
    sha = hashlib.sha256(blend).hexdigest()
    scene = SceneInfo(scene="s", engine="CYCLES", frame_start=1, frame_end=3, frame_step=1, fps=24.0,
                      resolution_x=64, resolution_y=36, percentage=100, file_format="PNG")

    def fill(service) -> None:  # type: ignore[no-untyped-def]
        service.files.path(sha).write_bytes(blend)
        for number in range(60):
            job = service.create_job(f"shot{number:02d}.blend", sha, len(blend), JobRequest(), start=False)
            job.settings = resolve(JobRequest(), scene)
            job.frames = {n: FrameRecord(n, failures=1, error="x" * 16_000, failed_on={"a"}) for n in (1, 2, 3)}
    farm.thread.call(fill, timeout=60)

    async def read() -> tuple[m.Status, m.Status]:
        control = await Control.connect(farm.address, None)
        try:
            return await control.status(all_jobs=False), await control.status()
        finally:
            await control.close()
    first, everything = asyncio.run(read())
    assert 0 < len(first.jobs) < 60 and first.jobs_total == 60
    assert sorted(j["id"] for j in everything.jobs) == sorted(farm.call(lambda s: list(s.farm.jobs)))


def test_six_hundred_clients_get_in_and_stay(tmp_path: Path) -> None:
    """600 render clients (simulated, speaking the real protocol: tools.bench_scale) join a server process at once
    from one address, each retrying when told the handshake slots are taken, as real clients do; every one gets in
    and stays, and a tool still gets its answer meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * CLIENTS + 200  # this process holds the clients' ends; the server raises its own soft limit
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this machine allows {hard} open files a process; {needed} are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    server, port = start_server(tmp_path / "out", tmp_path / "server.log", extra=("--no-discovery",))

    async def scenario() -> tuple[int, int, int, int]:
        tally = Tally()
        go = asyncio.Event()
        go.set()
        clients = [SimClient(f"sim{i:04d}", port, 0.0, tally, {}, go) for i in range(CLIENTS)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        control = None
        try:
            deadline = time.monotonic() + 120
            idle: set[str] = set()
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                if control is None:
                    with contextlib.suppress(ToolError):  # (a tool too may find the handshake slots taken)
                        control = await Control.connect(f"127.0.0.1:{port}", None, name="t")
                    continue
                status = await control.status()
                idle = {c["id"] for c in status.clients if c["state"] == "idle"}
                if len(idle) == CLIENTS:
                    break
            assert control is not None
            reconnects = tally.reconnects
            await asyncio.sleep(HEARTBEAT_TIMEOUT_S + 2)  # and they stay: no heartbeat missed, nobody dropped
            status = await control.status()
            stayed = {c["id"] for c in status.clients if c["state"] == "idle"} & idle  # the same connections
            lost = sum(1 for c in status.clients if c["state"] == "lost")
            await control.close()
            return len(idle), len(stayed), lost, tally.reconnects - reconnects
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        idle, stayed, lost, reconnects = asyncio.run(scenario())
    finally:
        server.terminate()
        server.wait(timeout=30)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (idle, stayed, lost, reconnects) == (CLIENTS, CLIENTS, 0, 0)
