"""Render frames of a .blend in one plain bpy process: the baseline the farm is measured against.

    python -m tools.render_local FILE.blend START END OUT_DIR [--format PNG] [--allow-scripts] [--persistent-data]
        [--threads N]

Uses the client's own render code (open once, render frame by frame), and prints one JSON line
with the time from opening the file to the last frame written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.render_local")
    parser.add_argument("blend", type=Path)
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", default="PNG")
    parser.add_argument("--allow-scripts", action="store_true",
                        help="run the file's scripts (registered text blocks, Python drivers), as a client started "
                             "with --allow-scripts does")
    parser.add_argument("--persistent-data", action="store_true",
                        help="keep Cycles' render data between frames, as a job submitted with --persistent-data")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = parser.parse_args(argv)

    from client.render import Renderer
    from protocol.settings import Assignment

    args.out.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(allow_scripts=args.allow_scripts, threads=args.threads)
    started = time.monotonic()
    renderer.open(args.blend, "local")
    renderer.apply(Assignment(args.format, None, None, None, persistent_data=args.persistent_data))
    frames = []
    for frame in range(args.start, args.end + 1):
        frame_started = time.monotonic()
        renderer.render_frame(frame, args.out)
        frames.append(time.monotonic() - frame_started)
    total = time.monotonic() - started
    print(json.dumps({"local_s": total, "frames": len(frames), "frame_s": frames}))
    return 0


if __name__ == "__main__":
    from client.finish import exit_process

    exit_process(main())  # bpy 4.x cannot end by itself once a file's Python drivers were seen
