"""New jobs from the browser: a multipart upload streamed to disk, and its settings checked.

A job arrives as one .blend or one .zip of its project (a part named 'file'), or as a folder's files
(parts named 'files', each with its path relative to the folder as its file name), with the settings as
text fields and `main` naming the .blend to render in a project. Every file is read from the request in
chunks, hashed on the way and written into a private staging folder (see staging.py); nothing holds a
whole file in memory, and an upload larger than the limit is cut off with 413 as soon as it passes it.
The project is then traced there (projects.py), refused if the scene needs files it lacks (unless missing
files are allowed), and what the job needs is renamed into the content store by sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from protocol.blendfile import MAGIC_BYTES, looks_like_blend
from protocol.limits import MAX_PROJECT_FILES
from protocol.manifest import safe_blend_name
from protocol.names import clean_file_name, printable
from protocol.settings import JobRequest, SettingsError
from protocol.units import human_bytes

from ..core.actions import check_priority
from ..core.storage import StoreFull
from ..core.video import VideoSettings
from . import projects
from .errors import WebError
from .staging import Staging, looks_like_zip

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024
#: Writes go to disk off the loop in batches of about this size.
WRITE_BATCH_BYTES = 2 * 1024 * 1024
#: Room for the multipart envelope and the settings fields around the file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 1024
MAX_PARTS = 32
INT_FIELDS = ("frame_start", "frame_end", "frame_step", "chunk", "samples", "percentage", "split", "hang_s")
TEXT_FIELDS = ("name", "file_format", "priority", "start", "video", "video_quality", "video_location", "device",
               "allow_missing", "needs_scripts", "persistent_data", "blender")
#: Check boxes: "1"/"on"/"true" or "0"/"off"/"false"; absent is off.
BOOL_FIELDS = ("allow_missing", "needs_scripts", "persistent_data")
FILE_FIELD = "file"
#: A folder's files, one part each, named by their path relative to the folder.
FILES_FIELD = "files"
#: The relative path of the .blend to render in a project (default: the only .blend at its top level).
MAIN_FIELD = "main"
_INTEGER = re.compile(r"^[+-]?\d{1,12}$")
_TRUE = frozenset({"", "1", "true", "yes", "on", "start"})
_FALSE = frozenset({"0", "false", "no", "off", "queue"})


#: What aiohttp's multipart reader raises for a body it cannot parse (a raw newline in a file name breaks a part's
#: headers; a bad boundary, a body cut short, a header too long or in bad UTF-8, an unknown charset or encoding).
_MALFORMED = (HttpProcessingError, ValueError, RuntimeError, LookupError, AssertionError, EOFError)


@contextlib.contextmanager
def _well_formed() -> Iterator[None]:
    """Around each step of reading the multipart body: a body this reader cannot parse is the sender's error (400
    with a sentence), never the server's (500 and a traceback)."""
    try:
        yield
    except WebError:
        raise
    except _MALFORMED as exc:
        detail = exc.message if isinstance(exc, HttpProcessingError) and exc.message else str(exc)
        detail = printable(detail)[:200] or type(exc).__name__
        raise WebError(400, f"the upload is not well-formed multipart/form-data: {detail}") from None


@dataclass(frozen=True)
class JobOptions:
    request: JobRequest
    start: bool
    priority: int
    video: dict[str, Any] | None
    name: str | None


def parse_options(fields: dict[str, str]) -> JobOptions:
    """The job's settings from the form's text fields; raises WebError(400) naming the bad one."""
    raw: dict[str, Any] = {}
    try:
        for key in INT_FIELDS:
            raw[key] = _integer(key, fields.get(key, ""))
        raw["file_format"] = fields.get("file_format", "").strip() or None
        raw["device"] = fields.get("device", "").strip().upper() or None
        raw["blender"] = fields.get("blender", "").strip().lower() or None
        for key in BOOL_FIELDS:
            text = fields.get(key, "0").strip().lower() or "0"
            if text not in (_TRUE | _FALSE) - {"start", "queue"}:
                raise SettingsError(f"{key} must be 1 or 0, not {fields[key]!r}")
            raw[key] = text in _TRUE
        request = JobRequest.from_wire(raw)
        try:
            priority = check_priority(_integer("priority", fields.get("priority", "")) or 0)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        start_text = fields.get("start", "").strip().lower()
        if start_text not in _TRUE | _FALSE:
            raise SettingsError(f"start must be 1 (start now) or 0 (queue), not {fields['start']!r}")
        codec = fields.get("video", "").strip().lower()
        video = None
        if codec not in ("", "none"):
            wanted = {"codec": codec}
            for key in ("quality", "location"):
                value = fields.get(f"video_{key}", "").strip().lower()
                if value:
                    wanted[key] = value
            video = VideoSettings.from_wire(wanted).to_wire()
    except (SettingsError, ValueError) as exc:
        raise WebError(400, f"invalid job settings: {exc}") from None
    return JobOptions(request=request, start=start_text in _TRUE, priority=priority, video=video,
                      name=clean_file_name(fields.get("name", "")) or None)


def _integer(key: str, text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not _INTEGER.fullmatch(text):
        raise SettingsError(f"{key} must be a whole number, not {text!r}")
    return int(text)


class Budget:
    """The bytes one request may bring, all its files together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise WebError(413, f"the upload is larger than the {human_bytes(self.limit)} this farm accepts")


class Incoming:
    """One file arriving in pieces: hashed as it comes, written off the loop in batches to a file of the
    staging folder (a new file, created exclusively). Nothing holds the whole file in memory."""

    def __init__(self, out: BinaryIO, budget: Budget) -> None:
        self._file = out
        self.budget = budget
        self.size = 0
        self._digest = hashlib.sha256()
        self._batch: list[bytes] = []
        self._batched = 0

    async def write(self, data: bytes) -> None:
        self.budget.take(len(data))
        self.size += len(data)
        self._digest.update(data)
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= WRITE_BATCH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        data, self._batch, self._batched = b"".join(self._batch), [], 0
        if data:
            await asyncio.to_thread(self._file.write, data)

    async def finish(self) -> str:
        """Write what is left and close the file; returns the sha256."""
        await self._flush()
        await asyncio.to_thread(self._file.close)
        return self._digest.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


async def receive_job(request: web.Request, server: Any, max_upload_bytes: int) -> tuple[dict[str, Any],
                                                                                      dict[str, Any]]:
    """Read a multipart job submission (a .blend, a .zip or a folder's files), trace it, store what the job
    needs and create the job; returns the job's view and the summary of what travels."""
    if request.content_type != "multipart/form-data":
        raise WebError(415, "send the job as multipart/form-data with the .blend in a part named 'file'")
    if request.content_length is not None and request.content_length > max_upload_bytes + MULTIPART_OVERHEAD_BYTES:
        raise WebError(413, f"the upload of {human_bytes(request.content_length)} is larger than the "
                            f"{human_bytes(max_upload_bytes)} this farm accepts")
    if request.content_length is not None:
        try:  # the upload is staged on the store's disk, and renamed into the store from there
            server.files.check_room(request.content_length)
        except StoreFull as exc:
            raise WebError(507, str(exc)) from None
    with _well_formed():
        reader = await request.multipart()
    data_dir = server.config.resolved_data_dir
    staging = await asyncio.to_thread(Staging.create, data_dir)
    try:
        return await _receive(request, server, reader, staging, Budget(max_upload_bytes), data_dir)
    finally:
        try:
            await asyncio.to_thread(staging.remove)
        except asyncio.CancelledError:
            staging.remove()
            raise


async def _receive(request: web.Request, server: Any, reader: MultipartReader, staging: Staging, budget: Budget,
                   data_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    fields: dict[str, str] = {}
    kind = ""  # "blend", "zip" or "folder"
    filename = ""
    for _ in range(MAX_PARTS + MAX_PROJECT_FILES + 1):
        with _well_formed():
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise WebError(400, "nested multipart bodies are not accepted")
            part.name, part.filename  # noqa: B018 - their header parsed here, where a bad one is the sender's
        if part.name in (FILE_FIELD, FILES_FIELD):
            if kind and not (kind == "folder" and part.name == FILES_FIELD):
                raise WebError(400, f"send one .blend or one .zip per job in a part named '{FILE_FIELD}', or a "
                                    f"folder's files in parts named '{FILES_FIELD}'")
            if not kind:
                parse_options(fields)  # settings sent before the files are checked before anything is stored
            if part.name == FILE_FIELD:
                filename = part.filename or ""
                kind = await _receive_file(request, part, staging, budget)
            else:
                kind = "folder"
                relpath = staging.claim(part.filename or "")
                sha, size = await _stream(request, part, await asyncio.to_thread(staging.open_new, relpath), budget)
                staging.add(relpath, sha, size)
        elif part.name in INT_FIELDS or part.name in TEXT_FIELDS or part.name == MAIN_FIELD:
            fields[part.name] = await _read_field(part)
        else:
            raise WebError(400, f"unknown field {part.name!r}; known: {', '.join((*INT_FIELDS, *TEXT_FIELDS))}, "
                                f"{MAIN_FIELD}, {FILE_FIELD} and {FILES_FIELD}")
    else:
        raise WebError(400, f"a job upload has at most {MAX_PARTS} fields and {MAX_PROJECT_FILES} files")
    if not kind:
        raise WebError(400, f"the upload has no .blend: send it (or a .zip of the project) in a part named "
                            f"'{FILE_FIELD}', or a folder's files in parts named '{FILES_FIELD}'")
    options = parse_options(fields)
    if kind == "zip":
        await asyncio.to_thread(staging.extract_zip, budget.limit)
    uploaded = (len(staging.files), sum(f.size for f in staging.files.values()))
    if kind == "blend":
        main = next(iter(staging.files.values()))
    else:
        main = projects.choose_main(staging, fields.get(MAIN_FIELD, "").strip() or None)
    plan = await asyncio.to_thread(projects.plan_project, staging, main, single=kind == "blend",
                                   hidden=data_dir.resolve(), limit=budget.limit)
    if (plan.missing or plan.outside) and not options.request.allow_missing:
        projects.refuse_missing(plan)
    if kind == "blend":
        name = options.name or clean_file_name(filename) or "untitled.blend"
        project = None  # the .blend alone keeps the job's name, as it always has
    else:
        name = options.name or clean_file_name(main.relpath)
        project = plan.manifest
    shas = {f.sha256 for f in plan.files}
    job = None
    try:
        # Pinned from before commit asks the store what it has until the job exists (see ContentStore.pinned).
        with server.files.pinned(shas):
            counts = await asyncio.to_thread(projects.commit, staging, plan, server.files)
            server.stats.upload_bytes_received += counts[1]
            server.stats.files_received += counts[0]
            try:
                job = server.create_job(name, main.sha256, main.size, options.request, start=options.start,
                                        priority=options.priority, video=options.video, project=project,
                                        warnings=plan.warnings())
            except ValueError as exc:
                raise WebError(400, str(exc)) from None
    finally:
        if job is None:
            server.collect_files(shas)
    summary = projects.summary(plan, counts, *uploaded)
    log.info("job %s: uploaded from the web by %s (%s: %d files, %s; %d new, %s stored; %d missing)", job.id,
             request.remote, name, summary["files"], human_bytes(summary["bytes"]), counts[0],
             human_bytes(counts[1]), len(plan.missing) + len(plan.outside))
    return job.view(), summary


async def _receive_file(request: web.Request, part: BodyPartReader, staging: Staging, budget: Budget) -> str:
    """The part named 'file': a .zip (kept whole in the staging folder, unpacked later) or a .blend."""
    head = b""
    while len(head) < MAGIC_BYTES and (chunk := await _chunk(request, part)):
        head += chunk
    if not head:
        raise WebError(400, "the uploaded file is empty")
    if looks_like_zip(head):
        out, kind = await asyncio.to_thread(open, staging.archive, "xb"), "zip"
    elif looks_like_blend(head):
        relpath = staging.claim(safe_blend_name(part.filename or "scene.blend"))
        out, kind = await asyncio.to_thread(staging.open_new, relpath), "blend"
    else:
        raise WebError(400, "the file is not a .blend (it does not start with a Blender file header) nor a .zip")
    sha, size = await _stream(request, part, out, budget, head)
    if kind == "blend":
        staging.add(relpath, sha, size)
    return kind


async def _stream(request: web.Request, part: BodyPartReader, out: BinaryIO, budget: Budget,
                  head: bytes = b"") -> tuple[str, int]:
    incoming = Incoming(out, budget)
    try:
        if head:
            await incoming.write(head)
        while chunk := await _chunk(request, part):
            await incoming.write(chunk)
        return await incoming.finish(), incoming.size
    except BaseException:
        incoming.abort()
        raise


async def _chunk(request: web.Request, part: BodyPartReader) -> bytes:
    try:
        with _well_formed():
            return await part.read_chunk(READ_CHUNK_BYTES)
    except ConnectionError:
        log.info("web upload from %s stopped by the browser", request.remote)
        raise WebError(400, "the upload was interrupted") from None


async def _read_field(part: BodyPartReader) -> str:
    data = b""
    while True:
        with _well_formed():
            chunk = await part.read_chunk(MAX_FIELD_BYTES)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise WebError(413, f"the field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise WebError(400, f"the field {part.name!r} is not UTF-8 text") from None
