"""The web interface's application: routes, the guard every request passes, and start/stop.

It runs on the farm server's own event loop (the headless server's, or the add-on's server thread),
so handlers call the FarmService directly with no locks: everything happens on one thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from protocol.limits import MAX_BLEND_BYTES
from protocol.names import printable
from protocol.units import human_bytes

from ..core.service import FarmService
from . import client_zip, handlers, metrics
from .auth import PAGE_HEADER, RETRY_AFTER, Auth, TooManyGuesses, cross_site_reason, is_loopback_host
from .errors import WebError, error_response
from .events import EVENT_MIN_INTERVAL_S, StatusFeed
from .handlers import STATE, STATIC_DIR, WebState
from .slots import Slots, SlotServer, serve
from .staging import Staging
from .thumbs import Thumbnails

log = logging.getLogger(__name__)

#: The largest .blend the page and the API accept by default (the protocol's own limit).
DEFAULT_MAX_UPLOAD_BYTES = MAX_BLEND_BYTES
#: Any other request body (JSON, the login form) is at most this big.
MAX_BODY_BYTES = 64 * 1024
#: How long stop() lets requests in flight finish (uploads, zips) before it cuts them off.
SHUTDOWN_TIMEOUT_S = 2.0
CONTENT_SECURITY_POLICY = ("default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
#: Reachable without the secret: the login page and the page's code (which holds no data).
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = frozenset({"/login", metrics.HEALTH_PATH})
#: Pages a browser opens directly: without credentials they lead to the login form.
PAGES = frozenset({"/", "/index.html"})
#: Set when the interface listens on loopback only: then the Host header must name loopback too.
LOOPBACK_ONLY = web.AppKey("microfarm_loopback_only", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host and cross-site checks, the secret, and every error as {"error": "..."}."""
    state = request.app[STATE]
    try:
        if request.app[LOOPBACK_ONLY] and not is_loopback_host(request.host):
            raise WebError(403, f"this interface answers to localhost only, not to {request.host!r}")
        reason = cross_site_reason(request)
        if reason is not None:
            state.auth.refusals.note(str(request.remote), f"web: refused {request.method} {request.path}: {reason}")
            raise WebError(403, reason)
        if not _public(request.path):
            refusal = await _check_credentials(request, state.auth)
            if refusal is not None:
                return refusal
        return await handler(request)
    except WebError as exc:
        return error_response(exc.status, exc.message, details=exc.details)
    except TooManyGuesses as exc:
        return error_response(429, str(exc), RETRY_AFTER)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _http_message(request, exc))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("web: %s %s from %s failed", request.method, printable(request.path)[:200], request.remote)
        if request.writer.output_size > 0:
            raise  # a streamed reply has begun: aiohttp cuts the connection, no JSON can follow
        return error_response(500, "internal error; the server's log has the details")


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _check_credentials(request: web.Request, auth: Auth) -> web.StreamResponse | None:
    verdict = auth.credentials(request)
    if verdict is True:
        return None
    if verdict is False:
        auth.refusals.note(str(request.remote), f"web: wrong credentials for {request.method} {request.path}")
        await auth.refuse_slowly(request.remote)
    if request.method in ("GET", "HEAD") and request.path in PAGES:
        raise web.HTTPSeeOther("/login")
    # The page's own requests (its scripts, its event stream) get no browser prompt: it shows its login form.
    from_page = request.headers.get(PAGE_HEADER) or request.headers.get("Accept") == "text/event-stream"
    headers = {} if from_page else {"WWW-Authenticate": 'Basic realm="MicroFarm"'}
    message = "wrong credentials" if verdict is False else "this farm needs its secret"
    return error_response(401, f"{message}: log in, or send it as the password of HTTP Basic auth or as "
                               "'Authorization: Bearer SECRET'", headers)


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"there is nothing at {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"the request body is larger than the {human_bytes(MAX_BODY_BYTES)} allowed"
    return exc.reason


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")


def build_app(state: WebState, loopback_only: bool, slots: Slots | None = None) -> web.Application:
    # The slots' middleware first: it sees every request, and when its answer has gone out.
    middlewares = [guard] if slots is None else [slots.middleware, guard]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app[LOOPBACK_ONLY] = loopback_only
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_end_streams)
    h = handlers
    app.router.add_get("/", h.index)
    app.router.add_get("/index.html", h.index)
    app.router.add_get("/login", h.login_page)
    app.router.add_post("/login", h.login)
    app.router.add_post("/logout", h.logout)
    app.router.add_get("/api/status", h.status)
    app.router.add_get("/api/events", h.event_stream)
    app.router.add_post("/api/jobs", h.create_job)
    app.router.add_post("/api/jobs/clear_completed", h.clear_completed)
    app.router.add_get("/api/jobs/{job}", h.job_view)
    app.router.add_delete("/api/jobs/{job}", h.delete_job)
    app.router.add_post("/api/jobs/{job}/{action}", h.job_action)
    app.router.add_get("/api/jobs/{job}/files", h.list_files)
    app.router.add_get("/api/jobs/{job}/thumbnail", h.thumbnail)
    app.router.add_get("/files/{job}.zip", h.get_zip)
    app.router.add_get("/files/{job}/{name}", h.get_file)
    metrics.add_routes(app, state.server)  # /metrics, /api/queue, /healthz
    client_zip.setup(app)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app


async def _end_streams(app: web.Application) -> None:
    for task in list(app[STATE].streams):
        task.cancel()


class WebServer(SlotServer):
    """The running web interface; stop() before the FarmService stops."""

    what = "web interface"

    def __init__(self, runner: web.AppRunner, state: WebState, host: str, port: int, slots: Slots) -> None:
        super().__init__(runner, slots, host, port)
        self.state = state


async def start_web(server: FarmService, host: str = "127.0.0.1", port: int = 0, secret: str | None = None, *,
                    auth: Auth | None = None,
                    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                    event_interval_s: float = EVENT_MIN_INTERVAL_S) -> WebServer:
    """Serve the web interface for `server` on host:port (0: a free port), on the running loop."""
    thumbnails = Thumbnails(server.config.resolved_data_dir / "thumbnails")
    await asyncio.to_thread(thumbnails.clear)
    await asyncio.to_thread(Staging.clear_all, server.config.resolved_data_dir)  # uploads cut off by a stop
    state = WebState(server=server, auth=auth or Auth(secret), thumbnails=thumbnails, max_upload_bytes=max_upload_bytes,
                     event_interval_s=event_interval_s)
    state.feed = StatusFeed(server, lambda: handlers.build_status(state))
    config = server.config
    # aiohttp bounds neither the connections nor the time a request's headers take: Slots does.
    slots = Slots(config.web_max_connections, config.web_header_timeout, config.web_body_timeout,
                  config.refusal_log_interval)
    runner = await serve(build_app(state, is_loopback_host(host), slots), host, port, slots,
                         shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                         # (aiohttp's own idle limit, 3630 s by default, backs up the slots' header timeout)
                         keepalive_timeout=2 * config.web_header_timeout)
    bound = runner.addresses[0][1]
    web_server = WebServer(runner, state, host, bound, slots)
    log.info("web interface for farm %r on %s (secret %s, uploads up to %s)", server.config.farm_name,
             web_server.url, "required" if secret else "not set", human_bytes(max_upload_bytes))
    return web_server
