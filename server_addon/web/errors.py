"""The web package's one exception, and the JSON shape every error takes: {"error": "one sentence"}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .jsonout import json_response


class WebError(Exception):
    """A request that cannot be served; `status` is the HTTP status, the message one sentence for the user,
    `details` more fields for programs (e.g. the list of missing files)."""

    def __init__(self, status: int, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or {}



def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   details: dict[str, Any] | None = None) -> web.Response:
    return json_response({**(details or {}), "error": message}, status=status, headers=headers)
