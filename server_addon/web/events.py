"""Live updates for the page: Server-Sent Events pushed when the farm changes.

Each open page gets the farm's status at once and again after every change, coalesced so that a
burst of changes (frames arriving from many clients) sends at most one update per
EVENT_MIN_INTERVAL_S. The status is serialised once per state version, however many pages listen.
A comment line every KEEPALIVE_S keeps proxies and the browser from dropping a quiet stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .jsonout import dumps

log = logging.getLogger(__name__)

EVENT_MIN_INTERVAL_S = 0.25
KEEPALIVE_S = 15.0
#: How long the browser waits before it reconnects a dropped stream.
RETRY_MS = 2000


class StatusFeed:
    """The status as JSON bytes, built once per farm state version."""

    def __init__(self, server: Any, build: Callable[[], dict[str, Any]]) -> None:
        self.server = server
        self.build = build
        self._version = -1
        self._data = b""

    def payload(self) -> bytes:
        if self._version != self.server.feed.version:
            self._version = self.server.feed.version
            self._data = dumps(self.build(), separators=(",", ":")).encode()
        return self._data


async def stream_events(request: web.Request, server: Any, feed: StatusFeed,
                        min_interval: float = EVENT_MIN_INTERVAL_S) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",  # a reverse proxy must pass events on at once
    })
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    log.info("event stream opened by %s", request.remote)
    try:
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        sent_version = -1
        sent_at = -min_interval
        while True:
            if server.feed.version == sent_version:
                await server.feed.wait_change(sent_version, KEEPALIVE_S)
                if server.feed.version == sent_version:
                    await response.write(b": keepalive\n\n")
                    continue
            pause = sent_at + min_interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)  # changes during the pause go out together
            sent_version = server.feed.version
            await response.write(b"event: status\ndata: " + feed.payload() + b"\n\n")
            sent_at = loop.time()
    except ConnectionError:
        log.info("event stream of %s closed by the browser", request.remote)
    return response
