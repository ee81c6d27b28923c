"""What the benchmarks that render through a local farm share: waiting for clients, running one job, reading
each frame's render time back, rendering the same frames in one plain bpy process, slowing a client down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .control import Control, ToolError
from .localfarm import REPO, repo_env

CLIENTS_READY_TIMEOUT_S = 60.0
#: A throttled render process runs for 1/factor of each period and is stopped for the rest.
THROTTLE_PERIOD_S = 0.1


async def wait_clients(address: str, count: int) -> None:
    control = await Control.connect(address, None)
    try:
        deadline = time.monotonic() + CLIENTS_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            status = await control.status()
            if sum(1 for c in status.clients if c["state"] == "idle") >= count:
                return
            await asyncio.sleep(0.2)
        raise ToolError(f"{count} clients did not connect within {CLIENTS_READY_TIMEOUT_S:.0f} s")
    finally:
        await control.close()


@dataclass
class JobRun:
    """One job through the farm: seconds from the submission to the job's end, and to its first rendering."""

    elapsed_s: float
    job: dict[str, Any]
    rendering_after_s: float | None = None  # when the watch first saw it rendering (probe done)
    done_at: list[float] = field(default_factory=list)  # seconds after submission each new frame was seen

    def check(self, label: str) -> None:
        if self.job.get("state") != "done":
            raise ToolError(f"the {label} job ended {self.job.get('state')}: {self.job.get('error')}")


async def run_job(address: str, blend: Path, settings: dict[str, Any]) -> JobRun:
    control = await Control.connect(address, None)
    try:
        started = time.monotonic()
        job_id, _ = await control.submit(blend, {"chunk": 4, "file_format": "PNG", **settings})
        run = JobRun(0.0, {})
        done = 0
        async for update in control.watch(job_id):
            now = time.monotonic() - started
            if run.rendering_after_s is None and update.get("state") == "rendering":
                run.rendering_after_s = now
            run.done_at += [now] * max(0, (update.get("frames_done") or 0) - done)
            done = max(done, update.get("frames_done") or 0)
            run.job = update
        run.elapsed_s = time.monotonic() - started
        return run
    finally:
        await control.close()


def frame_times(output: Path, job_id: str) -> dict[int, tuple[str, float]]:
    """Frame number -> (the client that rendered it, its render seconds as the client reported them), from the
    server's job database (read once the server stopped, so that every row is written)."""
    path = output / ".microfarm" / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT number, rendered_by, render_s FROM frames WHERE job_id = ? AND done = 1",
                          (job_id,)).fetchall()
    return {number: (client, render_s) for number, client, render_s in rows if render_s is not None}


def render_local(blend: Path, start: int, end: int, out: Path, *extra: str,
                 wrapper: tuple[str, ...] = ()) -> dict[str, Any]:
    """tools.render_local in its own bpy process: {"local_s", "frames", "frame_s"}."""
    result = subprocess.run([*wrapper, sys.executable, "-m", "tools.render_local", str(blend), str(start), str(end),
                             str(out), *extra], cwd=REPO, env=repo_env(), check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_scene(out: Path, *args: str) -> Path:
    subprocess.run([sys.executable, "-m", "tools.scenes", str(out), *args], cwd=REPO, env=repo_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def cpus() -> list[int]:
    """The cores this process may run on (what taskset can pin to)."""
    return sorted(os.sched_getaffinity(0))


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


class Throttle:
    """A slower machine: the render processes under a client run 1/factor of the time (SIGSTOP, SIGCONT), so on
    a core of their own they render `factor` times slower. The client itself (its network) is not stopped."""

    def __init__(self, pid: int, factor: float) -> None:
        self.pid, self.factor = pid, factor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="throttle", daemon=True)

    def __enter__(self) -> Throttle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._signal(signal.SIGCONT, _descendants(self.pid))

    def _signal(self, sig: int, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _run(self) -> None:
        running = THROTTLE_PERIOD_S / self.factor
        while not self._stop.is_set():
            pids = _descendants(self.pid)
            self._signal(signal.SIGCONT, pids)
            time.sleep(running)
            self._signal(signal.SIGSTOP, pids)
            self._stop.wait(THROTTLE_PERIOD_S - running)
