#!/usr/bin/env python3
"""The containers' entry command: MICROFARM_* environment variables -> the server's or the client's options.

    entrypoint.py server [EXTRA OPTIONS...]    python -m server_addon, headless, web and metrics on
    entrypoint.py client [EXTRA OPTIONS...]    python -m client, given its server (no zeroconf in a cluster)
    entrypoint.py health-server | health-client    the images' health checks (exit 0: healthy)

The process is replaced by the server or the client (exec), so the stop signal (SIGTERM from Kubernetes, passed
on by tini) reaches it directly. The secret is never put on a command line: MICROFARM_TOKEN is read by the
server and the client themselves, MICROFARM_TOKEN_FILE (a mounted Secret) becomes --token-file.

Server: MICROFARM_HOST (0.0.0.0), MICROFARM_PORT (9090), MICROFARM_WEB_PORT (8080), MICROFARM_METRICS_PORT
(9100), MICROFARM_DATA (/data: output/ and state/ in it), MICROFARM_FARM_NAME, MICROFARM_MAX_CONNECTIONS.
Client: MICROFARM_SERVER (host:port, several separated by commas; required), MICROFARM_NAME (default: the host
name, a pod's name), MICROFARM_DEVICE (auto), MICROFARM_GPU_INDEX, MICROFARM_THREADS, MICROFARM_CACHE_DIR
(/cache), MICROFARM_CACHE_MAX, MICROFARM_DRAIN_TIMEOUT (25), MICROFARM_ALLOW_SCRIPTS (1/true/yes),
MICROFARM_HEALTH_FILE (/tmp/microfarm-alive). Both: MICROFARM_TOKEN or MICROFARM_TOKEN_FILE, MICROFARM_VERBOSE.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

#: The client's health file is touched by its network thread every few seconds; older than this: unhealthy.
CLIENT_HEALTH_MAX_AGE_S = 60.0
DEFAULT_HEALTH_FILE = "/tmp/microfarm-alive"


class ConfigError(Exception):
    pass


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _options(env: Mapping[str, str], table: list[tuple[str, str, str | None]]) -> list[str]:
    """(variable, option, default): the option with the variable's value, or its default (None: left out)."""
    args: list[str] = []
    for variable, option, default in table:
        value = env.get(variable, "").strip() or default
        if value is not None:
            args += [option, value]
    return args


def _common(env: Mapping[str, str]) -> list[str]:
    args = _options(env, [("MICROFARM_TOKEN_FILE", "--token-file", None)])
    return args + (["--verbose"] if _flag(env, "MICROFARM_VERBOSE") else [])


def server_command(env: Mapping[str, str], extra: list[str]) -> list[str]:
    data = env.get("MICROFARM_DATA", "").strip() or "/data"
    host = env.get("MICROFARM_HOST", "").strip() or "0.0.0.0"  # (a pod's every address: Services reach it there)
    args = ["-m", "server_addon", "--host", host, "--no-discovery", "--web-host", host, "--metrics-host", host,
            "--output-dir", f"{data}/output", "--data-dir", f"{data}/state"]
    args += _options(env, [("MICROFARM_PORT", "--port", "9090"), ("MICROFARM_WEB_PORT", "--web-port", "8080"),
                           ("MICROFARM_METRICS_PORT", "--metrics-port", "9100"),
                           ("MICROFARM_FARM_NAME", "--farm-name", None),
                           ("MICROFARM_MAX_CONNECTIONS", "--max-connections", None)])
    return [sys.executable, *args, *_common(env), *extra]


def client_command(env: Mapping[str, str], extra: list[str]) -> list[str]:
    servers = [s.strip() for s in env.get("MICROFARM_SERVER", "").split(",") if s.strip()]
    if not servers:
        raise ConfigError("MICROFARM_SERVER is not set: give the farm server as host:port (in Kubernetes, its "
                          "Service's name and port)")
    args = ["-m", "client", "--no-discovery"]
    for server in servers:
        args += ["--server", server]
    args += _options(env, [("MICROFARM_NAME", "--name", env.get("HOSTNAME") or None),
                           ("MICROFARM_DEVICE", "--device", None), ("MICROFARM_GPU_INDEX", "--gpu-index", None),
                           ("MICROFARM_THREADS", "--threads", None), ("MICROFARM_CACHE_DIR", "--cache-dir", "/cache"),
                           ("MICROFARM_CACHE_MAX", "--cache-max", None),
                           ("MICROFARM_DRAIN_TIMEOUT", "--drain-timeout", None),
                           ("MICROFARM_HEALTH_FILE", "--health-file", DEFAULT_HEALTH_FILE)])
    if _flag(env, "MICROFARM_ALLOW_SCRIPTS"):
        args.append("--allow-scripts")
    return [sys.executable, *args, *_common(env), *extra]


def server_healthy(env: Mapping[str, str]) -> bool:
    port = env.get("MICROFARM_METRICS_PORT", "").strip() or "9100"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def client_healthy(env: Mapping[str, str]) -> bool:
    path = env.get("MICROFARM_HEALTH_FILE", "").strip() or DEFAULT_HEALTH_FILE
    try:
        return time.time() - os.stat(path).st_mtime < CLIENT_HEALTH_MAX_AGE_S
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("server", "client", "health-server", "health-client"):
        print("usage: entrypoint.py server|client|health-server|health-client [OPTIONS...]", file=sys.stderr)
        return 2
    what, extra, env = argv[0], argv[1:], os.environ
    if what == "health-server":
        return 0 if server_healthy(env) else 1
    if what == "health-client":
        return 0 if client_healthy(env) else 1
    try:
        command = server_command(env, extra) if what == "server" else client_command(env, extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # (not reached)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
