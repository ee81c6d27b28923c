"""Benchmarks of real bpy clients pinned to cores (`taskset -c K` around each client, one render thread each).

`cores`: N clients, each on a core of its own, against one plain bpy process on one core (tools.render_local),
the same frames. Prints the speedup (local seconds over the farm's, from the submission to the last frame) and
speedup / N; also the speedup counted from the end of the probe (the farm's start-up: upload, probe, download,
left out) and the clients' mean render seconds per frame against the local process's (what sharing the machine
costs a core). For what the machine itself allows, the same frames are also rendered by N plain bpy processes at
once, each on its core with its share: machine_speedup_per_core, and farm_of_machine (that run's seconds over the
farm's: what the farm keeps of it).

`tail`: N clients on cores of their own, one of them F times slower (its render process runs 1/F of the time:
stopped and continued, a slower machine), one job of whole frames. Prints the makespan (from the end of the
probe to the job's end, and from the submission), the ideal makespan (the frames divided by the clients'
combined speed, each client's speed measured from the render seconds of the frames it delivered) and the
overhead over the ideal in %.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .benchfarm import Throttle, cpus, frame_times, make_scene, render_local, run_job, wait_clients
from .control import ToolError
from .localfarm import LocalFarm


def add_parsers(sub: Any) -> None:
    cores = sub.add_parser("cores", help="N clients pinned to N cores against one bpy process on one core")
    cores.add_argument("--clients", type=int, default=None, help="clients, one per core (default: every core)")
    cores.add_argument("--frames", type=int, default=32, help="frames to render (default: 32)")
    cores.add_argument("--chunk", type=int, default=2, help="frames per chunk (default: 2)")
    cores.add_argument("--samples", type=int, default=24, help="render samples (default: 24)")
    cores.add_argument("--keep", default=None, help="keep the scene, frames and logs in this folder")
    tail = sub.add_parser("tail", help="one client F times slower than the others: makespan against the ideal")
    tail.add_argument("--clients", type=int, default=None, help="clients, one per core, one of them slow "
                                                                "(default: every core)")
    tail.add_argument("--slow-by", type=float, default=5.0, help="how many times slower the slow client renders "
                                                                 "(default: 5)")
    tail.add_argument("--frames", type=int, default=18, help="frames to render (default: 18)")
    tail.add_argument("--chunk", type=int, default=1, help="frames per chunk (default: 1)")
    tail.add_argument("--samples", type=int, default=24, help="render samples (default: 24)")
    tail.add_argument("--keep", default=None, help="keep the scene, frames and logs in this folder")


def _clients(args: argparse.Namespace) -> list[int]:
    cores = cpus()
    count = len(cores) if args.clients is None else args.clients
    if not 1 <= count <= len(cores):
        raise ToolError(f"--clients must be between 1 and the {len(cores)} cores this process may use")
    return cores[:count]


def _scene(args: argparse.Namespace, root: Path) -> Path:
    """The generated scene; at 320x180 and 24 samples about 1.8 s a frame on one quiet core, one thread."""
    return make_scene(root / "cores.blend", "--frames", str(args.frames), "--size", "320x180", "--samples",
                      str(args.samples))


@contextmanager
def _pinned_farm(root: Path, cores: list[int]) -> Iterator[LocalFarm]:
    """A local farm whose clients render with one thread each, each pinned to one of `cores`, all connected."""
    with LocalFarm(root, clients=0) as farm:
        for core in cores:
            farm.add_client(f"core-{core}", "--threads", "1", wrapper=("taskset", "-c", str(core)))
        asyncio.run(wait_clients(farm.address, len(cores)))
        yield farm


def cores(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pinned = _clients(args)
    blend = _scene(args, root)
    print(f"local: frames 1-{args.frames} in one bpy process on core {pinned[0]}, one thread", file=sys.stderr)
    local = render_local(blend, 1, args.frames, root / "local", "--threads", "1",
                         wrapper=("taskset", "-c", str(pinned[0])))
    n = len(pinned)
    # What the machine itself gives: N plain processes at once, each on its core with its share of the frames (two
    # renders share the caches and the memory bus: the farm cannot beat this, only come close to it).
    print(f"parallel: frames 1-{args.frames} split over {n} plain bpy processes on cores {pinned}", file=sys.stderr)
    shares = [(1 + i * args.frames // n, (i + 1) * args.frames // n) for i in range(n)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda k: render_local(blend, shares[k][0], shares[k][1], root / f"parallel{k}", "--threads",
                                             "1", wrapper=("taskset", "-c", str(pinned[k]))), range(n)))
    parallel_s = time.monotonic() - started
    print(f"farm: {n} clients on cores {pinned}, one thread each", file=sys.stderr)
    with _pinned_farm(root / "farm", pinned) as farm:
        run = asyncio.run(run_job(farm.address, blend, {"frame_start": 1, "frame_end": args.frames,
                                                        "chunk": args.chunk}))
    run.check("cores")
    times = frame_times(farm.output, run.job["id"])
    speedup = local["local_s"] / run.elapsed_s
    after_probe = run.elapsed_s - (run.rendering_after_s or 0.0)
    return {
        "benchmark": "cores", "clients": n, "cores": pinned, "frames": args.frames, "chunk": args.chunk,
        "samples": args.samples, "local_s": round(local["local_s"], 3), "farm_s": round(run.elapsed_s, 3),
        "probe_s": round(run.rendering_after_s or 0.0, 3),
        "speedup": round(speedup, 3), "speedup_per_client": round(speedup / n, 3),
        "parallel_s": round(parallel_s, 3), "machine_speedup_per_core": round(local["local_s"] / parallel_s / n, 3),
        "farm_of_machine": round(parallel_s / run.elapsed_s, 3),
        "speedup_after_probe": round(local["local_s"] / after_probe, 3),
        "speedup_after_probe_per_client": round(local["local_s"] / after_probe / n, 3),
        "local_frame_s": round(statistics.fmean(local["frame_s"]), 3),
        "farm_frame_s": round(statistics.fmean(s for _, s in times.values()), 3),
        "frames_per_client": {name: sum(1 for c, _ in times.values() if c == name)
                              for name in sorted({c for c, _ in times.values()})},
        "cpus": os.cpu_count(),
    }


def tail(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pinned = _clients(args)
    if len(pinned) < 2:
        raise ToolError("the tail needs at least 2 clients (one of them slow)")
    if not 1 < args.slow_by <= 100:
        raise ToolError("--slow-by must be above 1 and at most 100")
    blend = _scene(args, root)
    slow_name = f"core-{pinned[-1]}"
    print(f"farm: {len(pinned)} clients on cores {pinned}, one thread each; {slow_name} {args.slow_by:g} times "
          "slower", file=sys.stderr)
    with _pinned_farm(root / "farm", pinned) as farm, Throttle(farm.clients[-1].pid, args.slow_by):
        run = asyncio.run(run_job(farm.address, blend, {"frame_start": 1, "frame_end": args.frames,
                                                        "chunk": args.chunk}))
    run.check("tail")
    times = frame_times(farm.output, run.job["id"])
    per_client: dict[str, list[float]] = {}
    for client, seconds in times.values():
        per_client.setdefault(client, []).append(seconds)
    speeds = {client: len(s) / sum(s) for client, s in per_client.items()}  # frames per second of rendering
    fast = [statistics.fmean(s) for c, s in per_client.items() if c != slow_name]
    slow = per_client.get(slow_name)
    if slow is None and fast:  # it delivered no frame (its copies all lost): its speed is what it was made
        speeds[slow_name] = 1 / (statistics.fmean(fast) * args.slow_by)
    ideal = args.frames / sum(speeds.values())
    makespan = run.elapsed_s - (run.rendering_after_s or 0.0)
    spares = (root / "farm" / "server.log").read_text(errors="replace").count("is late on its client")
    return {
        "benchmark": "tail", "clients": len(pinned), "slow_client": slow_name, "slow_by": args.slow_by,
        "frames": args.frames, "chunk": args.chunk, "samples": args.samples,
        "makespan_s": round(makespan, 3), "ideal_s": round(ideal, 3),
        "overhead_pct": round(100 * (makespan / ideal - 1), 1),
        "job_s": round(run.elapsed_s, 3), "probe_s": round(run.rendering_after_s or 0.0, 3),
        "overhead_from_submission_pct": round(100 * (run.elapsed_s / ideal - 1), 1),
        "fast_frame_s": round(statistics.fmean(fast), 3) if fast else None,
        "slow_frame_s": round(statistics.fmean(slow), 3) if slow else None,
        "measured_slow_by": round(statistics.fmean(slow) / statistics.fmean(fast), 2) if slow and fast else None,
        "frames_per_client": {c: len(s) for c, s in sorted(per_client.items())},
        "spares": spares, "last_frames_at_s": [round(t, 2) for t in run.done_at[-3:]], "cpus": os.cpu_count(),
    }
