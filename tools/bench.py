"""Benchmarks that print their numbers.

    python -m tools.bench overhead [--blend FILE] [--frames A-B] [--clients N] [--keep DIR]
    python -m tools.bench split [--size 640x360] [--samples N] [--clients 2] [--tiles auto|K] [--threads T]
        [--keep DIR]
    python -m tools.bench wire [--python PYTHON ...]
    python -m tools.bench project [--size-mb 2048] [--files 500] [--keep DIR]
    python -m tools.bench tls [--size-mb 1024] [--rounds 1]
    python -m tools.bench persistent [--frames 16] [--subdivisions 9] [--texture 2048] [--keep DIR]
    python -m tools.bench cores [--clients N] [--frames 32] [--keep DIR]
    python -m tools.bench tail [--clients N] [--slow-by 5] [--frames 18] [--keep DIR]

`overhead` renders the same frames once through a farm on 127.0.0.1 (a headless server and N
clients, connected and idle before the clock starts, with empty .blend caches) and once in a
single plain bpy process, and prints a JSON object on its last line with farm_s, local_s and
ratio (farm/local). The farm time runs from submitting the job to the last frame on disk and so
includes the upload, the probe, the download to each client and every frame's transfer; the
local time runs from opening the file to the last frame written.

`split` renders one large frame twice, each time on a fresh farm on 127.0.0.1 (empty caches): once
whole on one client, once split into tiles over N clients, and prints a JSON object on its last
line with one_client_s, split_s, ratio (split/one client), tiles and stitch_s. Both times run from
submitting the job to the frame on disk (upload, probe, downloads, transfers and, for the split
frame, the stitch).

`project` sends a generated project of N files totalling SIZE through a local farm with one client, twice,
and prints the peak memory of the server and the client, the bytes sent and the times (tools.bench_project).

`tls` sends one job file (1 GiB) from a server process to a client process, in plain text (a farm without a
secret) and over TLS (with one), and prints a JSON line for each with MB/s and each side's CPU seconds
(tools.bench_tls).

`persistent` renders a static scene seen by a moving camera with and without Cycles' persistent data, in one
plain bpy process and through a local farm of one client, and prints each run's per-frame seconds
(tools.bench_persistent). `cores` pins N clients to N cores against one bpy process on one core and prints the
speedup; `tail` slows one of N pinned clients down and prints the makespan against the ideal one
(tools.bench_cores).

`wire` times the message path (schema to wire map, msgpack, framing, and back) of a 512 KiB CHUNK and of
a heartbeat, in microseconds per message, with msgpack's compiled extension and with its pure-Python
fallback (what the render-client bundle runs on), in this Python and in every --python given (e.g. a stock
bpy venv's: the bundle's vendor/ comes from this checkout's installed packages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bench_cores, bench_keda, bench_persistent, bench_project, bench_scale, bench_tls
from .benchfarm import run_job, wait_clients
from .control import ToolError
from .localfarm import REPO, LocalFarm, repo_env
from .submit import parse_frames

#: The generated scene: 320x180 at 12 samples takes about half a second a frame on one core pair.
BENCH_SCENE = ("--size", "320x180", "--samples", "12")


async def _farm_run(address: str, blend: Path, start: int, end: int,
                    split: int | None = None) -> tuple[float, dict[str, Any]]:
    run = await run_job(address, blend, {"frame_start": start, "frame_end": end, "split": split})
    return run.elapsed_s, run.job


def _in_workdir(args: argparse.Namespace,
                bench: Callable[[argparse.Namespace, Path], dict[str, Any]]) -> dict[str, Any]:
    """Run a benchmark in --keep's folder, or in a temporary one that is removed afterwards."""
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
        return bench(args, root)
    with tempfile.TemporaryDirectory(prefix="microfarm-bench-") as scratch:
        return bench(args, Path(scratch))


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    return _in_workdir(args, _overhead)


def _overhead(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    blend = args.blend
    if blend is None:  # the result names the scene; a generated one is gone afterwards unless --keep

        blend = root / "bench.blend"
        subprocess.run([sys.executable, "-m", "tools.scenes", str(blend), "--frames", "100", *BENCH_SCENE],
                       cwd=REPO, env=repo_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, end = parse_frames(args.frames)

    print(f"local: rendering frames {start}-{end} of {blend.name} in one bpy process", file=sys.stderr)
    local = subprocess.run([sys.executable, "-m", "tools.render_local", str(blend), str(start), str(end),
                            str(root / "local")], cwd=REPO, env=repo_env(), check=True, capture_output=True,
                           text=True)
    local_result = json.loads(local.stdout.strip().splitlines()[-1])
    local_s = local_result["local_s"]
    print(f"local: {local_s:.2f} s", file=sys.stderr)

    print(f"farm: server + {args.clients} client(s) on 127.0.0.1", file=sys.stderr)
    with LocalFarm(root / "farm", clients=args.clients) as farm:
        asyncio.run(wait_clients(farm.address, args.clients))
        farm_s, job = asyncio.run(_farm_run(farm.address, blend, start, end))
    if job.get("state") != "done":
        raise ToolError(f"the farm job ended {job.get('state')}: {job.get('error')}")
    print(f"farm: {farm_s:.2f} s", file=sys.stderr)
    frames = end - start + 1
    return {
        "benchmark": "overhead", "blend": str(blend), "frames": frames, "clients": args.clients,
        "farm_s": round(farm_s, 3), "local_s": round(local_s, 3), "ratio": round(farm_s / local_s, 3),
        "local_frame_s": round(sum(local_result["frame_s"]) / frames, 3),
    }


def split(args: argparse.Namespace) -> dict[str, Any]:
    return _in_workdir(args, _split)


def _split(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    blend = root / "split.blend"
    subprocess.run([sys.executable, "-m", "tools.scenes", str(blend), "--frames", "2", "--size", args.size,
                    "--samples", str(args.samples)], cwd=REPO, env=repo_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs: dict[str, tuple[float, dict[str, Any]]] = {}
    stitch_s = None
    for label, clients, tiles in (("one", 1, None), ("split", args.clients, args.tiles)):
        print(f"{label}: frame 1 of a {args.size} scene at {args.samples} samples on {clients} client(s)"
              + (f", split {'auto' if tiles == 0 else tiles}" if tiles is not None else ""), file=sys.stderr)
        threads = ("--threads", str(args.threads)) if args.threads else ()
        with LocalFarm(root / label, clients=clients, client_args=threads) as farm:
            asyncio.run(wait_clients(farm.address, clients))
            runs[label] = asyncio.run(_farm_run(farm.address, blend, 1, 1, split=tiles))
            if tiles is not None:
                match = re.search(r"stitched from \d+ tiles in ([\d.]+) s", (root / label / "server.log").read_text())
                stitch_s = float(match.group(1)) if match else None
        elapsed, job = runs[label]
        if job.get("state") != "done":
            raise ToolError(f"the {label} job ended {job.get('state')}: {job.get('error')}")
        print(f"{label}: {elapsed:.2f} s", file=sys.stderr)
    one_s, split_s = runs["one"][0], runs["split"][0]
    return {
        "benchmark": "split", "size": args.size, "samples": args.samples, "clients": args.clients,
        "tiles": runs["split"][1].get("tiles"), "one_client_s": round(one_s, 3), "split_s": round(split_s, 3),
        "ratio": round(split_s / one_s, 3), "stitch_s": stitch_s, "cpus": os.cpu_count(),
        "client_threads": args.threads,
    }


def _tiles(text: str) -> int:
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError("--tiles wants auto or a number of at least 2")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description="MicroFarm benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead", help="farm time versus one plain bpy process for the same frames")
    over.add_argument("--blend", type=Path, default=None, help="scene to render (default: a generated one)")
    over.add_argument("--frames", default="1-20", help="frame range (default: 1-20)")
    over.add_argument("--clients", type=int, default=1, help="render clients in the farm (default: 1)")
    over.add_argument("--keep", default=None, help="keep frames and logs in this folder")
    cut = sub.add_parser("split", help="one large frame on one client versus split over several")
    cut.add_argument("--size", default="640x360", help="frame size WIDTHxHEIGHT (default: 640x360)")
    cut.add_argument("--samples", type=int, default=64, help="render samples (default: 64)")
    cut.add_argument("--clients", type=int, default=2, help="clients the split frame is rendered on (default: 2)")
    cut.add_argument("--tiles", type=_tiles, default=0, help="tiles: auto (the default) or a number")
    cut.add_argument("--threads", type=int, default=None,
                     help="CPU threads of each client (default: all): with N clients of T threads on N*T cores, "
                          "one machine of T cores against N of them")
    cut.add_argument("--keep", default=None, help="keep frames and logs in this folder")
    wire = sub.add_parser("wire", help="µs per message on the wire path, compiled msgpack versus pure Python")
    wire.add_argument("--python", action="append", default=[], help="also measure in this Python (repeatable)")
    wire.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    bench_project.add_parser(sub)
    bench_persistent.add_parser(sub)
    bench_cores.add_parsers(sub)
    bench_scale.add_parser(sub)
    bench_tls.add_parser(sub)
    bench_keda.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "tls":
        for row in bench_tls.run(args):
            print(json.dumps(row), flush=True)
        return 0
    if args.command == "wire":
        return wire_main(args)
    if args.command in ("scale", "keda"):
        try:
            result = bench_scale.scale(args) if args.command == "scale" else bench_keda.keda(args)
        except ToolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result))
        return 0
    runs = {"project": bench_project.project, "persistent": bench_persistent.persistent,
            "cores": bench_cores.cores, "tail": bench_cores.tail}
    if args.command in runs:
        try:
            result = _in_workdir(args, runs[args.command])
        except (ToolError, subprocess.CalledProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result))
        return 0
    try:
        if args.clients < 1:
            raise ToolError("--clients must be at least 1")
        if getattr(args, "blend", None) is not None and not args.blend.is_file():
            raise ToolError(f"{args.blend} is not a file")
        result = overhead(args) if args.command == "overhead" else split(args)
    except (ToolError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def wire_costs(seconds: float = 0.5) -> dict[str, Any]:
    """Encode and decode µs per message in this process, with whichever msgpack it imports."""
    import msgpack

    from protocol import framing
    from protocol import messages as m
    from protocol.limits import BULK_CHUNK_BYTES

    samples = {"chunk": m.Chunk(os.urandom(BULK_CHUNK_BYTES)),
               "heartbeat": m.Heartbeat(state="rendering", job_id="anim-12-3f9a2c", frame=12, lease_id=7)}
    result: dict[str, Any] = {"python": ".".join(map(str, sys.version_info[:3])),
                              "msgpack": "fallback" if msgpack.Packer.__module__ == "msgpack.fallback" else "compiled"}
    for name, message in samples.items():
        body = framing.encode(message.to_wire())[4:]
        for step, work in (("encode", lambda message=message: framing.encode(message.to_wire())),
                           ("decode", lambda body=body: m.from_wire(framing.decode_body(body)))):
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                work()
                count += 1
            result[f"{name}_{step}_us"] = round((time.perf_counter() - started) / count * 1e6, 1)
    return result


def wire_main(args: argparse.Namespace) -> int:
    if args.inner:
        print(json.dumps(wire_costs()))
        return 0
    from server_addon.core.client_bundle import build_bundle

    with tempfile.TemporaryDirectory(prefix="microfarm-wire-") as work:
        bundle = build_bundle(Path(work))
        runs = [(sys.executable, {}, False), (sys.executable, {"MSGPACK_PUREPYTHON": "1"}, False)]
        runs += [(python, {}, True) for python in args.python]  # a stock Python: the bundle's pure-Python copy
        for python, extra, stock in runs:
            env = {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(
                [str(bundle / "vendor"), str(bundle), str(REPO)] if stock else [str(REPO)])}
            out = subprocess.run([python, "-m", "tools.bench", "wire", "--inner"], cwd=REPO, env=env, check=True,
                                 capture_output=True, text=True, timeout=120).stdout
            print(out.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
