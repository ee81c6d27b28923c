"""List what a .blend needs, without Blender (server_addon.core.trace, BAT 1.23).

    python -m tools.trace FILE.blend [--project DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server_addon.core.trace import OUTSIDE_DIR, TraceError, traced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.trace", description="List what a .blend needs.")
    parser.add_argument("blend", type=Path)
    parser.add_argument("--project", type=Path, default=None, help="the project folder (default: the .blend's)")
    args = parser.parse_args(argv)
    try:
        with traced(args.blend, args.project) as trace:
            for entry in trace.files:
                note = f"  (from {entry.original})" if entry.relpath.startswith(OUTSIDE_DIR + "/") else ""
                print(f"{entry.relpath}  {os.path.getsize(entry.source)} bytes{note}")
            for missing in trace.missing:
                print(f"missing: {missing}", file=sys.stderr)
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
