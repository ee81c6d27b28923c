"""Command line of the render client (inside Blender or with PyPI's bpy)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import socket
import sys
from pathlib import Path

from protocol.address import AddressError, parse_server
from protocol.errors import DiscoveryError
from protocol.names import printable
from protocol.secret import SecretError, add_secret_options, secret_from_args

from .cache import BlendCache, default_cache_dir
from .pathmap import Mapping, PathMapError


class UsageError(Exception):
    pass


class StopNow(BaseException):
    """A second stop signal: end at once (the server takes back whatever this client held)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: Finish the frame in hand within this many seconds of a stop signal, else hand it back: Kubernetes waits 30 s
#: (terminationGracePeriodSeconds) before it kills a pod; the rest is for the last upload.
DRAIN_TIMEOUT_S = 25.0


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """A size like 50G, 500MiB, 1.5 TB or 1048576 (bytes; units are powers of 1024); "none": no bound."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"--cache-max wants a size like 50G, 500M or 1.5T, not {text!r}")
    size = int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))
    if size <= 0:
        raise UsageError("--cache-max must be more than 0 bytes (or none)")
    return size


def check_discovery_args(args: argparse.Namespace, servers: list[tuple[str, int]]) -> list[str] | None:
    """The interfaces to browse on; raises UsageError for options that do not go together."""
    if servers:
        if args.farm:
            raise UsageError("--farm chooses among the farms found on the LAN; leave out --server to use it")
        return None
    if not args.discovery:
        raise UsageError("with --no-discovery, --server HOST:PORT is required")
    try:
        # Imported here: a client given --server runs without the zeroconf package.
        from protocol.discovery import interface_addresses
    except ImportError as exc:
        raise UsageError(f"finding the farm needs the zeroconf package ({exc}); install it or pass --server") from None
    if not args.interfaces:
        return None
    try:
        return interface_addresses(args.interfaces)
    except DiscoveryError as exc:
        raise UsageError(f"--interface: {exc}") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="microfarm-client",
        description="MicroFarm render client: renders frames for a farm server in this Blender.")
    parser.add_argument("--server", dest="servers", action="append", default=None, metavar="HOST:PORT",
                        help="the farm server (default: find a farm on the LAN over zeroconf); repeatable: "
                             "each is tried in turn")
    parser.add_argument("--farm", default=None, metavar="NAME",
                        help="with discovery: the farm to join (default: the first by name of those found)")
    parser.add_argument("--interface", dest="interfaces", action="append", default=None, metavar="ADDR",
                        help="look for farms only on this interface (an address or a name like eth0; repeatable; "
                             "default: all)")
    parser.add_argument("--no-discovery", dest="discovery", action="store_false",
                        help="do not look for farms on the LAN; --server is then required")
    parser.add_argument("--name", default=socket.gethostname(), help="name shown on the farm (default: host name)")
    add_secret_options(parser)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where job files are cached (default: ~/.cache/microfarm)")
    parser.add_argument("--cache-max", default="50G", metavar="SIZE",
                        help="the most job files the cache keeps, e.g. 20G or 500M (or none); the least recently "
                             "used go first, never those of the job this client has open (default: 50G)")
    parser.add_argument("--allow-scripts", action="store_true",
                        help="run Python scripts stored in .blend files (drivers, handlers); off by default")
    parser.add_argument("--path-map", dest="path_map", action="append", default=[], metavar="FROM=TO",
                        help="a farm on shared storage: read files whose absolute path starts with FROM (as the "
                             "artist's machine names it, e.g. P:\\projects) from TO on this machine (e.g. "
                             "/mnt/projects); repeatable, the first that matches wins")
    parser.add_argument("--device", default="auto",
                        help="Cycles device: auto (best GPU, else CPU), CPU, OPTIX, CUDA, HIP, METAL or ONEAPI")
    parser.add_argument("--gpu-index", type=int, default=None, metavar="N",
                        help="use only the Nth GPU of the backend (one client per GPU on a multi-GPU machine)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="limit CPU render threads")
    parser.add_argument("--render-in-process", action="store_true",
                        help="render in this Blender process instead of a supervised second one: uses less memory, "
                             "but a Blender crash then ends the client (and is not reported), and a hung frame "
                             "cannot be stopped")
    parser.add_argument("--exit-on-auth-failure", action="store_true",
                        help="exit (status 2) when a server fails the farm-secret check or speaks another protocol "
                             "version, instead of skipping it and looking on (for scripts)")
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="SECONDS",
                        help="on SIGTERM or Ctrl+C: hand back the work not started at once, and finish the frame being "
                             f"rendered within this time, else hand it back too (default: {DRAIN_TIMEOUT_S:g}, for "
                             "Kubernetes' 30 s grace period); a second signal stops at once")
    parser.add_argument("--health-file", type=Path, default=None, metavar="PATH",
                        help="touch this file every few seconds while the client's network side runs (for a "
                             "container's health check)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except StopNow as stop_now:  # (before the work began: the render process was starting)
        logging.getLogger("client").warning("stopped at once (signal %d again)", stop_now.signum)
        return 1


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s [" + printable(args.name).replace("%", "%%")
                        + "] %(name)s: %(message)s")
    log = logging.getLogger("client")
    try:
        servers = [parse_server(text) for text in args.servers or []]
        interfaces = check_discovery_args(args, servers)
        if args.threads is not None and args.threads < 1:
            raise UsageError("--threads must be at least 1")
        if args.gpu_index is not None and args.gpu_index < 0:
            raise UsageError("--gpu-index must be 0 or more")
        if not 0 <= args.drain_timeout <= 24 * 3600:
            raise UsageError("--drain-timeout must be between 0 and 86400 seconds")
        path_map = tuple(Mapping.parse(text) for text in args.path_map)
        cache_max = parse_size(args.cache_max)
        secret = secret_from_args(args)
    except (UsageError, AddressError, PathMapError, SecretError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from .render import Renderer, blender_version
    except ImportError as exc:
        print(f"error: this Python has no bpy ({exc}); run inside Blender or pip install bpy", file=sys.stderr)
        return 2
    from .devices import DeviceError, inventory
    from .devices import choose as choose_device
    from .link import Link, Refused, fixed_targets
    from .supervisor import RenderCrash, RenderProcess
    from .worker import Worker

    with contextlib.ExitStack() as resources:
        refused: Refused | None = None
        if servers:
            resolve, where = fixed_targets(servers), ", ".join(f"{host}:{port}" for host, port in servers)
        else:
            from protocol.discovery import Browser
            try:
                browser = resources.enter_context(Browser(args.farm, interfaces))
            except DiscoveryError as exc:
                print(f"error: {exc}; pass --server HOST:PORT", file=sys.stderr)
                return 1
            resolve, refused = browser.target, browser.refuse
            where = f"farm {args.farm!r}" if args.farm else "the farm found on the LAN"
        cache = BlendCache(args.cache_dir or default_cache_dir(), max_bytes=cache_max)
        try:
            device = choose_device(args.device, args.gpu_index)
        except DeviceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        link = Link(resolve, name=args.name, secret=secret, cache=cache, blender=blender_version(),
                    device=device.backend, devices=inventory(), allow_scripts=args.allow_scripts,
                    refused=refused, exit_on_refusal=args.exit_on_auth_failure, health_file=args.health_file)
        if args.render_in_process:
            renderer: Renderer | RenderProcess = Renderer(allow_scripts=args.allow_scripts, device=device,
                                                          threads=args.threads, path_map=path_map, name=args.name)
        else:
            # Blender renders in a second process that this one supervises: a crash of Blender on a frame is
            # reported as that frame's failure, and a frame the server declares hung is stopped.
            renderer = RenderProcess(allow_scripts=args.allow_scripts, device=device, gpu_index=args.gpu_index,
                                     threads=args.threads, path_map=path_map, name=args.name)
            resources.callback(renderer.close)
        worker = Worker(link, renderer)

        def stop(signum: int, _frame: object) -> None:
            # On the render thread, between two of its steps: nothing here may wait for a lock it could hold.
            if link.draining:
                raise StopNow(signum)
            link.drain(args.drain_timeout)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("render client %r for %s (Blender %s, %s, scripts %s)", args.name, where, blender_version(),
                 device.describe(), "allowed" if args.allow_scripts else "disabled")
        if isinstance(renderer, RenderProcess):
            try:
                renderer.start()  # warm before the first task comes
            except RenderCrash as exc:
                print(f"error: the render process could not start: {exc}", file=sys.stderr)
                return 2
        link.start()
        try:
            code = worker.run()
            log.info("stopped")
        finally:
            link.stop()
    if link.fatal:
        print(f"error: {printable(link.fatal)}", file=sys.stderr)
    return code
