"""Submit a .blend to a MicroFarm server.

    python -m tools.submit FILE.blend --server HOST:PORT [--frames 1-24 | --frame N [--split auto|K]]
        [--step N] [--chunk 4] [--format PNG|JPEG|OPEN_EXR] [--samples N] [--percentage P]
        [--allow-missing] [--needs-scripts] [--persistent-data] [--shared-storage | --blend-only] [--wait]

Prints the job id. With --wait, shows progress and exits 0 when the job is done, 1 with the
reason when it failed or was cancelled. A job whose files are missing on the clients fails naming them,
unless --allow-missing: then it renders without them and the warning stays with the job.
With --shared-storage only the .blend travels, its own `//` paths made absolute: the clients read the files
where they lie (through their --path-map prefixes).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from protocol.blendfile import MAGIC_BYTES, BlendHeaderError, looks_like_blend, read_version
from protocol.names import printable
from protocol.secret import add_secret_options
from protocol.settings import BLENDER_FILE, IMAGE_FORMATS, JobRequest, SettingsError
from server_addon.core.actions import MAX_PRIORITY, check_priority
from server_addon.core.shared import absolute_copy
from server_addon.core.trace import OUTSIDE_DIR, Trace, TraceError, bat_available, traced
from server_addon.core.video import CODECS, LOCATIONS, QUALITIES, VideoSettings

from .control import Control, ToolError, UploadPlan, run_tool, secret

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+))?\s*$")


def parse_frames(text: str) -> tuple[int, int]:
    match = _RANGE.match(text)
    if not match:
        raise ToolError(f"--frames wants START-END or a single frame, not {text!r}")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start
    if end < start:
        raise ToolError(f"--frames {text}: the range ends before it starts")
    return start, end


def blender_value(text: str) -> str:
    """--blender: "file" or a version such as 4.5 or 5.3.1."""
    value = text.strip().lower()
    if value != BLENDER_FILE and not re.fullmatch(r"\d{1,3}\.\d{1,3}(\.\d{1,4})?", value):
        raise argparse.ArgumentTypeError(f"--blender wants 'file' or a version such as 4.5 or 5.3.1, not {text!r}")
    return value


def split_value(text: str) -> int:
    """--split: "auto" (0: as many tiles as the farm's clients suit) or a tile count."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split wants auto or a number of tiles, not {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError("--split wants at least 2 tiles (or auto)")
    return value


def build_settings(args: argparse.Namespace) -> dict[str, Any]:
    start = end = None
    if args.frames:
        start, end = parse_frames(args.frames)
    if args.frame is not None:
        start = end = args.frame
    split = getattr(args, "split", None)
    if split is not None and (start is None or start != end):
        raise ToolError("--split cuts one frame into tiles: say which with --frame N")
    raw = {"frame_start": start, "frame_end": end, "frame_step": args.step, "chunk": args.chunk,
           "file_format": args.format, "samples": args.samples, "percentage": args.percentage,
           "device": args.device.upper() if args.device else None, "split": split,
           "blender": args.blender, "allow_missing": getattr(args, "allow_missing", False),
           "needs_scripts": getattr(args, "needs_scripts", False), "hang_s": getattr(args, "hang_timeout", None),
           "persistent_data": getattr(args, "persistent_data", False)}
    try:
        return JobRequest.from_wire(raw).to_wire()
    except SettingsError as exc:
        raise ToolError(str(exc)) from None


def priority_value(text: str) -> int:
    try:
        return check_priority(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"priority must be a whole number between -{MAX_PRIORITY} and "
                                         f"{MAX_PRIORITY}, not {text!r}") from None


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    total = job.get("frames_total") or 0
    done = job.get("frames_done") or 0
    filled = int(width * done / total) if total else 0
    bar = "#" * filled + "-" * (width - filled)
    unit = "tiles" if job.get("tiles") else "frames"
    return f"[{bar}] {done}/{total} {unit}  {job.get('state')}"


async def run(args: argparse.Namespace) -> int:
    blend: Path = args.blend
    if not blend.is_file():
        raise ToolError(f"{blend} is not a file")
    try:
        with open(blend, "rb") as handle:
            head = handle.read(MAGIC_BYTES)
        if not looks_like_blend(head):
            raise ToolError(f"{blend} is not a .blend file")
    except OSError as exc:
        raise ToolError(f"cannot read {blend}: {exc.strerror or exc}") from None
    settings = build_settings(args)
    try:
        read_version(blend)  # the server's own check, before the tracer reads further than the header
    except BlendHeaderError as exc:
        if not str(exc).startswith("the file is zstd"):  # a compressed save the server may still take
            raise ToolError(f"{blend.name}: {exc}") from None
    except OSError as exc:
        raise ToolError(f"cannot read {blend}: {exc.strerror or exc}") from None
    if args.blend_only:
        return await _submit(args, blend, settings, None)
    if args.shared_storage:
        return await _submit_shared(args, blend, settings)
    why = bat_available()
    if why:
        print(f"warning: cannot trace what the .blend needs: {why}; only the .blend travels", file=sys.stderr)
        return await _submit(args, blend, settings, None)
    try:
        with traced(blend, args.project) as trace:
            _check_trace(trace, args.allow_missing)
            return await _submit(args, blend, settings, trace)
    except TraceError as exc:
        raise ToolError(str(exc)) from None


async def _submit_shared(args: argparse.Namespace, blend: Path, settings: dict[str, Any]) -> int:
    try:
        with absolute_copy(blend) as copy:
            for written, absolute in copy.rewritten:
                print(f"shared storage: {written} is read from {absolute}", file=sys.stderr)
            if copy.unreachable:
                print("warning: shared storage: baked caches beside the .blend are not reached by a path the "
                      f"clients can map: {', '.join(copy.unreachable)}", file=sys.stderr)
            return await _submit(args, copy.path, settings, None)
    except TraceError as exc:
        raise ToolError(str(exc)) from None


def _check_trace(trace: Trace, allow_missing: bool) -> None:
    """Say what is missing on this disk (and stop, unless allowed) and what comes from outside the project."""
    for entry in trace.outside:
        print(f"outside the project: {entry.original} travels as //{entry.relpath}", file=sys.stderr)
    if not trace.missing:
        return
    names = ", ".join(trace.missing[:10]) + (f" and {len(trace.missing) - 10} more" if len(trace.missing) > 10 else "")
    if not allow_missing:
        raise ToolError(f"{len(trace.missing)} file(s) the scene needs are missing on this disk: {names} "
                        "(submit with --allow-missing to render without them)")
    print(f"warning: missing on this disk, the job renders without them: {names}", file=sys.stderr)


def _show_plan(plan: UploadPlan) -> None:
    print(f"travels: {plan.describe()}", file=sys.stderr, flush=True)


async def _submit(args: argparse.Namespace, blend: Path, settings: dict[str, Any], trace: Trace | None) -> int:
    files, main = (trace.pairs(), trace.main) if trace is not None else (None, None)
    control = await Control.connect(args.server, secret(args))
    try:
        video = ({"codec": args.video, "quality": args.quality, "location": args.video_location}
                 if args.video else None)
        job_id, uploaded = await control.submit(blend, settings, priority=args.priority, start=not args.queue,
                                                video=video, files=files, main=main, on_plan=_show_plan)
        print(job_id, flush=True)
        if not args.wait:
            return 0
        tty = sys.stderr.isatty()
        last = ""
        job: dict[str, Any] = {}
        async for job in control.watch(job_id):
            line = progress_line(job)
            if line != last:
                print(("\r" if tty else "") + line, end="" if tty else "\n", file=sys.stderr, flush=True)
                last = line
        if tty:
            print(file=sys.stderr)
        for warning in job.get("warnings") or ():
            print(f"warning: job {job_id}: {printable(warning)}", file=sys.stderr)
        if job.get("state") != "done":
            reason = job.get("error") or job.get("state")
            print(f"error: job {job_id} {job.get('state')}: {printable(reason)}", file=sys.stderr)
            return 1
        if job.get("video_state") == "failed":
            print(f"error: job {job_id}: the frames are done but the video failed: {printable(job.get('video_error'))}",
                  file=sys.stderr)
            return 1
        if job.get("video_path"):
            print(f"video: {job['video_path']}", file=sys.stderr)
        return 0
    finally:
        await control.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.submit",
                                     description="Submit a .blend to a MicroFarm server.")
    parser.add_argument("blend", type=Path, help="the .blend file to render")
    parser.add_argument("--server", required=True, help="farm server as HOST:PORT")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--frames", help="frame range START-END (default: the scene's)")
    which.add_argument("--frame", type=int, metavar="N", help="render this one frame (the same as --frames N-N)")
    parser.add_argument("--split", type=split_value, metavar="auto|K",
                        help="cut the one frame (--frame N) into K horizontal tiles rendered by different clients "
                             "at once and stitched on the server; auto: as many as the farm's clients suit")
    parser.add_argument("--step", type=int, help="render every Nth frame (default: the scene's step)")
    parser.add_argument("--chunk", type=int, default=4, help="frames per chunk handed to a client (default: 4)")
    parser.add_argument("--format", choices=sorted(IMAGE_FORMATS), help="image format (default: the scene's)")
    parser.add_argument("--samples", type=int, help="render samples (default: the scene's)")
    parser.add_argument("--percentage", type=int, help="resolution percentage (default: the scene's)")
    parser.add_argument("--device", choices=["cpu", "gpu"], help="only clients rendering on this kind of device")
    parser.add_argument("--blender", type=blender_value, metavar="VERSION|file",
                        help="the Blender that renders every frame: 'file' (the version that saved it), 4.5 "
                             "(any 4.5.x) or 4.5.15 (default: the version most connected clients run)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="render even if files the scene uses are missing on the clients (the job carries the "
                             "list as a warning; default: the job fails naming them)")
    parser.add_argument("--needs-scripts", action="store_true",
                        help="the scene needs its Python (drivers, registered text blocks): send it only to clients "
                             "started with --allow-scripts")
    parser.add_argument("--persistent-data", action="store_true",
                        help="clients keep Cycles' render data between frames (BVH, images): faster for a static "
                             "scene with a moving camera, at the cost of memory (default: as the file was saved)")
    parser.add_argument("--hang-timeout", type=float, default=None, metavar="SECONDS",
                        help="a frame whose render shows no progress (Cycles' samples) for this long is hung: it "
                             "fails and goes to another client (default: 600); a slow frame that progresses is "
                             "never hung")
    parser.add_argument("--priority", type=priority_value, default=0,
                        help="higher renders first, -1000000 to 1000000 (default: 0)")
    parser.add_argument("--queue", action="store_true", help="queue the job without starting it (tools.jobs resume)")
    parser.add_argument("--video", choices=CODECS, help="build a video when the frames are done")
    parser.add_argument("--quality", choices=QUALITIES, default=VideoSettings.quality, help="video quality")
    parser.add_argument("--video-location", choices=LOCATIONS, default=VideoSettings.location,
                        help="where the video goes: beside the frames, the job folder's parent, the output root")
    parser.add_argument("--wait", action="store_true", help="show progress and wait until the job ends")
    parser.add_argument("--project", type=Path, default=None, metavar="DIR",
                        help="the project folder: files inside it keep their place relative to it (default: the "
                             f".blend's folder); files outside it travel under {OUTSIDE_DIR}/")
    travel = parser.add_mutually_exclusive_group()
    travel.add_argument("--blend-only", action="store_true",
                        help="send only the .blend as it is, not what it needs")
    travel.add_argument("--shared-storage", action="store_true",
                        help="a farm on shared storage: send only the .blend, its relative paths made absolute; the "
                             "clients read the files where they lie (mapping prefixes with their --path-map)")
    add_secret_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(run(args))


if __name__ == "__main__":
    sys.exit(main())
