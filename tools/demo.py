"""`make demo`: render a generated animation on a local farm (a server and two clients on 127.0.0.1).

    python -m tools.demo [--out demo_output] [--frames 24] [--clients 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .localfarm import REPO, LocalFarm, repo_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_output")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 16:
        print("error: --clients must be between 1 and 16", file=sys.stderr)
        return 2
    out: Path = args.out.resolve()
    blend = out / "demo.blend"
    print(f"Generating a {args.frames}-frame demo scene: {blend}")
    subprocess.run([sys.executable, "-m", "tools.scenes", str(blend), "--frames", str(args.frames),
                    "--size", "320x180", "--samples", "16"], cwd=REPO, env=repo_env(), check=True,
                   stdout=subprocess.DEVNULL)
    with LocalFarm(out, clients=args.clients) as farm:
        print(f"Server on {farm.address} with {args.clients} clients; logs in {out}")
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "tools.submit", str(blend), "--server", farm.address,
                                 "--video", "h264", "--wait"], cwd=REPO, env=repo_env(), stdout=subprocess.PIPE,
                                text=True)
        job_id = result.stdout.strip()
        elapsed = time.monotonic() - started
        subprocess.run([sys.executable, "-m", "tools.status", "--server", farm.address], cwd=REPO, env=repo_env())
    if result.returncode != 0:
        print(f"The demo job failed; see the logs in {out}", file=sys.stderr)
        return 1
    frames = sorted((farm.output / job_id).glob("frame_*"))
    print(f"\nRendered {len(frames)} frames in {elapsed:.1f} s: {farm.output / job_id}/")
    for video in sorted((farm.output / job_id).glob("*.mp4")):
        print(f"Video: {video}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
