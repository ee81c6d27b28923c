"""The job database refusing writes on a live server (real SQLite, real TCP): SQLite's own SQLITE_FULL, made real by
capping the server's database at the pages it has (`PRAGMA max_page_count`), pauses the job whose change it refused
with a sentence naming the database and the reason; the client whose message triggered it keeps its connection,
the farm keeps serving, and once the database can grow again the job resumes and finishes, saved."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Farm
from scripted_farm import ScriptedClient, write_blend

from protocol import messages as m
from server_addon.core.database import GuardedStore
from tools.control import Control

pytestmark = pytest.mark.integration

FRAMES = 4


def _cap(farm: Farm, pages: int | None) -> None:
    """Cap the server's own connection at its current size (None: lift the cap)."""
    def cap(service: object) -> None:
        store = service.farm.store  # type: ignore[attr-defined]
        assert isinstance(store, GuardedStore)
        conn = store.database.conn
        limit = conn.execute("PRAGMA page_count").fetchone()[0] if pages is None else pages
        conn.execute(f"PRAGMA max_page_count = {limit}")
    farm.call(cap)


@pytest.mark.asyncio
async def test_a_full_job_database_pauses_the_job_and_cuts_no_one_off(farm: Farm, tmp_path: Path) -> None:
    db_path = farm.server.config.resolved_data_dir / "jobs.sqlite3"
    control = await Control.connect(farm.address, None, name="t")
    client = await ScriptedClient.join(farm.port, "A")
    try:
        blend = write_blend(tmp_path / "shot.blend", "full")
        job, _ = await control.submit(blend, {"frame_start": 1, "frame_end": FRAMES, "chunk": FRAMES})
        await client.report("idle")
        probe = await client.expect(m.Probe)
        await client.probe_result(probe, FRAMES)
        assign = await client.expect(m.Assign)
        await client.render(assign, 1)
        farm.wait_until(lambda s: s.farm.jobs[job].frames_done == 1, 10, "frame 1 stored")

        _cap(farm, None)  # from here on, a write that needs one more page is refused by SQLite: "database is full"
        await client.report("rendering", assign.lease_id, job, 2)
        async with client._lock:  # a failure with a long render log: rows that need new pages
            await client.stream.send(m.FrameFailed(lease_id=assign.lease_id, job_id=job, frame=2,
                                                   error="out of memory", log="x" * 16000))
        revoke = await client.expect(m.Revoke)  # the job paused: its lease taken back, said to the client
        assert revoke.lease_id == assign.lease_id
        state = farm.wait_until(lambda s: s.farm.jobs[job].state.value == "paused" and s.farm.jobs[job].error,
                                10, "the job paused")
        error = farm.call(lambda s: s.farm.jobs[job].error)
        assert str(db_path) in error and "full" in error, error
        assert state
        # Nobody was cut off: the client still gets the server's pings, the tool still gets answers.
        await client.quiet()
        status = await control.status()
        assert [j["state"] for j in status.jobs] == ["paused"]

        _cap(farm, 10**9)  # room again: the artist resumes the job, and it finishes
        await control.job_action("resume", job)
        await client.report("idle")
        again = await client.expect(m.Assign)
        for frame in again.frames:
            await client.render(again, frame)
        await client.lease_done(again.lease_id)
        farm.wait_until(lambda s: s.farm.jobs[job].state.value == "done", 10, "the job done")
        # And saved so (with the next batch of rows, half a second later): a restart would find it done.
        saved = ""
        deadline = time.monotonic() + 10
        while saved != "done" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            with sqlite3.connect(db_path) as db:
                (saved,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job,)).fetchone()
        assert saved == "done"
    finally:
        await client.close()
        await control.close()


@pytest.mark.asyncio
async def test_a_job_submitted_while_the_database_is_full_is_paused_with_the_reason(farm: Farm,
                                                                                     tmp_path: Path) -> None:
    db_path = farm.server.config.resolved_data_dir / "jobs.sqlite3"
    control = await Control.connect(farm.address, None, name="t")
    try:
        _cap(farm, None)
        big = {"frame_start": 1, "frame_end": 2}
        names = [f"shot-{'x' * 200}-{n}.blend" for n in range(40)]  # rows enough to need new pages
        jobs = []
        for n, name in enumerate(names):
            blend = write_blend(tmp_path / name, f"full-{n}")
            jobs.append((await control.submit(blend, big))[0])
        states = {j["id"]: (j["state"], j["error"]) for j in (await control.status()).jobs}
        paused = [job for job in jobs if states[job][0] == "paused"]
        assert paused, states  # the database filled up on the way, and the tool was answered every time
        assert all(str(db_path) in states[job][1] and "full" in states[job][1] for job in paused)
        await control.job_action("delete", paused[-1])  # a deletion it cannot write is no crash either
        _cap(farm, 10**9)
        await control.job_action("resume", paused[0])
        assert (await control.status()).jobs
    finally:
        await control.close()
