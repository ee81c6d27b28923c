"""The web interface's JSON API over real HTTP: access, validation, uploads, actions, files, events."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from conftest import Farm, repo_env
from PIL import Image
from web_support import Http, start_web_on, stop_web

from protocol.settings import JobRequest, SceneInfo, resolve
from server_addon.core.config import ServerConfig
from server_addon.core.jobs import FrameRecord, FrameState
from server_addon.core.service import FarmService
from server_addon.thread import ServerThread
from server_addon.web.auth import FAILED_AUTH_DELAY_S, MAX_WAITING_GUESSES
from tools.localfarm import REPO

pytestmark = pytest.mark.integration

FAKE_BLEND = b"BLENDER-v500" + bytes(range(256)) * 64
SECRET = "correct horse battery staple"


@pytest.fixture
def web(farm: Farm) -> Iterator[Http]:
    server = start_web_on(farm)
    yield Http(server.port)
    stop_web(farm, server)


def upload_job(http: Http, blend: bytes = FAKE_BLEND, **fields: str) -> str:
    reply = http.upload(blend, **fields)
    assert reply.status == 201, reply.body
    return reply.json()["id"]


def png_bytes(size: tuple[int, int] = (8, 4), colour: tuple[int, int, int] = (200, 40, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def test_upload_creates_a_job_and_stores_the_blend(farm: Farm, web: Http) -> None:
    reply = web.upload(FAKE_BLEND, filename="../../evil/shot.blend", frame_start="3", frame_end="9", chunk="2",
                       file_format="JPEG", samples="16", percentage="50", priority="7", start="0", video="h264",
                       video_quality="low")
    assert reply.status == 201, reply.body
    job = reply.json()["job"]
    assert job["name"] == "shot.blend" and job["state"] == "queued" and job["priority"] == 7
    assert job["chunk"] == 2 and job["video"] == {"codec": "h264", "quality": "low", "location": "frames"}
    sha = hashlib.sha256(FAKE_BLEND).hexdigest()
    stored = farm.call(lambda s: s.files.path(sha))
    assert stored.read_bytes() == FAKE_BLEND
    request = farm.call(lambda s: s.farm.jobs[job["id"]].request)
    assert (request.frame_start, request.frame_end, request.file_format, request.samples, request.percentage) == (
        3, 9, "JPEG", 16, 50)
    split = web.upload(FAKE_BLEND, frame_start="5", frame_end="5", split="0", device="gpu")
    assert split.status == 201, split.body
    request = farm.call(lambda s: s.farm.jobs[split.json()["job"]["id"]].request)
    assert (request.split, request.device) == (0, "GPU")
    # The same file again is not stored twice; chunked transfer (no Content-Length) works too.
    again = web.upload(FAKE_BLEND, chunked=True)
    assert again.status == 201, again.body
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]


def test_upload_chooses_the_blender_version(farm: Farm, web: Http) -> None:
    job_id = upload_job(web, blender="5.3")
    job = farm.job(job_id)
    assert (job["blender_request"], job["blender_file"]) == ("5.3", "5.0")
    assert job["waiting"] == "waiting for a client with Blender 5.3; connected: none"
    older = web.upload(FAKE_BLEND, blender="4.2")
    assert older.status == 400 and "shot.blend was saved by Blender 5.0; Blender 4.2 cannot open it" in older.error


@pytest.mark.parametrize(("fields", "message"), [
    ({"chunk": "two"}, "chunk must be a whole number"),
    ({"frame_start": "9", "frame_end": "3"}, "ends before it starts"),
    ({"file_format": "GIF"}, "format must be one of"),
    ({"video": "divx"}, "video codec must be one of"),
    ({"start": "maybe"}, "start must be"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"split": "1"}, "split must be 0 (auto) or between"),
    ({"device": "tpu"}, "device must be one of"),
    ({"blender": "latest"}, "blender must be 'file' or a version"),
])
def test_upload_rejects_bad_settings(farm: Farm, web: Http, fields: dict[str, str], message: str) -> None:
    reply = web.upload(FAKE_BLEND, **fields)
    assert reply.status == 400 and message in reply.error, reply.body
    assert farm.call(lambda s: len(s.farm.jobs)) == 0
    assert not list(farm.call(lambda s: s.files.root).iterdir())


def test_upload_rejects_what_is_not_a_blend(farm: Farm, web: Http) -> None:
    reply = web.upload(b"<html><script>alert(1)</script></html>")
    assert reply.status == 400 and "not a .blend" in reply.error
    empty = web.upload(b"")
    assert empty.status == 400 and "empty" in empty.error
    no_file_body = b"--x\r\nContent-Disposition: form-data; name=\"chunk\"\r\n\r\n2\r\n--x--\r\n"
    no_file = web.request("POST", "/api/jobs", no_file_body, {"Content-Type": "multipart/form-data; boundary=x"})
    assert no_file.status == 400 and "no .blend" in no_file.error
    wrong_type = web.post_json("/api/jobs", {"file": "shot.blend"})
    assert wrong_type.status == 415
    # zstd- and gzip-compressed .blend files are welcome; compressed garbage is not.
    header = b"BLENDER17-01v0500REND" + bytes(100)
    assert web.upload(zstandard.ZstdCompressor().compress(header)).status == 201
    assert web.upload(gzip.compress(header)).status == 201
    damaged = web.upload(b"\x28\xb5\x2f\xfd" + b"z" * 100)
    assert damaged.status == 400 and "shot.blend: the zstd-compressed file is damaged" in damaged.error
    assert not [p for p in farm.call(lambda s: s.files.root).iterdir() if p.name.startswith(".")]


def test_oversized_uploads_are_refused(farm: Farm) -> None:
    limit = 64 * 1024
    server = start_web_on(farm, max_upload_bytes=limit)
    try:
        http = Http(server.port)
        big = FAKE_BLEND + b"x" * (4 * limit)
        announced = http.upload(big)  # Content-Length says it all: refused before the body is read
        assert announced.status == 413 and "larger than the 64.0 KiB this farm accepts" in announced.error
        streamed = http.upload(big, chunked=True)  # no Content-Length: cut off once past the limit
        assert streamed.status == 413 and "larger than the 64.0 KiB" in streamed.error
        assert http.upload(FAKE_BLEND[: limit // 2]).status == 201
        blends = farm.call(lambda s: s.files.root)
        assert [p.name for p in blends.iterdir() if p.name.startswith(".")] == []  # no partial file left
        assert farm.call(lambda s: len(s.farm.jobs)) == 1
        huge_json = http.post_json("/api/jobs/clear_completed", {"pad": "x" * 100_000})
        assert huge_json.status == 413 and huge_json.json()["error"].startswith("the request body is larger")
        status = http.get("/api/status").json()
        assert status["web"]["max_upload_bytes"] == limit
    finally:
        stop_web(farm, server)


def test_path_traversal_and_unknown_names_are_refused(farm: Farm, web: Http, tmp_path: Path) -> None:
    job_id = upload_job(web)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET")
    job_dir = farm.call(lambda s: s.outputs.job_dir(job_id))
    job_dir.mkdir(parents=True)
    frame = png_bytes()
    (job_dir / "frame_0001.png").write_bytes(frame)
    (job_dir / "frame_0002.png").symlink_to(outside / "secret.txt")  # a link out of the output folder
    (job_dir / "frame_0003.png").symlink_to(job_dir / "frame_0001.png")  # links are never served
    (job_dir / ".incoming-x.part").write_bytes(b"half")
    (job_dir / "notes <script>.txt").write_text("odd name")

    listing = web.get(f"/api/jobs/{job_id}/files").json()
    assert [f["name"] for f in listing["files"]] == ["frame_0001.png"]
    served = web.get(f"/files/{job_id}/frame_0001.png")
    assert served.status == 200 and served.body == frame and served.headers["Content-Type"] == "image/png"

    refused = [
        f"/files/{job_id}/frame_0002.png",
        f"/files/{job_id}/frame_0003.png",
        f"/files/{job_id}/.incoming-x.part",
        f"/files/{job_id}/frame_0099.png",
        f"/files/{job_id}/..%2f..%2f..%2fetc%2fpasswd",
        f"/files/{job_id}/..%2foutside%2fsecret.txt",
        "/files/..%2f..%2fetc/passwd",
        "/files/../../etc/passwd",
        f"/files/{job_id}/../../../etc/passwd",
        "/files/%2e%2e/%2e%2e/etc/passwd",
        "/files/job.with.dots/frame_0001.png",
        "/files/job.with.dots.zip",
        "/api/jobs/a.b/files",
        "/api/jobs/..%2f..%2fetc/files",
        "/api/jobs/no-such-job/files",
        "/files/no-such-job/frame_0001.png",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ]
    for path in refused:
        reply = web.get(path)
        assert reply.status in (400, 403, 404), (path, reply.status)
        assert b"TOP SECRET" not in reply.body and b"root:" not in reply.body, path
    assert web.get("/api/jobs/a.b/files").error == "'a.b' is not a job id"
    assert web.get("/api/jobs/no-such-job/files").status == 404

    archive = zipfile.ZipFile(io.BytesIO(web.get(f"/files/{job_id}.zip").body))
    assert archive.namelist() == [f"{job_id}/frame_0001.png"]

    # A job folder that is itself a link out of the output root serves nothing at all.
    other = upload_job(web, FAKE_BLEND + b"2")
    farm.call(lambda s: s.outputs.root / other).symlink_to(outside, target_is_directory=True)
    (outside / "frame_0001.png").write_bytes(frame)
    assert web.get(f"/api/jobs/{other}/files").json()["files"] == []
    assert web.get(f"/files/{other}/frame_0001.png").status == 404
    assert web.get(f"/files/{other}.zip").status == 404


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_farm_secret_is_required_everywhere(tmp_path: Path) -> None:
    farm = Farm(tmp_path / "output", secret=SECRET)
    server = start_web_on(farm, secret=SECRET)
    try:
        anonymous = Http(server.port)
        for method, path in [("GET", "/api/status"), ("GET", "/api/events"), ("GET", "/files/x-1/frame_0001.png"),
                             ("GET", "/files/x-1.zip"), ("GET", "/api/jobs/x-1/files"), ("POST", "/api/jobs"),
                             ("POST", "/api/jobs/x-1/cancel"), ("DELETE", "/api/jobs/x-1")]:
            reply = anonymous.request(method, path)
            assert reply.status == 401, (method, path, reply.status)
            assert "needs its secret" in reply.error
        assert anonymous.get("/api/status").headers["WWW-Authenticate"].startswith("Basic")
        # The page's own requests get no browser prompt: it shows its login form instead.
        assert "WWW-Authenticate" not in anonymous.get("/api/status", headers={"X-Requested-With": "MicroFarm"}).headers
        assert "WWW-Authenticate" not in anonymous.get("/api/events", headers={"Accept": "text/event-stream"}).headers
        page = anonymous.get("/")
        assert page.status == 303 and page.headers["Location"] == "/login"
        assert anonymous.get("/login").status == 200 and anonymous.get("/static/app.js").status == 200
        upload = anonymous.upload(FAKE_BLEND)
        assert upload.status == 401

        wrong = [basic("", "guess"), basic("admin", SECRET[:-1]), {"Authorization": "Bearer guess"},
                 {"Authorization": "Digest abc"}, {"Authorization": "Basic !!notbase64"},
                 {"Cookie": "microfarm_session=" + "0" * 64}]
        started = time.monotonic()
        for headers in wrong:
            reply = anonymous.get("/api/status", headers=headers)
            assert reply.status == 401 and "wrong credentials" in reply.error, headers
        assert time.monotonic() - started >= 0.25 * len(wrong) * 0.9  # wrong guesses are slowed down

        for headers in [basic("", SECRET), basic("anyone", SECRET), {"Authorization": f"Bearer {SECRET}"}]:
            reply = anonymous.get("/api/status", headers=headers)
            assert reply.status == 200 and reply.json()["web"]["auth"] is True
        authorised = Http(server.port, {"Authorization": f"Bearer {SECRET}"})
        assert authorised.upload(FAKE_BLEND).status == 201
        assert authorised.get("/").status == 200

        refused = anonymous.post_json("/login", {"secret": "guess"})
        assert refused.status == 401 and "set-cookie" not in {k.lower() for k in refused.headers}
        login = anonymous.post_json("/login", {"secret": SECRET})
        assert login.status == 200
        cookie = login.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and SECRET not in cookie
        session = re.search(r"microfarm_session=([0-9a-f]+)", cookie).group(1)
        with_cookie = Http(server.port, {"Cookie": f"microfarm_session={session}"})
        assert with_cookie.get("/api/status").status == 200
        assert with_cookie.get("/").status == 200
    finally:
        stop_web(farm, server)
        farm.stop()


def test_a_flood_of_wrong_guesses_holds_no_connections_and_locks_out_only_its_own_address(tmp_path: Path) -> None:
    """Wrong credentials wait their turn (one each 0.25 s farm-wide), at most MAX_WAITING_GUESSES of them from one
    address; beyond that that address's requests are answered 429 at once, their secret unchecked (even the right
    one), so a flood neither holds the web's connections nor guesses faster, while a script (a metrics scraper)
    on another address and a browser already logged in go on."""
    farm = Farm(tmp_path / "output", secret=SECRET)
    server = start_web_on(farm, secret=SECRET)
    try:
        anonymous = Http(server.port)
        session = re.search(r"microfarm_session=([0-9a-f]+)",
                            anonymous.post_json("/login", {"secret": SECRET}).headers["Set-Cookie"]).group(1)
        with_cookie = Http(server.port, {"Cookie": f"microfarm_session={session}"})
        statuses: list[int] = []
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                reply = anonymous.get("/api/status", headers={"Authorization": "Bearer guess"})
                statuses.append(reply.status)
                if reply.status == 429:
                    assert reply.headers["Retry-After"] == "1" and "too many wrong credentials" in reply.error

        def from_elsewhere() -> int:  # the right secret from another address of this machine
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=("127.0.0.2", 0))
            try:
                conn.request("GET", "/api/status", headers={"Authorization": f"Bearer {SECRET}"})
                return conn.getresponse().status
            finally:
                conn.close()

        floods = [threading.Thread(target=flood) for _ in range(12)]
        started = time.monotonic()
        for thread in floods:
            thread.start()
        time.sleep(0.5)  # the flood is on
        own = [anonymous.get("/api/status", headers={"Authorization": f"Bearer {SECRET}"}).status for _ in range(10)]
        elsewhere = [from_elsewhere() for _ in range(10)]
        session_ok = with_cookie.get("/api/status").status
        stop.set()
        for thread in floods:
            thread.join(timeout=60)
        elapsed = time.monotonic() - started
        assert 429 in own and set(own) <= {200, 429}, own  # the flooding address's own secret: refused unchecked
        assert elsewhere == [200] * 10 and session_ok == 200
        assert set(statuses) == {401, 429}, set(statuses)
        checked = statuses.count(401)
        # Guesses checked: no more than one per 0.25 s, and the waiting line's own.
        assert checked <= MAX_WAITING_GUESSES + elapsed / FAILED_AUTH_DELAY_S + 1, (checked, elapsed)
        # The flood over, the secret works again from its address too.
        assert anonymous.get("/api/status", headers={"Authorization": f"Bearer {SECRET}"}).status == 200
    finally:
        stop_web(farm, server)
        farm.stop()


def test_requests_from_other_sites_are_refused(farm: Farm, web: Http) -> None:
    job_id = upload_job(web)
    evil = {"Origin": "http://evil.example"}
    assert web.request("POST", f"/api/jobs/{job_id}/cancel", headers=evil).status == 403
    assert web.request("DELETE", f"/api/jobs/{job_id}", headers={"Origin": "null"}).status == 403
    assert web.request("POST", f"/api/jobs/{job_id}/cancel", headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    assert web.upload(FAKE_BLEND, headers=evil).status == 403
    assert web.post_json("/login", {"secret": "x"}, headers=evil).status == 403
    # A page on another name that resolves to 127.0.0.1 (DNS rebinding) cannot even read.
    rebound = web.get("/api/status", headers={"Host": f"evil.example:{web.port}"})
    assert rebound.status == 403 and "localhost only" in rebound.error
    assert farm.call(lambda s: s.farm.jobs[job_id].state.value) == "probing"
    same_site = {"Origin": f"http://127.0.0.1:{web.port}", "Sec-Fetch-Site": "same-origin"}
    reply = web.request("POST", f"/api/jobs/{job_id}/cancel", headers=same_site)
    assert reply.status == 200 and reply.json()["message"] == f"job {job_id} cancelled"
    for path in ("/", "/api/status", "/static/app.js"):
        headers = web.get(path).headers
        assert "default-src 'self'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_job_actions(farm: Farm, web: Http) -> None:
    job_id = upload_job(web)
    assert web.request("POST", f"/api/jobs/{job_id}/pause").json()["message"] == f"job {job_id} paused"
    again = web.request("POST", f"/api/jobs/{job_id}/pause")
    assert again.status == 409 and "only a running job can be paused" in again.error
    assert web.post_json(f"/api/jobs/{job_id}/priority", {"priority": 12}).json()["job"]["priority"] == 12
    assert web.post_json(f"/api/jobs/{job_id}/priority", {"priority": "high"}).status == 400
    assert web.request("POST", f"/api/jobs/{job_id}/explode").status == 404
    assert web.request("POST", f"/api/jobs/{job_id}/resume").json()["job"]["state"] == "probing"
    video = web.post_json(f"/api/jobs/{job_id}/video", {"codec": "h264"})
    assert video.status == 409 and "a video is built from a finished job" in video.error
    assert web.post_json(f"/api/jobs/{job_id}/video", {"codec": "vp9"}).status == 400
    assert web.request("POST", f"/api/jobs/{job_id}/force-complete").json()["job"]["forced"] is True
    bad_json = web.request("POST", f"/api/jobs/{job_id}/priority", b"{not json",
                           {"Content-Type": "application/json"})
    assert bad_json.status == 400 and bad_json.error == "the request body is not valid JSON"
    view = web.get(f"/api/jobs/{job_id}").json()
    assert view["state"] == "done" and view["files_url"] == f"/api/jobs/{job_id}/files"
    deleted = web.request("DELETE", f"/api/jobs/{job_id}?files=1")
    assert deleted.json()["message"] == f"job {job_id} deleted with its files"
    assert web.get(f"/api/jobs/{job_id}").status == 404
    assert web.request("POST", "/api/jobs/clear_completed").json()["message"] == "cleared 0 finished jobs"
    assert web.get("/api/nothing").error == "there is nothing at /api/nothing"
    assert web.request("PUT", "/api/status").status == 405


class EventReader:
    """Reads a Server-Sent Events stream on a thread, keeping each `status` event with its arrival time."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", "/api/events")
        self.response = self.conn.getresponse()
        self.events: list[tuple[float, dict]] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        name = ""
        with contextlib.suppress(OSError, ValueError, AttributeError):  # AttributeError: closed under us
            while line := self.response.readline().decode():
                if line.startswith("event: "):
                    name = line[7:].strip()
                elif line.startswith("data: ") and name == "status":
                    with self.arrived:
                        self.events.append((time.monotonic(), json.loads(line[6:])))
                        self.arrived.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        with self.arrived:
            found = self.arrived.wait_for(lambda: next((e for _, e in self.events if predicate(e)), None), timeout)
        assert found, f"no event matched within {timeout} s: {self.events[-1:]}"
        return found

    def close(self) -> None:
        if self.conn.sock is not None:  # wakes the reading thread, which close() alone would wait for
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def test_events_push_changes_coalesced(farm: Farm, web: Http) -> None:
    reader = EventReader(web.port)
    try:
        assert reader.response.headers["Content-Type"] == "text/event-stream"
        first = reader.wait_for(lambda e: True)
        assert first["jobs"] == [] and first["farm"] == "test-farm"
        job_id = upload_job(web)
        reader.wait_for(lambda e: [j["id"] for j in e["jobs"]] == [job_id])
        # Twenty changes over about 0.4 s arrive as a handful of events (at most one per 0.25 s).
        before = len(reader.events)
        started = time.monotonic()
        for priority in range(1, 21):
            farm.thread.submit(farm.server.job_action("priority", job_id, {"priority": priority}))
            time.sleep(0.02)
        reader.wait_for(lambda e: bool(e["jobs"]) and e["jobs"][0]["priority"] == 20)
        burst = [t for t, _ in reader.events[before:] if t >= started]
        assert 1 <= len(burst) <= 4, [round(t - started, 3) for t in burst]
        gaps = [b - a for a, b in zip(burst, burst[1:], strict=False)]
        assert all(gap >= 0.2 for gap in gaps), gaps
    finally:
        reader.close()


@pytest.mark.ffmpeg
def test_exr_frames_get_a_png_preview(farm: Farm, web: Http, tmp_path: Path) -> None:
    job_id = upload_job(web)
    exr = tmp_path / "frame.exr"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=96x54",
                    "-frames:v", "1", "-pix_fmt", "gbrpf32le", "-c:v", "exr", str(exr)], check=True, timeout=60)

    def finish_with_exr(server: FarmService) -> None:
        job = server.farm.jobs[job_id]
        scene = SceneInfo(scene="s", engine="CYCLES", frame_start=1, frame_end=2, frame_step=1, fps=24.0,
                          resolution_x=96, resolution_y=54, percentage=100, file_format="OPEN_EXR")
        job.settings = resolve(JobRequest(file_format="OPEN_EXR"), scene)
        job.frames = {1: FrameRecord(1, FrameState.DONE, render_s=1.0), 2: FrameRecord(2)}
        server.outputs.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        server.outputs.frame_path(job_id, 1, "exr").write_bytes(exr.read_bytes())
        with server.unit():
            pass  # (a change the page is to see)
    farm.call(finish_with_exr)

    view = web.get("/api/status").json()["jobs"][0]
    assert view["thumbnail_url"] == f"/api/jobs/{job_id}/thumbnail?frame=1" and view["mean_frame_s"] == 1.0
    preview = web.get(view["thumbnail_url"])
    assert preview.status == 200 and preview.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(preview.body)).size == (96, 54)
    exr_file = web.get(f"/files/{job_id}/frame_0001.exr")
    assert exr_file.headers["Content-Disposition"].startswith("attachment")  # browsers cannot show EXR


def test_headless_server_serves_the_web_interface(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "server_addon", "--host", "127.0.0.1", "--port", "0",
                             "--no-discovery", "--output-dir", str(tmp_path / "out"), "--web-port", "0"],
                            cwd=REPO, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith("MicroFarm server listening on 127.0.0.1:")
        match = re.fullmatch(r"MicroFarm web interface on http://127\.0\.0\.1:(\d+)\n", second)
        assert match, second
        reply = Http(int(match.group(1))).get("/api/status")
        assert reply.status == 200 and reply.json()["jobs"] == []
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_server_thread_starts_the_web_interface(tmp_path: Path) -> None:
    thread = ServerThread(ServerConfig(output_dir=tmp_path / "out", host="127.0.0.1", port=0), web_port=0)
    thread.start()
    try:
        assert thread.web_port and thread.web is not None and thread.web.host == "127.0.0.1"
        page = Http(thread.web_port).get("/")
        assert page.status == 200 and b"<title>MicroFarm</title>" in page.body
        assert Http(thread.web_port).get("/api/status").json()["jobs"] == []
    finally:
        thread.stop()
    assert thread.web is None


def test_server_thread_reports_a_busy_web_port(tmp_path: Path) -> None:
    first = ServerThread(ServerConfig(output_dir=tmp_path / "a", host="127.0.0.1", port=0), web_port=0)
    first.start()
    try:
        second = ServerThread(ServerConfig(output_dir=tmp_path / "b", host="127.0.0.1", port=0),
                              web_port=first.web_port)
        with pytest.raises(OSError):
            second.start()
        assert not second.running
    finally:
        first.stop()
