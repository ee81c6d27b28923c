"""GET /client/microfarm-client.zip: the render-client bundle, for render nodes with a stock Blender.

Built on the first request, on a worker thread (it reads and compresses some 70 files), then kept in memory:
the sources do not change while the server runs.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..core.client_bundle import BundleError, zip_bytes, zip_name
from .errors import WebError

log = logging.getLogger(__name__)

PATH = "/client/microfarm-client.zip"


class ClientZip:
    def __init__(self) -> None:
        self._build: asyncio.Task[bytes] | None = None

    async def get(self) -> bytes:
        build = self._build
        if build is None or (build.done() and (build.cancelled() or build.exception() is not None)):
            # One build for any number of requests that arrive while it runs; a failed build is tried again.
            self._build = asyncio.ensure_future(asyncio.to_thread(zip_bytes))
        return await asyncio.shield(self._build)


BUNDLE = web.AppKey("microfarm_client_zip", ClientZip)


async def client_zip(request: web.Request) -> web.StreamResponse:
    try:
        data = await request.app[BUNDLE].get()
    except (BundleError, OSError) as exc:
        log.error("web: the render client bundle could not be built: %s", exc)
        raise WebError(500, f"the render client bundle could not be built: {exc}") from None
    return web.Response(body=data, content_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{zip_name()}"', "Cache-Control": "no-cache"})


def setup(app: web.Application) -> None:
    app[BUNDLE] = ClientZip()
    app.router.add_get(PATH, client_zip)
