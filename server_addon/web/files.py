"""A job's files on disk: the listing, one file, and the whole job as a zip streamed from disk.

A name in a URL is never joined onto a path: it is looked up in the listing of the job's folder,
which holds only plain files (no symlinks) with plain names, and every path is resolved and checked
to lie inside the output root right before it is served.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.helpers import content_disposition_header

from ..core.jobs import Job
from ..core.storage import UnsafeName
from .errors import WebError

log = logging.getLogger(__name__)

#: Names the web interface serves: what the farm writes (frame_0001.png, job-ab12cd.mp4) and no more.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_FRAME_NAME = re.compile(r"^frame_-?\d+\.[a-z]+$")
VIDEO_EXTENSIONS = frozenset({"mp4", "mov"})
#: Content types by extension; anything else is served as a download of opaque bytes.
CONTENT_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp", "bmp": "image/bmp",
    "exr": "image/x-exr", "tif": "image/tiff", "tiff": "image/tiff", "tga": "image/x-tga",
    "mp4": "video/mp4", "mov": "video/quicktime",
}
#: Types a browser shows inline; the rest are always sent as attachments.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/bmp", "video/mp4", "video/quicktime"})
ZIP_READ_BYTES = 1024 * 1024
#: The zip format cannot store dates before 1980.
ZIP_EPOCH = time.mktime((1980, 1, 1, 0, 0, 0, 0, 0, -1))


@dataclass(frozen=True)
class JobFile:
    name: str
    path: Path
    size: int
    mtime: float

    @property
    def ext(self) -> str:
        return self.name.rpartition(".")[2].lower()

    @property
    def kind(self) -> str:
        if _FRAME_NAME.fullmatch(self.name):
            return "frame"
        return "video" if self.ext in VIDEO_EXTENSIONS else "file"

    def view(self, job_id: str) -> dict[str, Any]:
        url = f"/files/{job_id}/{self.name}"
        return {"name": self.name, "size": self.size, "kind": self.kind, "modified": self.mtime, "url": url,
                "download_url": f"{url}?download=1"}


def inside(root: Path, path: Path) -> Path | None:
    """`path` with every symlink resolved, if that lies inside `root` (itself resolved); else None."""
    resolved = path.resolve()
    return resolved if resolved == root or root in resolved.parents else None


def _entry(path: Path, root: Path) -> JobFile | None:
    if not SAFE_NAME.fullmatch(path.name) or path.is_symlink() or inside(root, path) is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return JobFile(name=path.name, path=path, size=stat.st_size, mtime=stat.st_mtime)


def list_job_files(output_root: Path, job_dir: Path, job: Job) -> dict[str, JobFile]:
    """The job folder's plain files, and the job's video where it lives outside the folder. Blocking."""
    files: dict[str, JobFile] = {}
    if inside(output_root, job_dir) is not None and job_dir.is_dir() and not job_dir.is_symlink():
        for path in sorted(job_dir.iterdir()):
            entry = _entry(path, output_root)
            if entry is not None:
                files[entry.name] = entry
    if job.video_path:
        video = Path(job.video_path)
        entry = _entry(video, output_root) if video.name not in files else None
        if entry is not None and entry.ext in VIDEO_EXTENSIONS:
            files[entry.name] = entry
    return files


async def job_files(server: Any, job: Job) -> dict[str, JobFile]:
    try:
        job_dir = server.outputs.job_dir(job.id)
    except UnsafeName:
        log.warning("job %s: its folder lies outside the output root; no files are served", job.id)
        return {}
    return await asyncio.to_thread(list_job_files, server.outputs.root, job_dir, job)


def file_response(job_id: str, entry: JobFile, output_root: Path, download: bool) -> web.FileResponse:
    resolved = inside(output_root, entry.path)
    if resolved is None or entry.path.is_symlink():
        raise WebError(404, f"job {job_id} has no file {entry.name!r}")
    content_type = CONTENT_TYPES.get(entry.ext, "application/octet-stream")
    disposition = "inline" if content_type in INLINE_TYPES and not download else "attachment"
    return web.FileResponse(resolved, headers={
        "Content-Type": content_type,
        "Content-Disposition": content_disposition_header(disposition, filename=entry.name),
        "Cache-Control": "no-cache",
    })


class _Pending:
    """A write-only, unseekable file for zipfile: it collects what zipfile writes until it is sent."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


async def stream_zip(request: web.Request, job_id: str, files: list[JobFile]) -> web.StreamResponse:
    """Send the files as <job_id>.zip (stored, not compressed: frames and videos already are).

    zipfile writes into a buffer that is handed to the response after every block, so memory
    holds one block at a time whatever the job's size; file reads happen off the loop.
    """
    response = web.StreamResponse(headers={
        "Content-Type": "application/zip",
        "Content-Disposition": content_disposition_header("attachment", filename=f"{job_id}.zip"),
        "Cache-Control": "no-store",
    })
    await response.prepare(request)
    pending = _Pending()
    sent = 0
    started = time.monotonic()
    try:
        with zipfile.ZipFile(pending, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for entry in files:
                sent += await _add_file(archive, pending, response, job_id, entry)
        data = pending.take()  # the central directory, written when the archive closed
        await response.write(data)
        sent += len(data)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        log.info("job %s: zip download stopped by the browser after %d bytes", job_id, sent)
        raise
    log.info("job %s: zip of %d files sent (%d bytes in %.1f s) to %s", job_id, len(files), sent,
             time.monotonic() - started, request.remote)
    return response


async def _add_file(archive: zipfile.ZipFile, pending: _Pending, response: web.StreamResponse, job_id: str,
                    entry: JobFile) -> int:
    info = zipfile.ZipInfo(f"{job_id}/{entry.name}", date_time=time.localtime(max(entry.mtime, ZIP_EPOCH))[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = entry.size
    info.external_attr = 0o644 << 16
    sent = 0
    source = await asyncio.to_thread(open, entry.path, "rb")
    try:
        with archive.open(info, "w", force_zip64=entry.size >= zipfile.ZIP64_LIMIT) as target:
            while True:
                block = await asyncio.to_thread(source.read, ZIP_READ_BYTES)
                if not block:
                    break
                target.write(block)
                data = pending.take()
                await response.write(data)
                sent += len(data)
    finally:
        await asyncio.to_thread(source.close)
    return sent

