"""`python -m tools.bench persistent`: what keeping Cycles' render data between frames saves.

A generated static scene (a sphere of many triangles, a large packed texture) seen by a moving camera is rendered
four times: in one plain bpy process (tools.render_local) without and with render.use_persistent_data, and through
a local farm of one client (a fresh farm each time, empty caches) as a job without and with the persistent_data
option. Each run's per-frame render seconds are summed up as the first frame (which builds the BVH and loads the
images either way) and the mean of the others (which, with the option, reuse them); the farm's come from the
render times its client reported for each frame. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from .benchfarm import frame_times, make_scene, render_local, run_job, wait_clients
from .localfarm import LocalFarm


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("persistent", help="per-frame time with and without persistent data, farm and local")
    bench.add_argument("--frames", type=int, default=16, help="frames of the camera move (default: 16)")
    bench.add_argument("--size", default="320x180", help="frame size WIDTHxHEIGHT (default: 320x180)")
    bench.add_argument("--samples", type=int, default=8, help="render samples (default: 8)")
    bench.add_argument("--subdivisions", type=int, default=9,
                       help="the sphere's ico subdivisions: 20 * 4^N triangles (default: 9, 5.2 million)")
    bench.add_argument("--texture", type=int, default=2048, help="the packed texture's side in pixels "
                                                                 "(default: 2048)")
    bench.add_argument("--chunk", type=int, default=4, help="frames per chunk on the farm (default: 4)")
    bench.add_argument("--keep", default=None, help="keep the scene, frames and logs in this folder")


def summary(frame_s: list[float]) -> dict[str, float]:
    rest = frame_s[1:] or frame_s
    return {"first_s": round(frame_s[0], 3), "rest_mean_s": round(statistics.fmean(rest), 3),
            "rest_median_s": round(statistics.median(rest), 3), "mean_s": round(statistics.fmean(frame_s), 3)}


def persistent(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    blend = make_scene(root / "persistent.blend", "--frames", str(args.frames), "--size", args.size, "--samples",
                       str(args.samples), "--camera-move", "--subdivisions", str(args.subdivisions),
                       "--texture", str(args.texture))
    result: dict[str, Any] = {
        "benchmark": "persistent", "frames": args.frames, "size": args.size, "samples": args.samples,
        "triangles": 20 * 4 ** args.subdivisions, "texture": args.texture, "chunk": args.chunk,
        "blend_mb": round(blend.stat().st_size / 1e6, 1), "cpus": os.cpu_count()}
    for label, extra in (("off", ()), ("on", ("--persistent-data",))):
        print(f"local, persistent data {label}: frames 1-{args.frames} in one bpy process", file=sys.stderr)
        local = render_local(blend, 1, args.frames, root / f"local-{label}", *extra)
        result[f"local_{label}"] = {**summary(local["frame_s"]), "total_s": round(local["local_s"], 3)}
    for label, on in (("off", False), ("on", True)):
        print(f"farm, persistent data {label}: one client on 127.0.0.1", file=sys.stderr)
        with LocalFarm(root / f"farm-{label}", clients=1) as farm:
            asyncio.run(wait_clients(farm.address, 1))
            run = asyncio.run(run_job(farm.address, blend, {"frame_start": 1, "frame_end": args.frames,
                                                            "chunk": args.chunk, "persistent_data": on}))
        run.check(f"persistent data {label}")
        times = frame_times(farm.output, run.job["id"])
        frame_s = [times[n][1] for n in sorted(times)]
        result[f"farm_{label}"] = {**summary(frame_s), "job_s": round(run.elapsed_s, 3)}
    for side in ("local", "farm"):
        off, on = result[f"{side}_off"]["rest_mean_s"], result[f"{side}_on"]["rest_mean_s"]
        result[f"{side}_saved_per_frame_s"] = round(off - on, 3)
        result[f"{side}_ratio"] = round(on / off, 3)  # per-frame time with the option over without
    return result
