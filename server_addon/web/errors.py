"""The web package's one exception, and the JSON shape every error takes: {"error": "one sentence"}."""

from __future__ import annotations

from aiohttp import web


class WebError(Exception):
    """A request that cannot be served; `status` is the HTTP status, the message one sentence for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
