"""python -m tools.bench keda: a job's makespan with clients scaled as KEDA would, against a fixed pool.

The server runs as its own process with its metrics port (python -m server_addon --metrics-port 0). Twice, on a
fresh server each time, one job of `--frames` frames is rendered by simulated clients (tools.bench_scale.SimClient:
the real protocol, each frame taking `--delay` seconds):

- elastic: a controller reads /metrics every `--interval` seconds (KEDA's pollingInterval) as KEDA's Prometheus
  trigger would, asks for ceil(outstanding / --per-client) clients (outstanding: frames pending and leased, and
  probes waiting), at most `--cap`; new clients connect after `--startup` seconds (a pod starting), and when fewer
  are wanted, idle ones leave;
- fixed: a pool of the elastic run's peak size, connected before the job is submitted.

Every frame must land exactly once (frames stored, no duplicate, no failure: read from /metrics). The last line
printed is one JSON object: each run's makespan (submission to the last frame), the clients' busy-or-idle
client-seconds (what a cluster bills), and the peak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .bench_scale import BLEND_HEADER, LOOPBACK, SERVER_START_TIMEOUT_S, SimClient, Tally
from .control import Control, ToolError
from .localfarm import REPO, repo_env


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of /metrics (the farm's totals), by name."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def outstanding(samples: dict[str, float]) -> float:
    """What the Prometheus trigger's query adds up (deploy/kubernetes/components/keda-prometheus)."""
    return sum(samples[f"microfarm_{name}"] for name in ("frames_pending", "frames_leased", "probes_pending"))


class Pool:
    """The simulated clients of one run, and the client-seconds they were up."""

    def __init__(self, port: int, delay: float, frame_end: dict[str, int]) -> None:
        self.port, self.delay, self.frame_end = port, delay, frame_end
        self.tally = Tally()
        self.clients: dict[SimClient, asyncio.Task[None]] = {}
        self.started: dict[SimClient, float] = {}
        self.client_s = 0.0
        self.peak = 0
        self._names = 0

    def add(self) -> None:
        self._names += 1
        client = SimClient(f"sim{self._names:04d}", self.port, self.delay, self.tally, self.frame_end)
        self.clients[client] = asyncio.create_task(client.run())
        self.started[client] = time.monotonic()
        self.peak = max(self.peak, len(self.clients))

    async def remove(self, client: SimClient) -> None:
        task = self.clients.pop(client)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.client_s += time.monotonic() - self.started.pop(client)

    def idle(self) -> list[SimClient]:
        return [c for c in self.clients if c.state.get("state") == "idle" and c.work.empty()]

    async def close(self) -> None:
        for client in list(self.clients):
            await self.remove(client)


async def _server(root: Path) -> tuple[subprocess.Popen[str], int, int]:
    root.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "server_addon", "--host", LOOPBACK, "--port", "0", "--no-discovery",
         "--metrics-port", "0", "--output-dir", str(root / "out")], cwd=REPO, env=repo_env(),
        stdout=subprocess.PIPE, stderr=open(root / "server.log", "wb"), text=True)  # noqa: SIM115 - closed with it
    assert server.stdout is not None
    lines = [await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), SERVER_START_TIMEOUT_S)
             for _ in range(2)]
    ports = [re.search(r":(\d+)(/metrics)?\s*$", line) for line in lines]
    if not all(ports) or "metrics on" not in lines[1]:
        server.kill()
        raise ToolError(f"the server did not start: {(root / 'server.log').read_text()[-2000:]}")
    return server, int(ports[0].group(1)), int(ports[1].group(1))  # type: ignore[union-attr]


async def _run(args: argparse.Namespace, root: Path, fixed: int | None) -> dict[str, Any]:
    server, port, metrics_port = await _server(root)
    frame_end: dict[str, int] = {}
    pool = Pool(port, args.delay, frame_end)
    control = await Control.connect(f"{LOOPBACK}:{port}", None)
    try:
        if fixed is not None:
            for _ in range(fixed):
                pool.add()
            async with asyncio.timeout(60):
                while sum(1 for c in (await control.status()).clients if c["state"] == "idle") < fixed:
                    await asyncio.sleep(0.2)
        blend = root / "shot.blend"
        blend.write_bytes(BLEND_HEADER + b"keda".ljust(64, b"\0"))
        started = time.monotonic()
        job_id, _ = await control.submit(blend, {"frame_start": 1, "frame_end": args.frames, "chunk": args.chunk,
                                                 "file_format": "PNG"})
        frame_end[job_id] = args.frames
        pending_starts: list[asyncio.Task[None]] = []
        next_poll = started
        while True:
            samples = await asyncio.to_thread(scrape, metrics_port)
            if samples["microfarm_frames_done"] >= args.frames:
                break
            if time.monotonic() - started > args.timeout:
                raise ToolError(f"the job did not finish within {args.timeout:.0f} s")
            if fixed is None and time.monotonic() >= next_poll:
                next_poll += args.interval
                wanted = min(args.cap, math.ceil(outstanding(samples) / args.per_client))
                coming = len(pool.clients) + sum(1 for t in pending_starts if not t.done())
                for _ in range(wanted - coming):
                    pending_starts.append(asyncio.create_task(_start_later(pool, args.startup)))
                for client in pool.idle()[:max(0, len(pool.clients) - wanted)]:
                    await pool.remove(client)
            await asyncio.sleep(0.1)
        makespan = time.monotonic() - started
        for task in pending_starts:
            task.cancel()
        await pool.close()
        samples = await asyncio.to_thread(scrape, metrics_port)
        files = len(list((root / "out" / job_id).glob("frame_*.png")))
        exactly_once = (samples["microfarm_frames_stored_total"] == args.frames == files
                        and samples["microfarm_duplicate_frames_total"] == 0
                        and samples["microfarm_frame_failures_total"] == 0)
        return {"makespan_s": round(makespan, 2), "client_s": round(pool.client_s, 1), "peak_clients": pool.peak,
                "exactly_once": exactly_once, "leases_lost": samples["microfarm_leases_lost_total"],
                "errors": pool.tally.errors[:3]}
    finally:
        await pool.close()
        await control.close()
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
        if server.poll() is None:
            server.kill()


async def _start_later(pool: Pool, startup: float) -> None:
    await asyncio.sleep(startup)
    pool.add()


def keda(args: argparse.Namespace) -> dict[str, Any]:
    if min(args.frames, args.chunk, args.per_client, args.cap) < 1 or args.interval <= 0:
        raise ToolError("--frames, --chunk, --per-client and --cap must be at least 1, --interval more than 0")
    with tempfile.TemporaryDirectory(prefix="microfarm-keda-") as scratch:
        elastic = asyncio.run(_run(args, Path(scratch) / "elastic", None))
        fixed = asyncio.run(_run(args, Path(scratch) / "fixed", elastic["peak_clients"]))
    return {"frames": args.frames, "chunk": args.chunk, "delay_s": args.delay, "per_client": args.per_client,
            "cap": args.cap, "interval_s": args.interval, "startup_s": args.startup, "elastic": elastic,
            "fixed": fixed, "makespan_ratio": round(elastic["makespan_s"] / max(fixed["makespan_s"], 1e-9), 2),
            "client_s_ratio": round(elastic["client_s"] / max(fixed["client_s"], 1e-9), 2)}


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("keda", help="makespan with clients scaled from /metrics as KEDA would, against a "
                                        "fixed pool of the same peak size")
    bench.add_argument("--frames", type=int, default=240, help="frames of the job (default: 240)")
    bench.add_argument("--chunk", type=int, default=2, help="frames per lease (default: 2)")
    bench.add_argument("--delay", type=float, default=0.5, help="seconds each simulated frame takes (default: 0.5)")
    bench.add_argument("--per-client", type=int, default=8,
                       help="the trigger's threshold: outstanding frames per client (default: 8)")
    bench.add_argument("--cap", type=int, default=16, help="the most clients (maxReplicaCount; default: 16)")
    bench.add_argument("--interval", type=float, default=15.0,
                       help="seconds between two looks at /metrics (KEDA's pollingInterval; default: 15)")
    bench.add_argument("--startup", type=float, default=3.0,
                       help="seconds from a client being asked for to its connecting (a pod starting; default: 3)")
    bench.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default: 600)")
