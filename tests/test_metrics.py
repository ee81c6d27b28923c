"""Prometheus metrics of a real headless server (python -m server_addon --metrics-port), scraped while scripted
render clients speaking the real protocol work through a job: read with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from conftest import LOOPBACK, repo_env
from prometheus_client.parser import text_string_to_metric_families
from scripted_farm import WAIT_S, ScriptedClient, write_blend

from protocol import messages as m
from tools.control import Control
from tools.localfarm import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SECRET = "metrics-test-secret"
FRAMES = 6


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    web_port: int
    metrics_port: int


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "server_addon", "--host", LOOPBACK, "--port", "0", "--no-discovery",
           "--output-dir", str(tmp_path / "out"), "--web-port", "0", "--metrics-port", "0"]
    env = {**repo_env(), "MICROFARM_TOKEN": SECRET}  # as the server image is configured
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        ports = [int(re.search(r":(\d+)(/metrics)?\s*$", line).group(1)) for line in lines]  # type: ignore[union-attr]
        assert "metrics on http://127.0.0.1:" in lines[2], lines
        yield Server(proc, *ports)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scraper:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port

    async def get(self, path: str, token: str | None = SECRET) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.get(f"http://{LOOPBACK}:{self.port}{path}", headers=headers) as reply:
            return reply.status, await reply.text()

    async def scrape(self) -> Samples:
        status, text = await self.get("/metrics")
        assert status == 200, text
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def until(self, name: str, labels: dict[str, str], value: float) -> Samples:
        """Scrape until a sample shows `value` (a counter the server bumps just after its reply went out)."""
        key = (name, tuple(sorted(labels.items())))
        async with asyncio.timeout(WAIT_S):
            while (samples := await self.scrape()).get(key) != value:
                await asyncio.sleep(0.05)
        return samples


@pytest_asyncio.fixture
async def scraper(server: Server) -> AsyncIterator[Scraper]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        yield Scraper(session, server.metrics_port)


def frames(samples: Samples, job: str | None = None) -> tuple[float, float, float]:
    """(pending, leased, done) of one job, or of all."""
    if job is None:
        return tuple(samples[(f"microfarm_frames_{n}", ())] for n in ("pending", "leased", "done"))  # type: ignore[return-value]
    return tuple(samples[(f"microfarm_job_frames_{n}", (("job", job),))]  # type: ignore[return-value]
                 for n in ("pending", "leased", "done"))


@pytest.mark.asyncio
async def test_the_secret_guards_the_metrics_on_both_ports(server: Server, scraper: Scraper) -> None:
    web = Scraper(scraper.session, server.web_port)
    for side in (scraper, web):
        assert (await side.get("/metrics", token=None))[0] == 401
        assert (await side.get("/metrics", token="a guess"))[0] == 401
        assert (await side.get("/api/queue", token=None))[0] == 401
        assert await side.get("/healthz", token=None) == (200, "ok\n")  # a probe needs no secret, learns nothing
        status, text = await side.get("/metrics")
        assert status == 200 and "microfarm_frames_pending 0.0" in text


@pytest.mark.asyncio
async def test_metrics_follow_a_job_through_a_failure_and_a_lost_client(server: Server, scraper: Scraper,
                                                                        tmp_path: Path) -> None:
    blend = write_blend(tmp_path / "shot.blend", "metrics")
    control = await Control.connect(f"{LOOPBACK}:{server.port}", SECRET, name="test-control")
    clients: list[ScriptedClient] = []
    try:
        job, _ = await control.submit(blend, {"frame_start": 1, "frame_end": FRAMES, "chunk": 2})
        samples = await scraper.scrape()
        assert samples[("microfarm_jobs", (("state", "probing"),))] == 1
        assert samples[("microfarm_probes_pending", ())] == 1

        a = await ScriptedClient.join(server.port, "A", SECRET)
        clients.append(a)
        await a.report("idle")
        await a.probe_result(await a.expect(m.Probe), FRAMES)
        first = await a.expect(m.Assign)
        samples = await scraper.scrape()
        assert frames(samples, job) == frames(samples) == (FRAMES - 2, 2, 0)
        assert samples[("microfarm_clients", (("blender", "5.0.1"), ("device", "CPU"), ("state", "rendering")))] == 1

        # A fetches the job's file: its bytes are counted.
        await a.stream.send(m.BlendRequest(sha256=hashlib.sha256(blend.read_bytes()).hexdigest()))
        assert isinstance(await a.next(), m.BlendBegin)
        while not isinstance(await a.next(), m.End):
            pass
        await scraper.until("microfarm_job_data_sent_bytes_total", {}, blend.stat().st_size)

        # B takes the next chunk and dies: its lease is lost, its frames wait again.
        b = await ScriptedClient.join(server.port, "B", SECRET)
        clients.append(b)
        await b.report("idle")
        await b.expect(m.Assign)
        assert frames(await scraper.scrape()) == (FRAMES - 4, 4, 0)
        await b.drop()
        samples = await scraper.until("microfarm_leases_lost_total", {}, 1)
        assert samples[("microfarm_clients", (("blender", "5.0.1"), ("device", "CPU"), ("state", "lost")))] == 1
        assert frames(samples) == (FRAMES - 2, 2, 0)

        # A renders its first frame and fails its second.
        await a.render(first, first.frames[0])
        await a.report("rendering", first.lease_id, job, first.frames[1])
        async with a._lock:
            await a.stream.send(m.FrameFailed(lease_id=first.lease_id, job_id=job, frame=first.frames[1],
                                              error="Blender crashed"))
        samples = await scraper.until("microfarm_frame_failures_total", {}, 1)
        assert frames(samples) == (FRAMES - 1, 0, 1)
        await a.lease_done(first.lease_id)

        # A renders the rest; every scrape on the way: pending never rises, done never falls.
        seen = [frames(samples)]
        while seen[-1][2] < FRAMES:
            assign = await a.expect(m.Assign)
            for number in assign.frames:
                await a.render(assign, number)
                seen.append(frames(await scraper.until("microfarm_frames_stored_total", {}, seen[-1][2] + 1)))
            await a.lease_done(assign.lease_id)
        assert [p for p, _, _ in seen] == sorted((p for p, _, _ in seen), reverse=True)
        assert [d for _, _, d in seen] == list(range(1, FRAMES + 1))
        samples = await scraper.until("microfarm_jobs", {"state": "done"}, 1)
        assert frames(samples, job) == (0, 0, FRAMES) and frames(samples) == (0, 0, FRAMES)
        assert samples[("microfarm_frame_render_seconds_count", ())] == FRAMES
        assert samples[("microfarm_frame_render_seconds_bucket", (("le", "0.5"),))] == FRAMES  # 0.05 s each
        assert samples[("microfarm_frame_render_seconds_sum", ())] == pytest.approx(0.05 * FRAMES)
        assert samples[("microfarm_frame_failures_total", ())] == 1
        assert samples[("microfarm_leases_lost_total", ())] == 1
        status, queue = await scraper.get("/api/queue")
        assert status == 200 and '"outstanding": 0' in queue
    finally:
        for client in clients:
            await client.close()
        await control.close()
