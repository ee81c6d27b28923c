"""The JSON API and the page: every handler runs on the farm server's own loop and calls it directly."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.settings import IMAGE_FORMATS

from ..core import actions
from ..core.jobs import FrameState, Job
from ..core.scheduler import JobActionError
from ..core.service import FarmService
from ..core.storage import is_job_id
from ..core.video import CODECS, LOCATIONS, QUALITIES, VideoSettings
from . import events, files, jsonout, upload
from .auth import Auth
from .errors import WebError
from .thumbs import Thumbnails

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_YES = frozenset({"1", "true", "yes", "on"})


@dataclass
class WebState:
    server: FarmService
    auth: Auth
    thumbnails: Thumbnails
    max_upload_bytes: int
    event_interval_s: float
    feed: events.StatusFeed | None = None
    streams: set[asyncio.Task[Any]] = field(default_factory=set)


STATE = web.AppKey("microfarm_web", WebState)


def _state(request: web.Request) -> WebState:
    return request.app[STATE]


def build_status(state: WebState) -> dict[str, Any]:
    """The farm's snapshot, with what the page needs on top: ETAs, URLs, limits and choices."""
    snapshot = state.server.snapshot()
    working = Counter(c["job_id"] for c in snapshot["clients"] if c["state"] == "rendering")
    for view in snapshot["jobs"]:
        view.update(_web_fields(state.server, view, working[view["id"]]))
    snapshot["version"] = state.server.feed.version
    snapshot["web"] = {
        "auth": state.auth.required,
        "max_upload_bytes": state.max_upload_bytes,
        "formats": list(IMAGE_FORMATS),
        "video": {"codecs": list(CODECS), "qualities": list(QUALITIES), "locations": list(LOCATIONS)},
    }
    return snapshot


def _web_fields(server: FarmService, view: dict[str, Any], working: int) -> dict[str, Any]:
    job_id = view["id"]
    remaining = view["frames_total"] - view["frames_done"]
    mean = view.get("mean_frame_s")
    eta = remaining * mean / max(1, working) if view["state"] == "rendering" and mean and remaining else None
    job = server.farm.jobs.get(job_id)
    last = _last_frame(job) if job is not None else None
    video_url = None
    if view["video_state"] == "done" and view["video_path"]:
        video_url = f"/files/{job_id}/{Path(view['video_path']).name}"
    return {
        "clients_working": working,
        "eta_s": eta,
        "last_frame": last,
        "thumbnail_url": f"/api/jobs/{job_id}/thumbnail?frame={last}" if last is not None else None,
        "files_url": f"/api/jobs/{job_id}/files",
        "zip_url": f"/files/{job_id}.zip",
        "video_url": video_url,
    }


def _last_frame(job: Job) -> int | None:
    if job.settings is not None and job.settings.tiles:  # a split frame: its tiles are no frames to show
        return job.settings.frames[0] if job.stitched else None
    done = [n for n, f in job.frames.items() if f.state is FrameState.DONE]
    return max(done) if done else None


def _job(request: web.Request, key: str = "job") -> Job:
    job_id = request.match_info[key]
    if not is_job_id(job_id):
        raise WebError(400, f"{job_id!r} is not a job id")
    job = _state(request).server.farm.jobs.get(job_id)
    if job is None:
        raise WebError(404, f"there is no job {job_id!r}")
    return job


async def _json_body(request: web.Request) -> dict[str, Any]:
    data = await request.read()  # bounded by the application's client_max_size
    if not data.strip():
        return {}
    try:
        body = jsonout.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise WebError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise WebError(400, "the request body must be a JSON object")
    return body


# --- pages ---------------------------------------------------------------------------------------

async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def login_page(request: web.Request) -> web.StreamResponse:
    if not _state(request).auth.required:
        raise web.HTTPSeeOther("/")
    return web.FileResponse(STATIC_DIR / "login.html", headers={"Cache-Control": "no-cache"})


async def login(request: web.Request) -> web.Response:
    """POST /login with {"secret": "..."} (JSON or a form): sets the session cookie."""
    auth = _state(request).auth
    if not auth.required:
        return jsonout.json_response({"message": "this farm has no secret"})
    if request.content_type == "application/json":
        secret = (await _json_body(request)).get("secret")
    else:
        secret = (await request.post()).get("secret")
    if not isinstance(secret, str) or not auth.check_secret(secret, request.remote):
        auth.refusals.note(str(request.remote), "web: wrong secret at the login form")  # (counted: any rate)
        await auth.refuse_slowly(request.remote)
        raise WebError(401, "that is not the farm's secret")
    log.info("web login from %s", request.remote)
    response = jsonout.json_response({"message": "logged in"})
    auth.set_session(response)
    return response


async def logout(request: web.Request) -> web.Response:
    response = jsonout.json_response({"message": "logged out"})
    Auth.clear_session(response)
    return response


# --- the API -----------------------------------------------------------------------------------

async def status(request: web.Request) -> web.Response:
    return jsonout.json_response(build_status(_state(request)), headers={"Cache-Control": "no-store"})


async def event_stream(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    assert state.feed is not None
    task = asyncio.current_task()
    assert task is not None
    state.streams.add(task)  # cancelled when the interface stops: a stream never ends by itself
    try:
        return await events.stream_events(request, state.server, state.feed, state.event_interval_s)
    finally:
        state.streams.discard(task)


async def create_job(request: web.Request) -> web.Response:
    state = _state(request)
    view, project = await upload.receive_job(request, state.server, state.max_upload_bytes)
    return jsonout.json_response({"id": view["id"], "message": f"job {view['id']} created", "job": view,
                              "project": project}, status=201)


async def job_view(request: web.Request) -> web.Response:
    job = _job(request)
    server = _state(request).server
    working = sum(1 for c in server.farm.client_views() if c["state"] == "rendering" and c["job_id"] == job.id)
    view = job.view()
    view.update(_web_fields(server, view, working))
    return jsonout.json_response(view, headers={"Cache-Control": "no-store"})


async def job_action(request: web.Request) -> web.Response:
    job = _job(request)
    name = request.match_info["action"]
    try:
        action = actions.resolve_action(name)
    except JobActionError:
        action = None
    if action is None or not action.on_job:
        known = ", ".join(sorted(a.name for a in actions.ACTIONS.values() if a.on_job))
        raise WebError(404, f"unknown job action {name!r}; known: {known}") from None
    body = await _json_body(request)
    return await _run_action(request, action.name, job.id, _action_args(action.name, body, request))


async def delete_job(request: web.Request) -> web.Response:
    job = _job(request)
    return await _run_action(request, "delete", job.id, _action_args("delete", {}, request))


async def clear_completed(request: web.Request) -> web.Response:
    await _json_body(request)  # none is needed, but an oversized or malformed one is still an error
    return await _run_action(request, "clear_completed", "", {})


def _action_args(action: str, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
    if action == "priority":
        priority = body.get("priority")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise WebError(400, "send the priority as a whole number: {\"priority\": 5}")
        return {"priority": priority}
    if action == "video":
        try:
            return VideoSettings.from_wire(body).to_wire()
        except ValueError as exc:
            raise WebError(400, str(exc)) from None
    if action == "delete":
        wanted = body.get("files", request.query.get("files", ""))
        return {"files": wanted is True or str(wanted).lower() in _YES}
    return {}


async def _run_action(request: web.Request, action: str, job_id: str, args: dict[str, Any]) -> web.Response:
    server = _state(request).server
    try:
        message = await server.job_action(action, job_id, args)
    except JobActionError as exc:
        raise WebError(409, str(exc)) from None
    log.info("web: %s (%s from %s)", message, action, request.remote)
    job = server.farm.jobs.get(job_id)
    return jsonout.json_response({"message": message, "job": job.view() if job is not None else None})


async def list_files(request: web.Request) -> web.Response:
    job = _job(request)
    found = await files.job_files(_state(request).server, job)
    return jsonout.json_response({
        "job": job.id,
        "files": [entry.view(job.id) for entry in found.values()],
        "total_bytes": sum(entry.size for entry in found.values()),
        "zip_url": f"/files/{job.id}.zip",
    }, headers={"Cache-Control": "no-store"})


async def thumbnail(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    state = _state(request)
    number = _last_frame(job)
    if number is None or job.settings is None:
        raise WebError(404, f"job {job.id} has no frames to preview yet")
    frame = state.server.outputs.frame_path(job.id, number, job.settings.ext)
    if files.inside(state.server.outputs.root, frame) is None or not frame.is_file():
        raise WebError(404, f"job {job.id} has no preview")
    preview = await state.thumbnails.preview(job.id, number, frame)
    if preview is None:
        raise WebError(404, f"no preview of job {job.id}'s .{job.settings.ext} frames")
    content_type = files.CONTENT_TYPES.get(preview.suffix.lower().lstrip("."), "application/octet-stream")
    return web.FileResponse(preview, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


# --- files -------------------------------------------------------------------------------------

async def get_file(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    name = request.match_info["name"]
    server = _state(request).server
    entry = (await files.job_files(server, job)).get(name) if files.SAFE_NAME.fullmatch(name) else None
    if entry is None:
        raise WebError(404, f"job {job.id} has no file {name!r}")
    download = request.query.get("download", "").lower() in _YES
    return files.file_response(job.id, entry, server.outputs.root, download)


async def get_zip(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    found = await files.job_files(_state(request).server, job)
    if not found:
        raise WebError(404, f"job {job.id} has no files yet")
    return await files.stream_zip(request, job.id, list(found.values()))
