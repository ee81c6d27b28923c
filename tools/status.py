"""Show a MicroFarm server's jobs and clients.

    python -m tools.status --server HOST:PORT [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from protocol.names import printable
from protocol.secret import add_secret_options
from server_addon.core.versions import job_blender

from .control import Control, run_tool, secret


def format_table(rows: list[list[str]], header: list[str]) -> str:
    # Names and errors come from clients and artists: control characters shown as escapes, never obeyed.
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def render_text(jobs: list[dict[str, Any]], clients: list[dict[str, Any]]) -> str:
    out = []
    if jobs:
        def note(j: dict[str, Any]) -> str:
            text = j.get("error") or j.get("waiting") or j.get("video_error") or ""
            if not text and j.get("warnings"):
                count = len(j["warnings"])
                text = f"warning: {j['warnings'][0]}" + (f" (+{count - 1} more)" if count > 1 else "")
            return text.splitlines()[0][:120] if text else ""
        def progress(j: dict[str, Any]) -> str:
            done = f"{j['frames_done']}/{j['frames_total']}"
            if j.get("tiles"):  # a split frame: its tiles
                return f"{done} tiles of frame {j['frame_range'][0]}"
            return done
        rows = [[j["id"], j["name"], j["state"], progress(j), job_blender(j), note(j)] for j in jobs]
        out.append(format_table(rows, ["JOB", "FILE", "STATE", "FRAMES", "BLENDER", "NOTE"]))
        for j in jobs:  # warnings in full: a job that rendered without some of its files must not look fine
            out.extend(f"warning: {j['id']}: {w}" for w in j.get("warnings") or ())
    else:
        out.append("no jobs")
    out.append("")
    if clients:
        def doing(c: dict[str, Any]) -> str:
            if c["state"] == "rendering" and c.get("frame") is not None:
                return f"rendering {c['job_id']} frame {c['frame']}"
            return c["state"]
        rows = [[c["name"], c["host"], c.get("blender") or "?", c.get("device") or "?", doing(c),
                 str(c["frames_rendered"]), str(c["failures"])] for c in clients]
        out.append(format_table(rows, ["CLIENT", "HOST", "BLENDER", "DEVICE", "STATE", "FRAMES", "FAILURES"]))
    else:
        out.append("no clients")
    return "\n".join(out)


async def run(args: argparse.Namespace) -> int:
    control = await Control.connect(args.server, secret(args))
    try:
        status = await control.status()
    finally:
        await control.close()
    if args.json:
        print(json.dumps({"jobs": status.jobs, "clients": status.clients}, indent=2))
    else:
        print(render_text(status.jobs, status.clients))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.status",
                                     description="Show a MicroFarm server's jobs and clients.")
    parser.add_argument("--server", required=True, help="farm server as HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_secret_options(parser)
    args = parser.parse_args(argv)
    return run_tool(run(args))


if __name__ == "__main__":
    sys.exit(main())
