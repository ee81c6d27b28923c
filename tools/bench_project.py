"""`python -m tools.bench project`: a large project travels through a local farm; memory stays bounded.

    python -m tools.bench project [--size-mb 2048] [--files 500] [--keep DIR]

Generates a project of N files totalling SIZE: the tools.projects scene whose cube shows the image sequence
//seq/flip_0001.png, and N-2 more files of that sequence holding random bytes (the tracer takes every file
of a sequence; the one frame rendered reads only the first). It is traced and submitted, as tools.submit
does, to a headless server on 127.0.0.1 with one client, which downloads every file, lays the job out and
renders frame 1. A second submission of the same project follows. Prints JSON on its last line: the peak
resident memory (VmHWM) of the server, the client and this submitting process, when idle and at the end;
the bytes uploaded and the time of the upload (hashing included) and of the client's download; the bytes
the second submission uploaded and the client downloaded for it (both 0 when the stores work).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from server_addon.core.trace import traced

from .control import Control, ToolError, UploadPlan
from .localfarm import REPO, LocalFarm, repo_env

WRITE_BLOCK = 1024 * 1024
POLL_S = 0.05
JOB_TIMEOUT_S = 1800.0
_DOWNLOAD_LINE = re.compile(r"^(\S+ \S+) INFO .*?file [0-9a-f]{12} (downloaded and verified|\()", re.M)


def peak_rss(pid: int | str = "self") -> dict[str, int]:
    """{"hwm": peak resident bytes, "rss": resident bytes now} of a process (Linux /proc)."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values["hwm" if key == "VmHWM" else "rss"] = int(rest.split()[0]) * 1024
    return values


def make_project(root: Path, size: int, files: int) -> Path:
    """root/scene.blend plus files-1 sequence frames, together `size` bytes; returns the .blend."""
    subprocess.run([sys.executable, "-m", "tools.projects", str(root), "--sequence", "--frames", "1"], cwd=REPO,
                   env=repo_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blend = root / "scene.blend"
    have = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    extra = max(files - 2, 0)
    each = max((size - have) // extra, 0) if extra else 0
    for index in range(extra):
        left = each
        with open(root / "seq" / f"flip_{index + 2:04d}.png", "wb") as handle:
            while left > 0:
                block = os.urandom(min(WRITE_BLOCK, left))
                handle.write(block)
                left -= len(block)
    return blend


async def _submit(address: str, blend: Path) -> tuple[str, UploadPlan, float]:
    plans: list[UploadPlan] = []
    started = time.monotonic()
    control = await Control.connect(address, None)
    try:
        with traced(blend) as trace:
            if trace.missing:
                raise ToolError(f"the generated project misses files: {trace.missing}")
            job_id, _ = await control.submit(blend, {"frame_start": 1, "frame_end": 1, "file_format": "PNG"},
                                             files=trace.pairs(), main=trace.main, on_plan=plans.append)
    finally:
        await control.close()
    return job_id, plans[0], time.monotonic() - started


async def _follow(address: str, job_id: str, pids: dict[str, int], peaks: dict[str, int]) -> dict[str, Any]:
    """Wait for the job to settle, sampling memory on the way."""
    control = await Control.connect(address, None)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            status = await control.status()
            for name, pid in pids.items():
                peaks[name] = max(peaks.get(name, 0), peak_rss(pid)["rss"])
            job = next((j for j in status.jobs if j["id"] == job_id), None)
            if job is not None and job["state"] in ("done", "failed", "cancelled"):
                return job
            await asyncio.sleep(POLL_S)
    finally:
        await control.close()
    raise ToolError(f"job {job_id} did not finish within {JOB_TIMEOUT_S:.0f} s")


def _downloads(farm: LocalFarm, since: int = 0) -> tuple[int, float, int]:
    """(files downloaded, seconds from the first request to the last file verified) in the client's log after
    character `since`, and the log's length."""
    text = (farm.root / "client-1.log").read_text(errors="replace")
    stamps = [(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2))
              for m in _DOWNLOAD_LINE.finditer(text, since)]
    done = [when for when, what in stamps if what == "downloaded and verified"]
    seconds = (done[-1] - stamps[0][0]).total_seconds() if done else 0.0
    return len(done), seconds, len(text)


def project(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if args.files < 2 or args.size_mb < 1:
        raise ToolError("--files must be at least 2 and --size-mb at least 1")
    size = args.size_mb * 1024 * 1024
    print(f"project: {args.files} files, {args.size_mb} MB", file=sys.stderr)
    blend = make_project(root / "project", size, args.files)
    total = sum(p.stat().st_size for p in (root / "project").rglob("*") if p.is_file())
    with LocalFarm(root / "farm", clients=1) as farm:
        from .bench import _wait_clients

        asyncio.run(_wait_clients(farm.address, 1))
        assert farm.server is not None
        pids = {"server": farm.server.pid, "client": farm.clients[0].pid}
        idle = {name: peak_rss(pid)["hwm"] for name, pid in pids.items()}
        sampled: dict[str, int] = {}
        print("first submission", file=sys.stderr)
        job_id, plan, upload_s = asyncio.run(_submit(farm.address, blend))
        job = asyncio.run(_follow(farm.address, job_id, pids, sampled))
        if job["state"] != "done":
            raise ToolError(f"the job ended {job['state']}: {job.get('error')}")
        downloads, download_s, seen = _downloads(farm)
        print("second submission", file=sys.stderr)
        job2_id, plan2, upload2_s = asyncio.run(_submit(farm.address, blend))
        job2 = asyncio.run(_follow(farm.address, job2_id, pids, sampled))
        if job2["state"] != "done":
            raise ToolError(f"the second job ended {job2['state']}: {job2.get('error')}")
        end = {name: peak_rss(pid)["hwm"] for name, pid in pids.items()}
        second_downloads, second_download_s, _ = _downloads(farm, seen)
    mib = 1024 * 1024
    return {
        "benchmark": "project", "files": len(plan.manifest.files), "project_bytes": total,
        "peak_rss_mib": {"server": round(end["server"] / mib, 1), "client": round(end["client"] / mib, 1),
                         "submitter": round(peak_rss()["hwm"] / mib, 1)},
        "idle_peak_rss_mib": {name: round(value / mib, 1) for name, value in idle.items()},
        "sampled_max_rss_mib": {name: round(value / mib, 1) for name, value in sampled.items()},
        "bytes_sent": plan.upload_bytes, "files_sent": len(plan.need), "upload_s": round(upload_s, 2),
        "upload_mib_s": round(plan.upload_bytes / mib / upload_s, 1) if upload_s else None,
        "download_s": round(download_s, 2), "files_downloaded": downloads,
        "second_bytes_sent": plan2.upload_bytes, "second_upload_s": round(upload2_s, 2),
        "second_download_s": round(second_download_s, 2),
        "second_files_downloaded": second_downloads,
    }


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("project", help="a large project through a local farm: peak memory, bytes and times")
    bench.add_argument("--size-mb", type=int, default=2048, help="total size of the project (default: 2048)")
    bench.add_argument("--files", type=int, default=500, help="files in the project, the .blend included "
                                                              "(default: 500)")
    bench.add_argument("--keep", default=None, help="keep the project, the stores and the logs in this folder")
