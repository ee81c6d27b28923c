"""Prometheus metrics: the farm read at scrape time, on the web port and on a port of its own.

Nothing is updated as events happen: a scrape walks the scheduler's jobs, frames and clients (their counts
are kept up to date by the scheduler already, see core.jobs.FrameIndex) and reads the counters of events
(core.config.ServerStats, core.scheduler.FarmCounts). The hot path stays as it was.

GET /metrics      the Prometheus text format (a bearer token is the farm secret, where one is set)
GET /api/queue    the work waiting, as JSON, for autoscalers that read JSON (KEDA's metrics-api)
GET /healthz      "ok" while the server's loop answers; needs no secret and tells nothing
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..core.jobs import JobState, LeaseKind
from ..core.service import FarmService
from .auth import RETRY_AFTER, Auth, TooManyGuesses
from .slots import Slots, SlotServer, serve

log = logging.getLogger(__name__)

PREFIX = "microfarm"
METRICS_PATH = "/metrics"
QUEUE_PATH = "/api/queue"
HEALTH_PATH = "/healthz"
#: The metrics port's own bounds: scrapers send small GETs and keep their connection between scrapes.
MAX_REQUEST_BYTES = 1024
KEEPALIVE_S = 75.0
SHUTDOWN_TIMEOUT_S = 1.0


class FarmCollector(Collector):
    """One scrape: the farm as it is now, and what was counted since the server started."""

    def __init__(self, service: FarmService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        farm = self._service.farm
        yield from self._frames(farm.jobs.values())
        yield from self._jobs(farm.jobs.values())
        yield self._clients()
        yield from self._counters()
        yield self._render_times()

    def _frames(self, jobs: Any) -> Iterator[Metric]:
        per_job = {name: GaugeMetricFamily(f"{PREFIX}_job_frames_{name}", f"Frames {name} of each job",
                                           labels=["job"]) for name in ("pending", "leased", "done")}
        totals = dict.fromkeys(per_job, 0)
        probes = 0
        for job in jobs:
            index = job.index
            counts = {"pending": len(index.pending), "leased": len(index.leased), "done": index.done}
            for name, value in counts.items():
                per_job[name].add_metric([job.id], value)
            if job.state.running:  # (a paused or finished job's frames wait for no client)
                totals["pending"] += counts["pending"]
                totals["leased"] += counts["leased"]
            totals["done"] += counts["done"]
            if job.state is JobState.PROBING and job.probe_lease is None:
                probes += 1
        yield from per_job.values()
        helps = {"pending": "Frames of running jobs waiting for a client",
                 "leased": "Frames of running jobs handed to a client and not stored yet",
                 "done": "Frames stored, of every job the server holds"}
        for name, value in totals.items():
            yield GaugeMetricFamily(f"{PREFIX}_frames_{name}", helps[name], value=value)
        yield GaugeMetricFamily(f"{PREFIX}_probes_pending",
                                "Jobs waiting for a client to read their scene (one client's work each)", value=probes)

    def _jobs(self, jobs: Any) -> Iterator[Metric]:
        by_state = Counter(job.state for job in jobs)
        family = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            family.add_metric([state.value], by_state[state])
        yield family

    def _clients(self) -> Metric:
        farm = self._service.farm
        groups: Counter[tuple[str, str, str]] = Counter()
        for client in farm.clients.values():
            groups[(_client_state(client, farm.leases), client.device, client.blender)] += 1
        family = GaugeMetricFamily(f"{PREFIX}_clients", "Render clients by state, device and Blender version",
                                   labels=["state", "device", "blender"])
        for (state, device, blender), count in sorted(groups.items()):
            family.add_metric([state, device, blender], count)
        return family

    def _counters(self) -> Iterator[Metric]:
        stats, counts = self._service.stats, self._service.farm.counts
        rows = [
            ("job_data_sent_bytes", "Bytes of job files (.blend and its dependencies) sent to render clients",
             stats.blend_bytes_sent),
            ("job_files_sent", "Job files sent to render clients", stats.files_sent),
            ("upload_received_bytes", "Bytes of job files received from submitters", stats.upload_bytes_received),
            ("frames_stored", "Frames (and tiles) stored", stats.frames_stored),
            ("duplicate_frames", "Frames received again after they were stored, and dropped",
             stats.duplicate_frames),
            ("frame_failures", "Frames that failed on a render client (hung renders included)",
             counts.frame_failures),
            ("probe_failures", "Job files a render client could not open", counts.probe_failures),
            ("leases_lost", "Leases taken back because their client went away", counts.leases_lost),
            ("frames_handed_back", "Frames render clients gave back unrendered when told to stop",
             counts.frames_handed_back),
            ("connections_refused", "Connections refused (limits, failed handshakes)", stats.connections_refused),
        ]
        for name, help_text, value in rows:
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)  # ("_total" is added)

    def _render_times(self) -> Metric:
        times = self._service.stats.render_times
        buckets, running = [], 0
        for bound, count in zip((*times.bounds, float("inf")), times.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(f"{PREFIX}_frame_render_seconds", "Render time of the frames stored",
                                     buckets=buckets, sum_value=times.total_s)


def _client_state(client: Any, leases: dict[int, Any]) -> str:
    """As the status list shows it (core.jobs.ClientRecord.view), and "starting" before its first report."""
    if not client.connected:
        return "lost"
    if not client.ready:
        return "starting"
    if client.busy:
        return "stopping" if client.draining else "busy"
    lease = leases.get(client.lease_id) if client.lease_id is not None else None
    if lease is None:
        return "idle"
    return "probing" if lease.kind is LeaseKind.PROBE else "rendering"


def queue(service: FarmService) -> dict[str, int]:
    """The work waiting and in hand; `outstanding` is what an autoscaler divides by frames per client."""
    pending = leased = probes = 0
    for job in service.farm.jobs.values():
        if job.state.running:
            pending += len(job.index.pending)
            leased += len(job.index.leased)
            probes += job.state is JobState.PROBING and job.probe_lease is None
    return {"frames_pending": pending, "frames_leased": leased, "probes_pending": probes,
            "outstanding": pending + leased + probes}


def registry_for(service: FarmService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(service))
    return registry


SERVICE = web.AppKey("microfarm_metrics_service", FarmService)
REGISTRY = web.AppKey("microfarm_metrics_registry", CollectorRegistry)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])  # (a synchronous walk on the loop: no unit of work runs)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


async def queue_json(request: web.Request) -> web.Response:
    return web.json_response(queue(request.app[SERVICE]), headers={"Cache-Control": "no-store"})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def add_routes(app: web.Application, service: FarmService) -> None:
    """/metrics, /api/queue and /healthz on an application whose own guard checks the secret."""
    app[SERVICE] = service
    app[REGISTRY] = registry_for(service)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get(QUEUE_PATH, queue_json)
    app.router.add_get(HEALTH_PATH, health)


# --- the port of its own -----------------------------------------------------------------------

AUTH = web.AppKey("microfarm_metrics_auth", Auth)


@web.middleware
async def _secret(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path != HEALTH_PATH:
        auth = request.app[AUTH]
        try:
            verdict = auth.credentials(request)
            if verdict is False:
                auth.refusals.note(str(request.remote), f"metrics: wrong credentials for {request.path}")
                await auth.refuse_slowly(request.remote)
        except TooManyGuesses as exc:
            return web.json_response({"error": str(exc)}, status=429, headers=RETRY_AFTER)
        if verdict is not True:
            return web.json_response({"error": "this farm needs its secret: send 'Authorization: Bearer SECRET'"},
                                     status=401)
    return await handler(request)


class MetricsServer(SlotServer):
    """The metrics on a port of their own (`python -m server_addon --metrics-port`)."""

    what = "metrics"


async def start_metrics(service: FarmService, host: str = "127.0.0.1", port: int = 0,
                        secret: str | None = None, auth: Auth | None = None) -> MetricsServer:
    """Serve the metrics on host:port; `auth`: the web interface's, so that both ports keep one line of wrong
    guesses (see web.auth)."""
    config = service.config
    # As on the web port: bounded connections, and bounded time for a request's headers (see web.slots).
    slots = Slots(config.web_max_connections, config.web_header_timeout, config.web_body_timeout,
                  config.refusal_log_interval)
    app = web.Application(middlewares=[slots.middleware, _secret], client_max_size=MAX_REQUEST_BYTES)
    app[AUTH] = auth or Auth(secret)
    add_routes(app, service)
    runner = await serve(app, host, port, slots, shutdown_timeout=SHUTDOWN_TIMEOUT_S, keepalive_timeout=KEEPALIVE_S)
    server = MetricsServer(runner, slots, host, runner.addresses[0][1])
    log.info("metrics for farm %r on %s%s (secret %s)", service.config.farm_name, server.url, METRICS_PATH,
             "required" if secret else "not set")
    return server
