"""Every kind of file a scene resolves by path, submitted with tools.submit to clients that cannot see the project.

One project made by tools.projects holds them all, each in view of the camera: a UDIM texture
(//textures/tiles.<UDIM>.png, 2 tiles), a text object with an external font, particles baked to a disk cache
(//blendcache_scene/), a library two levels deep that links its own texture, a texture at an absolute path
outside the project, an image sequence, and a driver calling a function that a registered text block defines.
The client runs in a mount namespace where the project's parent folder is an empty tmpfs (tests/hidden.py);
its frames must equal, pixel for pixel, a local render (scripts allowed) of the file where it lies.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import Clients, Farm, connected, jobs_tool, submit
from hidden import listing, require_hiding, start_hidden
from test_project_files import make_project, pixels, render_local, same_frames, stats

from client.cache import BlendCache
from client.pathmap import Mapping, PathMapError, map_path
from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.framing import encode
from protocol.handshake import server_handshake
from protocol.limits import MAX_MESSAGE_BYTES
from protocol.manifest import Manifest, ProjectFile
from protocol.stream import MessageStream
from tools.projects import FONTS

pytestmark = pytest.mark.unit

EVERYTHING = ("--texture", "--library", "--deep", "--font", "--sequence", "--udim", "--particles", "--script-driver")
FONT = "fonts/title" + next((Path(f).suffix for f in FONTS if Path(f).is_file()), ".woff2")


def test_every_kind_of_file_renders_on_a_client_that_cannot_see_the_project(farm: Farm, clients: Clients,
                                                                               tmp_path: Path) -> None:
    require_hiding()
    hidden = tmp_path / "hidden"  # the clients' view of it: an empty folder
    work, ext = hidden / "work", hidden / "ext"
    blend = make_project(work, ext, *EVERYTHING)
    local, without_scripts = tmp_path / "local", tmp_path / "local-no-scripts"
    render_local(blend, local, "--allow-scripts")
    render_local(blend, without_scripts)
    assert not np.array_equal(pixels(local / "frame_0001.png"), pixels(without_scripts / "frame_0001.png")), \
        "the driver's registered function changes the frame"

    queued = submit(farm, blend, "--queue", "--needs-scripts", wait=False)
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    assert f"outside the project: {ext / 'noise.png'}" in queued.stderr
    relpaths = {f.relpath for f in farm.call(lambda s: s.farm.jobs[job_id].manifest.files)}
    main = farm.call(lambda s: s.farm.jobs[job_id].manifest.main)
    assert main == "scene.blend", "the .blend keeps its own name: Blender finds blendcache_scene/ by it"
    expected = {"scene.blend", "textures/wood.png", "textures/tiles.1001.png", "textures/tiles.1002.png", FONT,
                "seq/flip_0001.png", "seq/flip_0002.png", "lib/props.blend", "lib/tex/marble.png",
                "lib/deep/rock.blend", "lib/deep/tex/rock.png", f"_outside_project{(ext / 'noise.png').as_posix()}"}
    assert expected <= relpaths, expected - relpaths
    caches = {p for p in relpaths if p.startswith("blendcache_scene/")}
    assert len(caches) == 3 and all(p.endswith(".bphys") for p in caches), relpaths  # frames 0, 1 and 2
    assert len(relpaths) == len(expected) + len(caches), relpaths - expected - caches

    start_hidden(clients, "hidden", farm.address, hidden, "--allow-scripts")
    assert listing(hidden) == [], "the client must not see the project"
    farm.wait_until(connected(1), what="client")
    assert jobs_tool(farm.address, "resume", job_id).returncode == 0
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=180, what="the job")
    job = farm.job(job_id)
    log = clients.log("hidden")
    assert job["state"] == "done", (job, log[-3000:])
    assert job["warnings"] == [], job["warnings"]
    same_frames(farm, job_id, local)
    for complaint in ("does not exist", "missing", "doesn't exist", "PyDriver", "scripts disabled"):
        assert complaint not in log, (complaint, log[-3000:])


# --- a farm on shared storage: only the .blend travels, clients map the prefix they reach it by -------------

def test_path_maps_replace_prefixes_at_folder_boundaries() -> None:
    posix = Mapping.parse("/studio/projects=/mnt/projects/")
    assert map_path((posix,), "/studio/projects/shot/wood.png") == "/mnt/projects/shot/wood.png"
    assert map_path((posix,), "/studio/projects") == "/mnt/projects"
    assert map_path((posix,), "/studio/projects2/wood.png") is None, "not at a folder boundary"
    assert map_path((posix,), "/Studio/projects/wood.png") is None, "POSIX paths keep their case"
    assert map_path((posix,), "//textures/wood.png") is None, "relative paths are the .blend's own"
    windows = Mapping.parse("P:\\Projects=/mnt/projects")
    assert map_path((windows,), "p:\\projects\\shot\\wood.png") == "/mnt/projects/shot/wood.png"
    assert map_path((windows,), "P:/Projects/shot/wood.png") == "/mnt/projects/shot/wood.png"
    to_windows = Mapping.parse("/mnt/projects=P:\\Projects")
    assert map_path((to_windows,), "/mnt/projects/shot/wood.png") == "P:\\Projects\\shot\\wood.png"
    first = (Mapping.parse("/a/b=/x"), Mapping.parse("/a=/y"))
    assert map_path(first, "/a/b/c.png") == "/x/c.png" and map_path(first, "/a/c.png") == "/y/c.png"
    unc = Mapping.parse("\\\\nas\\projects=/mnt/projects")
    assert map_path((unc,), "\\\\NAS\\Projects\\wood.png") == "/mnt/projects/wood.png"
    for bad in ("/a", "=/b", "/a=", "relative/a=/b", "C:=", "=C:\\x"):
        with pytest.raises(PathMapError):
            Mapping.parse(bad)


def test_a_farm_on_shared_storage_sends_only_the_blend(farm: Farm, clients: Clients, tmp_path: Path) -> None:
    require_hiding()
    hidden = tmp_path / "hidden"  # the shared storage as the artist's machine names it
    work, ext = hidden / "work", hidden / "ext"
    blend = make_project(work, ext, "--texture", "--library", "--deep", "--font", "--sequence", "--udim")
    view = tmp_path / "view"  # the same storage as the client reaches it
    shutil.copytree(hidden, view)
    local = tmp_path / "local"
    render_local(blend, local)

    start_hidden(clients, "mapped", farm.address, hidden, "--path-map", f"{hidden}={view}")
    farm.wait_until(connected(1), what="client")
    before = stats(farm)
    done = submit(farm, blend, "--shared-storage")
    log = clients.log("mapped")
    assert done.returncode == 0, (done.stderr, log[-3000:])
    assert f"shared storage: //textures/wood.png is read from {work / 'textures' / 'wood.png'}" in done.stderr
    after = stats(farm)
    assert after[1] - before[1] == 1, "only the .blend travels"
    assert after[0] - before[0] < blend.stat().st_size + 4096
    job_id = done.stdout.strip()
    assert farm.job(job_id)["warnings"] == []
    same_frames(farm, job_id, local)
    # Blender says the library is missing as it opens the file, before the client maps its path: not after.
    assert "path map: 6 paths rewritten" in log, log[-3000:]
    assert "does not exist" not in log and "files the scene uses are missing" not in log, log[-3000:]


# --- a file of the open job removed or damaged on the client ------------------------------------------------

class _Server:
    """Stands in for the link: serves job files by sha256 into the client's real store, counting them."""

    def __init__(self, cache: BlendCache, files: dict[str, bytes]) -> None:
        self.cache = cache
        self.files = {hashlib.sha256(data).hexdigest(): data for data in files.values()}
        self.sent: list[str] = []

    def fetch_blend(self, _epoch: int, sha256: str, size: int, name: str = "") -> Path:
        found = self.cache.lookup(sha256, size, name)
        if found is not None:
            return found
        self.sent.append(name)
        sink = self.cache.sink(sha256, size)
        sink.write(self.files[sha256])
        sink.finish(sha256)
        return self.cache.commit(sink, sha256)

    def set_state(self, *_args: object, **_kwargs: object) -> None:
        pass


class _Renderer:
    def __init__(self) -> None:
        self.current_sha: str | None = None
        self.opened: list[Path] = []

    def open(self, path: Path, key: str) -> None:
        self.opened.append(path)
        self.current_sha = key


@pytest.mark.integration
@pytest.mark.bpy
def test_a_file_gone_from_an_open_jobs_folder_is_named_and_fetched_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from client.worker import Worker

    files = {"scene.blend": b"BLENDER-v500 scene", "textures/wood.png": b"wood pixels",
             "seq/flip_0001.png": b"flip one"}
    manifest = Manifest.build([ProjectFile(relpath, hashlib.sha256(data).hexdigest(), len(data))
                               for relpath, data in files.items()], "scene.blend")
    server = _Server(BlendCache(tmp_path / "cache"), files)
    renderer = _Renderer()
    worker = Worker(server, renderer)  # type: ignore[arg-type]
    try:
        worker._open(1, "job-1", manifest)
        worker._open(1, "job-1", manifest)  # warm: nothing fetched, nothing opened again
        assert len(renderer.opened) == 1 and sorted(server.sent) == sorted(files)
        folder = renderer.opened[0].parent
        (folder / "textures" / "wood.png").unlink()  # gone from the job folder
        store_copy = server.cache.path(hashlib.sha256(b"flip one").hexdigest())
        os.chmod(store_copy, 0o644)
        store_copy.write_bytes(b"flip 0ne")  # damaged in the store (and so in the job folder: a hard link)
        server.sent.clear()
        with caplog.at_level(logging.WARNING):
            worker._open(1, "job-1", manifest)
        assert "job-1: //textures/wood.png, //seq/flip_0001.png gone or changed on this client" in caplog.text
        assert "stored file //seq/flip_0001.png" in caplog.text and "no longer matches its checksum" in caplog.text
        assert server.sent == ["seq/flip_0001.png"], "the store still had the wood: laid out again, not fetched"
        assert len(renderer.opened) == 2
        assert {relpath: (folder / relpath).read_bytes() for relpath in files} == files
    finally:
        worker.folders.close()
        shutil.rmtree(worker.scratch, ignore_errors=True)


# --- a rogue server names hostile paths to a real client ------------------------------------------------------

@pytest.mark.asyncio
async def test_a_real_client_never_writes_where_a_rogue_server_points(clients: Clients, tmp_path: Path) -> None:
    """The server a client found may be a stranger's: job files it names outside the job folder are refused
    on receipt (the connection closes with the reason) and nothing is written there, though it would send
    the bytes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = ["../../../outside/escape.png", f"{outside}/escape.png", "a/../../../../outside/escape.png",
               "C:\\outside\\escape.png", "\\\\host\\share\\escape.png"]
    blend, payload = b"BLENDER-v500 rogue", b"payload"
    data = {hashlib.sha256(d).hexdigest(): d for d in (blend, payload)}
    blend_sha, payload_sha = list(data)
    served: list[str] = []
    closed: asyncio.Queue[str] = asyncio.Queue()

    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = MessageStream(reader, writer)
        path = hostile[min(len(served), len(hostile) - 1)]
        served.append(path)
        try:
            await server_handshake(stream, farm="rogue", secret=None, assign_id=lambda _peer: "c1", heartbeat_s=1.0)
            files = [{"relpath": "scene.blend", "sha256": blend_sha, "size": len(blend)},
                     {"relpath": path, "sha256": payload_sha, "size": len(payload)}]
            writer.write(encode({"t": "probe", "lease_id": 1, "job_id": "j1", "blend_sha256": blend_sha,
                                 "blend_size": len(blend), "allow_scripts": False, "files": files,
                                 "main": "scene.blend"}, MAX_MESSAGE_BYTES))
            await writer.drain()
            while True:  # serve whatever is asked for, as a rogue would
                message = await stream.recv()
                if isinstance(message, m.BlendRequest) and message.sha256 in data:
                    await stream.send(m.BlendBegin(sha256=message.sha256, size=len(data[message.sha256])))
                    await stream.send(m.Chunk(data=data[message.sha256]))
                    await stream.send(m.End(sha256=message.sha256))
        except (ProtocolError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            await closed.put(path)
            await stream.aclose()

    server = await asyncio.start_server(rogue, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        clients.start("target", f"127.0.0.1:{port}")
        for path in hostile:
            assert await asyncio.wait_for(closed.get(), 60) == path
    finally:
        server.close()
        clients.stop_all()
    log = clients.log("target")
    for path in hostile:
        assert f"lost: the project path {path[:80]!r} " in log, (path, log[-3000:])  # (names are cut at 80)
    assert list(outside.iterdir()) == [] and not list(tmp_path.rglob("escape.png")), "written outside"
    assert not any(p.name == hashlib.sha256(payload).hexdigest() for p in tmp_path.rglob("*")), "not even stored"
