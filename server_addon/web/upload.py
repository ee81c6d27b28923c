"""New jobs from the browser: a multipart upload streamed to disk, and its settings checked.

The .blend is read from the request in chunks, hashed on the way and written to a temporary file
in the blend store; its sha256 is known only at the end, when the file is renamed to <sha>.blend
(or dropped, when the store already has it). Nothing holds the whole file in memory, a file
larger than the limit is cut off with 413 as soon as it passes the limit, and a file that does not
start with a .blend header is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from protocol.limits import MAX_NAME_CHARS
from protocol.settings import JobRequest, SettingsError

from ..core.storage import PARTIAL_PREFIX, BlendStore
from ..core.video import VideoSettings
from .errors import WebError

log = logging.getLogger(__name__)

#: How a .blend starts: plain, zstd-compressed (Blender 3.0+) or gzip-compressed (older Blenders).
BLEND_MAGICS = (b"BLENDER", b"\x28\xb5\x2f\xfd", b"\x1f\x8b")
MAGIC_BYTES = max(len(magic) for magic in BLEND_MAGICS)
READ_CHUNK_BYTES = 256 * 1024
#: Writes go to disk off the loop in batches of about this size.
WRITE_BATCH_BYTES = 2 * 1024 * 1024
#: Room for the multipart envelope and the settings fields around the file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 1024
MAX_PARTS = 32
MAX_PRIORITY = 1_000_000
INT_FIELDS = ("frame_start", "frame_end", "frame_step", "chunk", "samples", "percentage", "split")
TEXT_FIELDS = ("name", "file_format", "priority", "start", "video", "video_quality", "video_location", "device",
               "allow_missing", "needs_scripts", "blender")
#: Check boxes: "1"/"on"/"true" or "0"/"off"/"false"; absent is off.
BOOL_FIELDS = ("allow_missing", "needs_scripts")
FILE_FIELD = "file"
_INTEGER = re.compile(r"^[+-]?\d{1,12}$")
_TRUE = frozenset({"", "1", "true", "yes", "on", "start"})
_FALSE = frozenset({"0", "false", "no", "off", "queue"})


@dataclass(frozen=True)
class JobOptions:
    request: JobRequest
    start: bool
    priority: int
    video: dict[str, Any] | None
    name: str | None


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


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
        priority = _integer("priority", fields.get("priority", "")) or 0
        if abs(priority) > MAX_PRIORITY:
            raise SettingsError(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}, not {priority}")
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
                      name=clean_name(fields.get("name", "")) or None)


def _integer(key: str, text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not _INTEGER.fullmatch(text):
        raise SettingsError(f"{key} must be a whole number, not {text!r}")
    return int(text)


def clean_name(name: str) -> str:
    """A job name from a file name: its last path part, printable characters only, bounded."""
    base = re.split(r"[\\/]", name)[-1]
    return "".join(ch for ch in base if ch.isprintable()).strip()[:MAX_NAME_CHARS]


def looks_like_blend(head: bytes) -> bool:
    return any(head.startswith(magic) for magic in BLEND_MAGICS)


class BlendUpload:
    """A .blend arriving in pieces: written to a temporary file in the store, hashed as it comes."""

    def __init__(self, store: BlendStore, limit: int) -> None:
        fd, name = tempfile.mkstemp(dir=store.root, prefix=PARTIAL_PREFIX, suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.store = store
        self.limit = limit
        self.size = 0
        self._digest = hashlib.sha256()
        self._head = b""
        self._batch: list[bytes] = []
        self._batched = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise WebError(413, f"the file is larger than the {human_bytes(self.limit)} this farm accepts")
        if len(self._head) < MAGIC_BYTES:
            self._head += data[:MAGIC_BYTES]
            if len(self._head) >= MAGIC_BYTES:
                self._check_head()
        self._digest.update(data)
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= WRITE_BATCH_BYTES:
            await self._flush()

    def _check_head(self) -> None:
        if not looks_like_blend(self._head):
            raise WebError(400, "the file is not a .blend (it does not start with a Blender file header)")

    async def _flush(self) -> None:
        data, self._batch, self._batched = b"".join(self._batch), [], 0
        if data:
            await asyncio.to_thread(self._file.write, data)

    async def finish(self) -> str:
        """Write what is left and close the file; returns the sha256."""
        if self.size == 0:
            raise WebError(400, "the uploaded file is empty")
        self._check_head()
        await self._flush()
        await asyncio.to_thread(self._file.close)
        return self._digest.hexdigest()

    def commit(self, sha256: str) -> None:
        """Move the file into the store as <sha256>.blend; on the loop, so no job can see half of it."""
        destination = self.store.path(sha256)
        if destination.is_file():
            self.path.unlink(missing_ok=True)
            return
        os.replace(self.path, destination)
        os.chmod(destination, 0o444)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.path.unlink(missing_ok=True)


async def receive_job(request: web.Request, server: Any, max_upload_bytes: int) -> dict[str, Any]:
    """Read a multipart job submission, store its .blend and create the job; returns the job's view."""
    if request.content_type != "multipart/form-data":
        raise WebError(415, "send the job as multipart/form-data with the .blend in a part named 'file'")
    if request.content_length is not None and request.content_length > max_upload_bytes + MULTIPART_OVERHEAD_BYTES:
        raise WebError(413, f"the upload of {human_bytes(request.content_length)} is larger than the "
                            f"{human_bytes(max_upload_bytes)} this farm accepts")
    reader = await request.multipart()
    fields: dict[str, str] = {}
    upload: BlendUpload | None = None
    filename = ""
    try:
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise WebError(400, "nested multipart bodies are not accepted")
            if part.name == FILE_FIELD:
                if upload is not None:
                    raise WebError(400, "send one .blend per job")
                parse_options(fields)  # settings sent before the file are checked before it is stored
                filename = part.filename or ""
                upload = BlendUpload(server.blends, max_upload_bytes)
                try:
                    while chunk := await part.read_chunk(READ_CHUNK_BYTES):
                        await upload.write(chunk)
                except ConnectionError:
                    log.info("web upload of %r from %s stopped by the browser after %s", clean_name(filename),
                             request.remote, human_bytes(upload.size))
                    raise WebError(400, "the upload was interrupted") from None
            elif part.name in INT_FIELDS or part.name in TEXT_FIELDS:
                fields[part.name] = await _read_field(part)
            else:
                raise WebError(400, f"unknown field {part.name!r}; known: {', '.join((*INT_FIELDS, *TEXT_FIELDS))}"
                                    f" and {FILE_FIELD}")
        else:
            raise WebError(400, f"a job upload has at most {MAX_PARTS} parts")
        if upload is None:
            raise WebError(400, "the upload has no .blend: send it in a part named 'file'")
        options = parse_options(fields)
        sha = await upload.finish()
        upload.commit(sha)
    except BaseException:
        if upload is not None:
            upload.abort()
        raise
    name = options.name or clean_name(filename) or "untitled.blend"
    try:
        job = server.create_job(name, sha, upload.size, options.request, start=options.start,
                                priority=options.priority, video=options.video)
    except ValueError as exc:
        raise WebError(400, str(exc)) from None
    log.info("job %s: uploaded from the web by %s (%s, %s, sha256 %s)", job.id, request.remote, name,
             human_bytes(upload.size), sha[:12])
    return job.view()


async def _read_field(part: BodyPartReader) -> str:
    data = b""
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise WebError(413, f"the field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise WebError(400, f"the field {part.name!r} is not UTF-8 text") from None
