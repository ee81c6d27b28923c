"""python -m tools.bench scale: the server's own cost per frame with many clients, many frames, many jobs.

The server runs as its own process (python -m server_addon, as on a farm); the render clients are simulated in
this process: each speaks the real protocol over TCP on 127.0.0.1 (handshake, heartbeats, probe answers, frames
as FRAME_BEGIN/CHUNK/END of a tiny PNG, lease ends) and renders each frame in `--delay` seconds (0: at once). The
server's CPU time is read from /proc before the first job and after the last, so what this process spends
simulating clients is not counted. Before the server starts, the CPU cost of storing one small file on the same
filesystem the way a frame is stored is measured too (file_floor_cpu_ms): the part of each frame no server design
avoids. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.handshake import client_handshake
from protocol.limits import HEARTBEAT_INTERVAL_S
from protocol.messages import Role
from protocol.stream import MessageStream

from .control import Control, ToolError
from .localfarm import REPO, repo_env

BLENDER = "5.0.1"
#: A file the server takes for a .blend saved by Blender 5.0 (it reads its header only; no client opens it).
BLEND_HEADER = b"BLENDER17-01v0500"
LOOPBACK = "127.0.0.1"
SERVER_START_TIMEOUT_S = 30.0


def _png() -> bytes:
    """An 8x8 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\x80" * 8 for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PNG = _png()
PNG_SHA = hashlib.sha256(PNG).hexdigest()


class Tally:
    def __init__(self) -> None:
        self.frames_sent = 0
        self.reconnects = 0
        self.errors: list[str] = []


class SimClient:
    """One simulated render client: does what a real one does, but renders in `delay` seconds."""

    def __init__(self, name: str, port: int, delay: float, tally: Tally, frame_end: dict[str, int],
                 go: asyncio.Event) -> None:
        self.name, self.port, self.delay, self.tally, self.frame_end = name, port, delay, tally, frame_end
        self.go = go  # work is held until it is set (--queued: every job is in the queue first)
        self.stream: MessageStream | None = None
        self.revoked: set[int] = set()  # whole leases
        self.revoked_frames: set[tuple[int, int]] = set()
        self.state: dict[str, Any] = {"state": "idle", "device": "CPU"}
        self.work: asyncio.Queue[m.Message] = asyncio.Queue()

    async def run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
                self.stream = MessageStream(reader, writer)
                await client_handshake(self.stream, role=Role.WORKER, name=self.name, secret=None, blender=BLENDER,
                                       device="CPU", devices=["CPU"], timeout=30.0)
                await self._session()
            except (ProtocolError, OSError, TimeoutError) as exc:
                if self.stream is not None:
                    self.tally.reconnects += 1
                    if len(self.tally.errors) < 20:
                        self.tally.errors.append(f"{self.name}: {exc}")
                await asyncio.sleep(0.5 + random.random())

    async def _session(self) -> None:
        assert self.stream is not None
        self.state = {"state": "idle", "device": "CPU"}
        self.revoked.clear()
        self.revoked_frames.clear()
        tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._worker())]
        try:
            while True:
                message = await self.stream.recv()
                if isinstance(message, m.Revoke):
                    if message.frames:
                        self.revoked_frames.update((message.lease_id, frame) for frame in message.frames)
                    else:
                        self.revoked.add(message.lease_id)
                elif isinstance(message, m.Probe | m.Assign):
                    self.work.put_nowait(message)
                elif isinstance(message, m.Error):
                    raise ProtocolError(message.reason)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while not self.work.empty():
                self.work.get_nowait()
            with contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _heartbeats(self) -> None:
        assert self.stream is not None
        await self.stream.send(m.Heartbeat(**self.state))
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S * (0.9 + 0.2 * random.random()))
            await self.stream.send(m.Heartbeat(**self.state))

    async def _worker(self) -> None:
        assert self.stream is not None
        while True:
            message = await self.work.get()
            await self.go.wait()
            if isinstance(message, m.Probe):
                end = self.frame_end.get(message.job_id, 1)
                scene = {"scene": "Scene", "engine": "CYCLES", "frame_start": 1, "frame_end": end, "frame_step": 1,
                         "fps": 24.0, "resolution_x": 8, "resolution_y": 8, "percentage": 100, "file_format": "PNG"}
                await self.stream.send(m.ProbeResult(lease_id=message.lease_id, ok=True, scene=scene))
                continue
            assert isinstance(message, m.Assign)
            for frame in message.frames:
                if message.lease_id in self.revoked:
                    break
                if (message.lease_id, frame) in self.revoked_frames:
                    continue
                self.state = {"state": "rendering", "lease_id": message.lease_id, "job_id": message.job_id,
                              "frame": frame, "device": "CPU"}
                await self.stream.send(m.Heartbeat(**self.state))
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self.stream.send(m.FrameBegin(lease_id=message.lease_id, job_id=message.job_id, frame=frame,
                                                    ext="png", size=len(PNG), render_s=max(self.delay, 0.01)))
                await self.stream.send(m.Chunk(data=PNG))
                await self.stream.send(m.End(sha256=PNG_SHA))
                self.tally.frames_sent += 1
            self.state = {"state": "idle", "device": "CPU"}
            await self.stream.send(m.LeaseDone(lease_id=message.lease_id))
            await self.stream.send(m.Heartbeat(**self.state))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _file_floor_ms(folder: Path, count: int = 1000) -> float:
    """The CPU ms (user and system) this machine's filesystem takes to store one small file the way a frame is
    stored (a temporary file created, written, closed, renamed into place), in `folder`: the part of a frame's cost
    no server design avoids."""
    folder.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    for number in range(count):
        temporary = folder / f".incoming-{number}.part"
        with open(temporary, "xb") as handle:
            handle.write(PNG)
        os.replace(temporary, folder / f"frame_{number:04d}.png")
    after = resource.getrusage(resource.RUSAGE_SELF)
    for number in range(count):
        (folder / f"frame_{number:04d}.png").unlink()
    return 1000 * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / count


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    profile = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
    floor = _file_floor_ms(root / "floor")
    server = subprocess.Popen(
        [sys.executable, *profile, "-m", "server_addon", "--host", LOOPBACK, "--port", "0", "--no-discovery",
         "--output-dir", str(root / "out")], cwd=REPO, env=repo_env(), stdout=subprocess.PIPE,
        stderr=open(root / "server.log", "wb"), text=True)  # noqa: SIM115 - closed with the process
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), SERVER_START_TIMEOUT_S)
        if "listening on" not in line:
            raise ToolError(f"the server did not start: {(root / 'server.log').read_text()[-2000:]}")
        port = int(line.rsplit(":", 1)[1])
        return {**await _run(args, root, server.pid, port), "file_floor_cpu_ms": round(floor, 3)}
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
        if server.poll() is None:
            server.kill()


async def _run(args: argparse.Namespace, root: Path, pid: int, port: int) -> dict[str, Any]:
    tally = Tally()
    frame_end: dict[str, int] = {}
    control = await Control.connect(f"{LOOPBACK}:{port}", None)  # first: the clients fill the handshake slots
    go = asyncio.Event()
    if not args.queued:
        go.set()
    clients = [SimClient(f"sim{i:04d}", port, args.delay, tally, frame_end, go) for i in range(args.clients)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        deadline = time.monotonic() + 120
        while True:
            status = await control.status()
            if sum(1 for c in status.clients if c["state"] == "idle") >= args.clients:
                break
            if time.monotonic() > deadline:
                raise ToolError(f"{args.clients} simulated clients did not connect within 120 s")
            await asyncio.sleep(0.5)
        per_job = max(1, args.frames // args.jobs)
        cpu0, wall0 = _cpu_s(pid), time.monotonic()
        joined_after = tally.reconnects  # (refusals while joining: the handshake slots were taken; they retried)
        ids = []
        for number in range(args.jobs):
            blend = root / f"job{number:05d}.blend"
            blend.write_bytes(BLEND_HEADER + f"job {number}".encode().ljust(64, b"\0"))
            job_id, _ = await control.submit(blend, {"frame_start": 1, "frame_end": per_job, "chunk": args.chunk,
                                                     "file_format": "PNG"})
            frame_end[job_id] = per_job
            ids.append(job_id)
        submitted_s = time.monotonic() - wall0
        submit_cpu = _cpu_s(pid) - cpu0
        go.set()
        total = per_job * args.jobs
        done = 0
        states: dict[str, int] = {}
        failures = 0
        timed_out = False
        while True:
            await asyncio.sleep(1.0)
            # Until the clients sent every frame, the server is not asked (a STATUS of thousands of jobs costs it
            # tens of ms: a monitoring tool's cost, not the farm's); then once a second until every job ended.
            if tally.frames_sent < total and time.monotonic() - wall0 < args.timeout:
                continue
            status = await control.status()
            jobs = [j for j in status.jobs if j["id"] in frame_end]
            done = sum(j["frames_done"] for j in jobs)
            states = {}
            for job in jobs:
                states[job["state"]] = states.get(job["state"], 0) + 1
            failures = sum(f["count"] for j in jobs for f in j["failures"])
            if all(j["state"] in ("done", "failed", "cancelled") for j in jobs) and len(jobs) == len(ids):
                break
            if time.monotonic() - wall0 > args.timeout:
                timed_out = True
                break
        wall = time.monotonic() - wall0
        cpu = _cpu_s(pid) - cpu0
        lost = sum(1 for c in status.clients if c["state"] == "lost")
    finally:
        await control.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"clients": args.clients, "jobs": args.jobs, "frames": total, "chunk": args.chunk, "delay_s": args.delay,
            "frames_done": done, "finished": not timed_out and done == total, "job_states": states,
            "server_cpu_ms_per_frame": round(1000 * cpu / max(done, 1), 3),
            "server_cpu_ms_per_job": round(1000 * cpu / max(args.jobs, 1), 3),
            "server_cpu_ms_per_submission": round(1000 * submit_cpu / max(args.jobs, 1), 3), "queued": args.queued,
            "frames_per_s": round(done / wall, 1), "wall_s": round(wall, 2), "submit_s": round(submitted_s, 2),
            "server_peak_rss_mib": round(_peak_rss_mib(pid), 1), "lost_clients": lost,
            "reconnects": tally.reconnects, "reconnects_after_start": tally.reconnects - joined_after,
            "server_cpu_share": round(cpu / wall, 3), "failures": failures, "errors": tally.errors[:5]}


def scale(args: argparse.Namespace) -> dict[str, Any]:
    if args.clients < 1 or args.frames < 1 or args.jobs < 1 or args.chunk < 1:
        raise ToolError("--clients, --frames, --jobs and --chunk must be at least 1")
    with tempfile.TemporaryDirectory(prefix="microfarm-scale-") as scratch:
        return asyncio.run(_bench(args, Path(scratch)))


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("scale", help="server CPU per frame with many simulated clients, frames and jobs")
    bench.add_argument("--clients", type=int, default=100, help="simulated render clients (default: 100)")
    bench.add_argument("--frames", type=int, default=20_000, help="frames in all (default: 20000)")
    bench.add_argument("--jobs", type=int, default=1, help="jobs the frames are split over (default: 1)")
    bench.add_argument("--chunk", type=int, default=1, help="frames per lease (default: 1)")
    bench.add_argument("--delay", type=float, default=0.0, help="seconds each simulated frame takes (default: 0)")
    bench.add_argument("--queued", action="store_true",
                       help="the clients hold their work until every job is submitted: all the jobs wait in the queue "
                            "at once (the submissions' own cost is printed apart)")
    bench.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default: 600)")
    bench.add_argument("--profile", default=None, metavar="FILE",
                       help="run the server under cProfile and write its profile here (pstats format)")
