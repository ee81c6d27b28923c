"""Start a farm on this machine: a headless server and render clients as subprocesses on 127.0.0.1.

Used by the demo and the benchmarks (and the tests start their clients the same way).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 30.0
_LISTENING = re.compile(rb"listening on \S+:(\d+)")


def repo_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_client(server: str | None, name: str, cache_dir: Path, log_path: Path, *extra: str,
                 as_script: bool = False, token: str | None = None,
                 wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """A render client process; as_script runs client/__main__.py by path, as Blender's --python does.
    With server None the client finds its farm by discovery (pass --interface in extra). `wrapper` goes
    before the command, e.g. ("taskset", "-c", "1") to pin the client and its render process to core 1."""
    entry = [str(REPO / "client" / "__main__.py"), "--"] if as_script else ["-m", "client"]
    target = ["--server", server] if server is not None else []
    env = repo_env()
    if token:
        env["MICROFARM_TOKEN"] = token  # not --token: the process list is readable by every local user
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [*wrapper, sys.executable, *entry, *target, "--name", name, "--cache-dir", str(cache_dir), *extra],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_server(output: Path, log_path: Path, *, port: int = 0, token: str | None = None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], int]:
    """A headless server on 127.0.0.1; returns the process and the port it listens on."""
    # Discovery (zeroconf) stays on loopback: a local farm is nothing to announce to the LAN.
    cmd = [sys.executable, "-m", "server_addon", "--host", "127.0.0.1", "--port", str(port), "--interface", "127.0.0.1",
           "--output-dir", str(output), "--farm-name", "local", *extra]
    env = repo_env()
    if token:
        env["MICROFARM_TOKEN"] = token
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = _LISTENING.search(line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the server did not start; see {log_path}")


class LocalFarm:
    """A headless server subprocess plus N clients, all on 127.0.0.1; stopped on exit."""

    def __init__(self, root: Path, clients: int = 2, *, token: str | None = None,
                 client_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.output = root / "frames"
        self.client_count = clients
        self.token = token
        self.client_args = client_args  # extra command-line options for every client
        self.server: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.clients: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalFarm:
        self.root.mkdir(parents=True, exist_ok=True)
        self.server, self.port = start_server(self.output, self.root / "server.log", token=self.token)
        for i in range(1, self.client_count + 1):
            self.add_client(f"client-{i}", *self.client_args)
        return self

    def add_client(self, name: str, *extra: str, wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        proc = start_client(self.address, name, self.root / "cache" / name, self.root / f"{name}.log", *extra,
                            token=self.token, wrapper=wrapper)
        self.clients.append(proc)
        return proc

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        procs = [*self.clients, *([self.server] if self.server else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
