"""Headless farm server: python -m server_addon --host 127.0.0.1 --port 9090 --output-dir DIR"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from protocol.discovery import interface_addresses
from protocol.errors import DiscoveryError
from protocol.secret import SecretError, add_secret_options, secret_from_args

from .app import FarmApp
from .core.config import MAX_CONNECTIONS, ServerConfig, ServerStartError

log = logging.getLogger("server_addon")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server_addon",
                                     description="Run a MicroFarm server without Blender.")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=9090,
                        help="TCP port for clients and tools (default: 9090; 0 picks a free one)")
    parser.add_argument("--output-dir", type=Path, default=Path("render_output"),
                        help="where job folders with frames are written")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="server state and .blend store (default: OUTPUT/.microfarm)")
    add_secret_options(parser)
    parser.add_argument("--farm-name", default=None, help="name shown to clients (default: host name)")
    parser.add_argument("--interface", dest="interfaces", action="append", default=None, metavar="ADDR",
                        help="answer discovery only on this interface (an address or a name like eth0; repeatable; "
                             "default: the --host address, or all interfaces for 0.0.0.0)")
    parser.add_argument("--no-discovery", dest="discovery", action="store_false",
                        help="do not advertise the farm on the LAN (zeroconf); clients then need --server")
    parser.add_argument("--web-port", type=int, default=None, metavar="PORT",
                        help="serve the web interface on this port (0 picks a free one; default: no web interface)")
    parser.add_argument("--web-host", default="127.0.0.1", metavar="ADDR",
                        help="address of the web interface (default: 127.0.0.1, this machine only)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics (/metrics, /api/queue, /healthz) on this port too (0 picks a "
                             "free one; the web interface serves them anyway); the farm secret is the bearer token")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                        help="address of the metrics port (default: 127.0.0.1; 0.0.0.0 for a scraper elsewhere)")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                        help=f"render clients connected at once (default: {MAX_CONNECTIONS}, fewer where the "
                             "open-files limit has no room; tools are counted apart)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    return parser.parse_args(argv)


async def serve(config: ServerConfig, discovery: bool = True, interfaces: Sequence[str] | None = None,
                web_port: int | None = None, web_host: str = "127.0.0.1", metrics_port: int | None = None,
                metrics_host: str = "127.0.0.1") -> None:
    app = FarmApp(config, discovery=discovery, interfaces=interfaces, web_port=web_port, web_host=web_host,
                  metrics_port=metrics_port, metrics_host=metrics_host)
    await app.start()
    try:
        # Lines a parent process can wait for (tests, the demo, the benchmark).
        print(f"MicroFarm server listening on {config.host}:{app.port}", flush=True)
        if app.web is not None:
            print(f"MicroFarm web interface on {app.web.url}", flush=True)
        if app.metrics is not None:
            print(f"MicroFarm metrics on {app.metrics.url}/metrics", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await app.advertised()
        await stop.wait()
    finally:
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        print(f"error: port {args.port} is not between 0 and 65535", file=sys.stderr)
        return 2
    for what, port in (("web port", args.web_port), ("metrics port", args.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            print(f"error: {what} {port} is not between 0 and 65535", file=sys.stderr)
            return 2
    try:
        secret = secret_from_args(args)
    except SecretError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_connections < 1:
        print(f"error: --max-connections {args.max_connections} must be at least 1", file=sys.stderr)
        return 2
    config = ServerConfig(output_dir=args.output_dir, host=args.host, port=args.port, data_dir=args.data_dir,
                          secret=secret, max_connections=args.max_connections)
    if args.farm_name:
        config.farm_name = args.farm_name
    interfaces = None
    if args.discovery and args.interfaces:
        try:
            interfaces = interface_addresses(args.interfaces)
        except DiscoveryError as exc:
            print(f"error: --interface: {exc}", file=sys.stderr)
            return 2
    try:
        asyncio.run(serve(config, args.discovery, interfaces, args.web_port, args.web_host, args.metrics_port,
                          args.metrics_host))
    except ServerStartError as exc:  # (and the web interface's WebStartError)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot start the server on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
