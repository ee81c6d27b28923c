"""WATCH streams on a live server over real TCP: a few per control connection, a clear Error beyond them, and a
second watch of the same job replaces the first instead of doubling every update."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from conftest import Farm

from protocol import messages as m
from protocol.handshake import client_handshake
from protocol.messages import Role
from protocol.settings import JobRequest
from protocol.stream import MessageStream
from server_addon.core.control import MAX_WATCHES_PER_CONNECTION

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


def _jobs(farm: Farm, count: int) -> list[str]:
    sha = "b" * 64
    farm.server.files.path(sha).write_bytes(b"BLENDER-v405")
    # Queued: never settled, so each watch stays open.
    return [farm.call(lambda s, i=i: s.create_job(f"shot{i}.blend", sha, 12, JobRequest(), start=False)).id
            for i in range(count)]


async def _recv(stream: MessageStream) -> m.Message:
    return await asyncio.wait_for(stream.recv(), TIMEOUT)


def test_watches_are_bounded_per_connection_and_one_per_job(farm: Farm) -> None:
    limit = MAX_WATCHES_PER_CONNECTION
    jobs = _jobs(farm, limit + 1)

    async def main() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", farm.port)
        stream = MessageStream(reader, writer)
        await client_handshake(stream, role=Role.CONTROL, name="watcher", secret=None)
        for job_id in jobs[:limit]:
            await stream.send(m.Watch(job_id=job_id))
            update = await _recv(stream)
            assert isinstance(update, m.JobUpdate) and update.job["id"] == job_id
        # One more job is refused with a sentence; the connection stays open and useful.
        await stream.send(m.Watch(job_id=jobs[limit]))
        refused = await _recv(stream)
        assert isinstance(refused, m.Error), refused
        assert f"at most {limit} jobs" in refused.reason
        await stream.send(m.StatusRequest())
        assert isinstance(await _recv(stream), m.Status)
        # The same job again: a fresh update at once, and that job's old stream is gone.
        await stream.send(m.Watch(job_id=jobs[0]))
        again = await _recv(stream)
        assert isinstance(again, m.JobUpdate) and again.job["id"] == jobs[0]
        # The limit still counts jobs, not watch requests: a replaced watch took no new place.
        await stream.send(m.Watch(job_id=jobs[limit]))
        assert isinstance(await _recv(stream), m.Error)
        # One change: every watched job is sent once, job 0 too (twice if its first watch were still there).
        await stream.send(m.JobControl(action="priority", job_id=jobs[0], args={"priority": 3}))
        seen: Counter[str] = Counter()
        done = False
        while not done or sum(seen.values()) < limit:
            message = await _recv(stream)
            if isinstance(message, m.JobControlDone):
                done = True
            else:
                assert isinstance(message, m.JobUpdate), message
                seen[message.job["id"]] += 1
        with pytest.raises(TimeoutError):  # nothing more for this one change
            extra = await asyncio.wait_for(stream.recv(), 1.0)
            seen[getattr(extra, "job", {}).get("id", "?")] += 1
        assert seen == Counter(jobs[:limit]), seen
        await stream.aclose()

    asyncio.run(main())
