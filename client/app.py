"""Command line of the render client (inside Blender or with PyPI's bpy)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from .cache import BlendCache, default_cache_dir


class UsageError(Exception):
    pass


def parse_server(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT; the port is required."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--server wants HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"--server port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise UsageError(f"--server port {number} is not between 1 and 65535")
    return host, number


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="microfarm-client",
        description="MicroFarm render client: renders frames for a farm server in this Blender.")
    parser.add_argument("--server", required=True, help="the farm server as HOST:PORT")
    parser.add_argument("--name", default=socket.gethostname(), help="name shown on the farm (default: host name)")
    parser.add_argument("--token", default=os.environ.get("MICROFARM_TOKEN"),
                        help="farm secret (default: $MICROFARM_TOKEN)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where .blend files are cached (default: ~/.cache/microfarm)")
    parser.add_argument("--allow-scripts", action="store_true",
                        help="run Python scripts stored in .blend files (drivers, handlers); off by default")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s [" + args.name + "] %(name)s: %(message)s")
    log = logging.getLogger("client")
    try:
        host, port = parse_server(args.server)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from .render import Renderer, blender_version
    except ImportError as exc:
        print(f"error: this Python has no bpy ({exc}); run inside Blender or pip install bpy", file=sys.stderr)
        return 2
    from .link import Link
    from .worker import Worker

    cache = BlendCache(args.cache_dir or default_cache_dir())
    link = Link(host, port, name=args.name, secret=args.token or None, cache=cache, blender=blender_version())
    worker = Worker(link, Renderer(allow_scripts=args.allow_scripts))

    def stop(signum: int, _frame: object) -> None:
        log.info("stopping (signal %d)", signum)
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("render client %r for %s:%d (Blender %s, scripts %s)", args.name, host, port, blender_version(),
             "allowed" if args.allow_scripts else "disabled")
    link.start()
    try:
        code = worker.run()
    finally:
        link.stop()
    if link.fatal:
        print(f"error: {link.fatal}", file=sys.stderr)
    return code
