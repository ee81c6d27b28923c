"""One Blender per job: which clients' Blender may render a job, and why a job waits. Pure logic.

A client never gets a file saved by a newer Blender (older versions cannot read newer files, and
5.0 changed the file header altogether). Beyond that, a job's frames all come from one Blender
version, because versions render the same scene differently (a sequence from two versions
flickers): the submitter may name the version ("file": the one that saved the .blend; "4.5": any
4.5.x; "4.5.15": exactly), and the first client that renders a frame pins the job to its exact
version. When several versions could start a job, it goes to the one most connected clients run.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from protocol.blendfile import BlenderVersion
from protocol.settings import BLENDER_FILE

from .jobs import ClientRecord, Job

#: What a client that reports no Blender version is pinned as (an empty pin would mean "not pinned").
UNKNOWN = "unknown"


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> BlenderVersion | None:
    """A version text parsed once: the scheduler asks about every client for every job."""
    return BlenderVersion.parse(text)


@functools.lru_cache(maxsize=256)
def _pin_name(text: str) -> str:
    parsed = _parse(text)
    return str(parsed) if parsed is not None else (text.strip() or UNKNOWN)


def client_version(client: ClientRecord) -> str:
    """A client's version as jobs are pinned to it: '4.2.23' for '4.2.23 LTS'; the raw text if unreadable."""
    return _pin_name(client.blender)


def can_open(job: Job, client: ClientRecord) -> bool:
    """The client's Blender is not older than the one that saved the job's file."""
    if job.file_blender is None:
        return True
    parsed = _parse(client.blender)
    return parsed is not None and parsed.line >= job.file_blender.line


def version_fits(job: Job, client: ClientRecord) -> bool:
    """May this client's Blender render (or probe) the job?"""
    return _fits(client.blender, job.file_blender, job.pinned_blender, job.request.blender)


@functools.lru_cache(maxsize=1024)
def _fits(blender: str, file_blender: BlenderVersion | None, pinned: str, wanted: str | None) -> bool:
    """version_fits on what it depends on, answered once for each (the scheduler asks about every client for
    every job, and a farm's clients run a few versions)."""
    parsed = _parse(blender)
    if file_blender is not None and (parsed is None or parsed.line < file_blender.line):
        return False  # (can_open)
    if pinned:
        return _pin_name(blender) == pinned
    if wanted is None:
        return True
    if parsed is None:
        return False
    if wanted == BLENDER_FILE:
        return file_blender is None or parsed.line == file_blender.line
    target = _parse(wanted)
    if target is None:
        return False
    return parsed.line == target.line if target.patch is None else parsed == target


def preferred_version(job: Job, candidates: Iterable[ClientRecord]) -> str | None:
    """The version an unpinned job should be pinned to, among clients that may render it: the one most of
    them run; on a tie the file's own release line, then the oldest (the closest to the file; a client
    claiming a made-up newer version wins nothing by it)."""
    counts = Counter(client_version(c) for c in candidates)
    if not counts:
        return None
    file_line = job.file_blender.line if job.file_blender else None

    def rank(version: str) -> tuple[int, bool, tuple[int, ...]]:
        parsed = BlenderVersion.parse(version)
        numbers = (-parsed.major, -parsed.minor, -(parsed.patch or 0)) if parsed else (-10**6,)
        return counts[version], parsed is not None and parsed.line == file_line, numbers
    return max(counts, key=rank)


def wanted_sentence(job: Job) -> str:
    """'Blender 5.0 or newer', 'Blender 4.5.15 (...)': what a client must run to take the job."""
    if job.pinned_blender:
        return f"Blender {job.pinned_blender} (its first frames were rendered with it)"
    wanted = job.request.blender
    if wanted == BLENDER_FILE and job.file_blender is not None:
        return f"Blender {job.file_blender} (the version that saved the file)"
    if wanted and wanted != BLENDER_FILE:
        return f"Blender {wanted}"
    if job.file_blender is not None:
        return f"Blender {job.file_blender} or newer"
    return "any Blender"


def connected_summary(clients: Iterable[ClientRecord]) -> str:
    """'4.2.23 ×2, 5.0.1' for the connected clients; 'none' when there are none."""
    counts = Counter(client_version(c) or "unknown" for c in clients)
    if not counts:
        return "none"
    return ", ".join(v if n == 1 else f"{v} ×{n}" for v, n in sorted(counts.items(), key=_version_key))


def _version_key(item: tuple[str, int]) -> tuple:
    parsed = BlenderVersion.parse(item[0])
    return (0, parsed.major, parsed.minor, parsed.patch or 0) if parsed else (1, item[0])


def job_blender(job: Mapping[str, Any]) -> str:
    """The Blender a job renders with ('4.5.15'), or what it asks for until a client took it ('5.0+', '4.5')."""
    if job.get("blender"):
        return job["blender"]
    wanted, saved = job.get("blender_request"), job.get("blender_file")
    if wanted == "file":
        return saved or "file"
    if wanted:
        return wanted
    return f"{saved}+" if saved else "any"
