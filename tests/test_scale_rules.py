"""What keeps a big farm healthy, on a live server: its own stalls never cost a client its work, and a queue
of thousands of jobs is read page after page."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from conftest import TEST_HEARTBEAT_TIMEOUT_S, Farm
from scripted_farm import BLEND_HEADER, ScriptedClient

from protocol import messages as m
from protocol.limits import MAX_STATUS_JOBS
from protocol.settings import JobRequest
from tools.control import Control

pytestmark = pytest.mark.integration


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
