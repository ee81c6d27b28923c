"""Control the jobs of a MicroFarm server.

    python -m tools.jobs --server HOST:PORT list
    python -m tools.jobs --server HOST:PORT cancel|pause|resume|force-complete JOB
    python -m tools.jobs --server HOST:PORT delete JOB [--files]
    python -m tools.jobs --server HOST:PORT clear-completed
    python -m tools.jobs --server HOST:PORT priority JOB N
    python -m tools.jobs --server HOST:PORT log JOB FRAME
    python -m tools.jobs --server HOST:PORT video JOB [--codec h264|h265|prores] [--quality high|medium|low]
        [--location frames|parent|root]
"""

from __future__ import annotations

import argparse
import sys

from protocol.names import printable
from protocol.secret import add_secret_options
from server_addon.core.video import CODECS, LOCATIONS, QUALITIES, VideoSettings

from .control import Control, ToolError, run_tool, secret
from .status import render_text

_SIMPLE = {"cancel": "cancel", "pause": "pause", "resume": "resume", "force-complete": "force_complete"}


async def run(args: argparse.Namespace) -> int:
    control = await Control.connect(args.server, secret(args))
    try:
        if args.command == "list":
            status = await control.status()
            print(render_text(status.jobs, []).rsplit("\n\n", 1)[0])
            return 0
        if args.command == "log":
            entry = await control.frame_log(args.job, args.frame)
            print(f"job {entry.job_id} frame {entry.frame}: {entry.failures} failure(s) on "
                  f"{printable(', '.join(entry.clients)) or 'no client'}")
            if entry.error:
                print(f"error: {printable(entry.error)}")
            if entry.log:
                print("--- render log (tail) ---")
                print(printable(entry.log, lines=True))  # Blender's lines, but no escape codes
            return 0
        if args.command in _SIMPLE:
            reply = await control.job_action(_SIMPLE[args.command], args.job)
        elif args.command == "delete":
            reply = await control.job_action("delete", args.job, files=args.files)
        elif args.command == "clear-completed":
            reply = await control.job_action("clear_completed")
        elif args.command == "priority":
            reply = await control.job_action("priority", args.job, priority=args.priority)
        elif args.command == "video":
            reply = await control.job_action("video", args.job, codec=args.codec, quality=args.quality,
                                             location=args.location)
            print(printable(reply.message), flush=True)
            job: dict = {}
            async for update in control.watch(args.job):
                job = update
            if job.get("video_state") != "done":
                raise ToolError(f"the video of job {args.job} failed: {job.get('video_error')}")
            print(job["video_path"])
            return 0
        else:  # argparse only lets the commands above through
            raise ToolError(f"unknown command {args.command}")
        print(printable(reply.message))
        return 0
    finally:
        await control.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.jobs", description="Control a MicroFarm server's jobs.")
    parser.add_argument("--server", required=True, help="farm server as HOST:PORT")
    add_secret_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list jobs")
    for name, text in (("cancel", "stop a job for good"), ("pause", "stop handing out a job's frames"),
                       ("resume", "start a queued or paused job, or retry a failed or cancelled one"),
                       ("force-complete", "finish a job with the frames that exist")):
        sub.add_parser(name, help=text).add_argument("job")
    delete = sub.add_parser("delete", help="remove a job from the farm")
    delete.add_argument("job")
    delete.add_argument("--files", action="store_true", help="also delete its frames and video")
    sub.add_parser("clear-completed", help="remove every finished job from the list (files stay)")
    priority = sub.add_parser("priority", help="set a job's priority (higher renders first)")
    priority.add_argument("job")
    priority.add_argument("priority", type=int)
    log = sub.add_parser("log", help="show a frame's failures and the tail of Blender's output")
    log.add_argument("job")
    log.add_argument("frame", type=int)
    video = sub.add_parser("video", help="build (or rebuild) a job's video now")
    video.add_argument("job")
    video.add_argument("--codec", default=VideoSettings.codec, choices=CODECS)
    video.add_argument("--quality", default=VideoSettings.quality, choices=QUALITIES)
    video.add_argument("--location", default=VideoSettings.location, choices=LOCATIONS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(run(args))


if __name__ == "__main__":
    sys.exit(main())
