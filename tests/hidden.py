"""Render clients that cannot see a folder: each runs in its own mount namespace (`unshare --mount`) with an
empty tmpfs mounted over the folder, so the path exists but holds nothing, as on another machine.

Needs root (or an unprivileged user namespace) and util-linux's unshare; without them the tests that use
it are skipped with the reason, unless CI=true: there they fail, so that the coverage is never lost quietly.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Clients

from tools.localfarm import REPO, repo_env

#: Mounts the tmpfs, then becomes the client (exec: the process the test holds is the client itself).
_HIDE = 'mount -t tmpfs -o size=1m microfarm-hidden "$0" && exec "$@"'


@functools.cache
def hiding_unavailable() -> str:
    """'' when a process can be given a mount namespace here, else why not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "util-linux unshare/mount are not installed"
    try:
        probe = subprocess.run(["unshare", "--mount", "sh", "-c", _HIDE, "/mnt", "true"], capture_output=True,
                               text=True, timeout=30)
    except OSError as exc:
        return f"unshare cannot run: {exc}"
    if probe.returncode != 0:
        return f"cannot make a mount namespace with a tmpfs (needs root): {probe.stderr.strip()}"
    return ""


def require_hiding() -> None:
    why = hiding_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"clients cannot be kept from the project folder: {why}")
        pytest.skip(f"clients cannot be kept from the project folder: {why}")


def start_hidden(clients: Clients, name: str, server: str, hidden: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A real client (python -m client) for which `hidden` is an empty folder. Its cache and log must lie
    outside `hidden`."""
    require_hiding()
    cache, log_path = clients.root / f"cache-{name}", clients.root / f"client-{name}.log"
    for path in (cache, log_path):
        assert not path.resolve().is_relative_to(hidden.resolve()), f"{path} would be hidden from the client"
    command = [sys.executable, "-m", "client", "--server", server, "--name", name, "--cache-dir", str(cache), *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", _HIDE,
                                 str(hidden), *command], cwd=REPO, env=repo_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    clients.procs[name] = proc
    return proc


def listing(hidden: Path) -> list[str]:
    """What a client started by start_hidden sees in `hidden` (nothing)."""
    require_hiding()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _HIDE, str(hidden),
                           sys.executable, "-c", "import os, sys; print('\\n'.join(os.listdir(sys.argv[1])))",
                           str(hidden)], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()
