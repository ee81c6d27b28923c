"""Helpers for the web interface's tests: the interface on a test farm, raw HTTP, and Chromium."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Farm

from server_addon.web import WebServer, start_web

#: Debian's Chromium, driven by Playwright; nothing is downloaded (`playwright install` is never run).
CHROMIUM = os.environ.get("MICROFARM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HTTP_TIMEOUT_S = 30.0


def start_web_on(farm: Farm, secret: str | None = None, **options: Any) -> WebServer:
    """The web interface on the test farm's own loop, on 127.0.0.1 and a free port."""
    return farm.thread.submit(start_web(farm.server, "127.0.0.1", 0, secret, **options), timeout=10)


def stop_web(farm: Farm, web: WebServer) -> None:
    if farm.thread.running:
        farm.thread.submit(web.stop(), timeout=10)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]


class Http:
    """Plain HTTP to the interface: paths are sent exactly as given (no normalising of ../)."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.port = port
        self.headers = headers or {}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                chunked: bool = False) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S)
        try:
            all_headers = {**self.headers, **(headers or {})}
            if chunked and body is not None:
                conn.request(method, path, body=_pieces(body), headers=all_headers, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post_json(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> Reply:
        return self.request("POST", path, json.dumps(payload).encode(),
                            {"Content-Type": "application/json", **(headers or {})})

    def upload(self, blend: bytes, filename: str = "shot.blend", chunked: bool = False,
               headers: dict[str, str] | None = None, **fields: str) -> Reply:
        body, content_type = multipart(fields, ("file", filename, blend))
        return self.request("POST", "/api/jobs", body, {"Content-Type": content_type, **(headers or {})},
                            chunked=chunked)


def _pieces(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def multipart(fields: dict[str, str], file: tuple[str, str, bytes] | None) -> tuple[bytes, str]:
    boundary = f"----microfarm{secrets.token_hex(8)}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file is not None:
        name, filename, data = file
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium, or a loud failure: CI installs it, so a missing browser is an error, not a skip."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: `sudo apt-get install chromium` "
                    "(or set MICROFARM_CHROMIUM to its path)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
