"""A web upload's trace looks at the upload only: outside paths are named as written, never listed; bombs are capped.

BAT 1.23 globs `<UDIM>` (recursively), sequences and folders on the disk it runs on; on the server that disk
is not the artist's. A .blend naming `/etc/<UDIM>`, `//../../../etc/ssl/<UDIM>`, the server's own store or a
sequence pattern outside must be refused naming those paths as written, with no name from the server's disk in
the reply, and nothing outside the staging folder stat'ed, listed or globbed. A small compressed .blend that
decompresses to far more than the upload limit is refused at the limit (measured in TMPDIR and staging), and a
legit compressed .blend with its texture traces and renders.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import REPO, Clients, Farm, connected, repo_env
from test_web_projects import (
    RENDER_TIMEOUT_S,
    SMALL_LIMIT,
    make_project,
    pixels,
    post,
    render_local,
    sha,
    staging_left,
    store_of,
    upload_zip,
    zip_folder,
)
from web_support import Http, start_web_on, stop_web

from server_addon.core.confine import Confinement, TraceLimit
from server_addon.web import projects
from server_addon.web.staging import STAGING_DIR

pytestmark = pytest.mark.unit

#: Saves a .blend whose images name the paths given: "tiled:PATH", "sequence:PATH" or "file:PATH".
IMAGES = """
import bpy, sys
out, specs = sys.argv[-1], sys.argv[sys.argv.index("--") + 1:-1]
bpy.ops.wm.read_factory_settings(use_empty=True)
for number, spec in enumerate(specs):
    kind, path = spec.split(":", 1)
    image = bpy.data.images.new(f"probe{number}", 4, 4, tiled=kind == "tiled")
    image.source = {"tiled": "TILED", "sequence": "SEQUENCE", "file": "FILE"}[kind]
    image.filepath = path
    image.use_fake_user = True
bpy.ops.wm.save_as_mainfile(filepath=out, compress=False, relative_remap=False)
"""
RESAVE_COMPRESSED = """
import bpy, sys
bpy.ops.wm.open_mainfile(filepath=sys.argv[-1])
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1], compress=True, relative_remap=False)
"""


@pytest.fixture
def web(farm: Farm) -> Iterator[Http]:
    server = start_web_on(farm, max_upload_bytes=SMALL_LIMIT)
    yield Http(server.port)
    stop_web(farm, server)


def bpy_script(script: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", script, "--", *args], cwd=REPO, env=repo_env(), check=True,
                   capture_output=True, timeout=180)


@pytest.fixture
def touched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every stat, listing and glob of a path under /etc or /usr/share in this process while the test runs."""
    seen: list[str] = []

    def spy(name: str, real):  # type: ignore[no-untyped-def]
        def call(path=".", *args, **kwargs):  # type: ignore[no-untyped-def]
            text = os.fsdecode(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if text.startswith(("/etc", "/usr/share")):
                seen.append(f"{name} {text}")
            return real(path, *args, **kwargs)
        return call

    for name in ("stat", "lstat", "scandir", "listdir"):
        monkeypatch.setattr(os, name, spy(f"os.{name}", getattr(os, name)))
    monkeypatch.setattr(glob, "glob", spy("glob.glob", glob.glob))
    monkeypatch.setattr(glob, "iglob", spy("glob.iglob", glob.iglob))
    yield seen


@pytest.mark.bpy
def test_outside_paths_are_named_as_written_and_nothing_of_the_disk_is_listed(
        farm: Farm, web: Http, tmp_path: Path, touched: list[str]) -> None:
    # Someone else's job first: the store holds files whose names (sha256s) a listing would give away.
    victim = make_project(tmp_path / "victim", "--texture")
    assert upload_zip(web, zip_folder(victim.parent), start="0").status == 201
    stored = set(store_of(farm))
    assert stored
    data_dir = farm.call(lambda s: s.config.resolved_data_dir)
    store_root = farm.call(lambda s: s.files.root)
    # project/ in <data dir>/staging/<random>/: three folders up is the data dir
    store = "//../../../" + store_root.relative_to(data_dir).as_posix() + "/<UDIM>"
    written = ["/etc/<UDIM>", "//" + "../" * 30 + "etc/ssl/<UDIM>", store, "/usr/share/**/<UDIM>",
               "/etc/*.conf", "/etc/passwd"]
    specs = [f"tiled:{p}" for p in written[:4]] + [f"sequence:{written[4]}", f"file:{written[5]}"]
    blend = tmp_path / "shot.blend"
    bpy_script(IMAGES, *specs, str(blend))
    on_disk = {e for folder in ("/etc", "/etc/ssl", "/usr/share") for e in os.listdir(folder)}
    touched.clear()

    started = time.monotonic()
    for reply in (post(web, [("file", "shot.blend", blend.read_bytes())]),
                  upload_zip(web, zip_of({"proj/shot.blend": blend.read_bytes()}))):
        assert reply.status == 400, reply.body
        body = reply.json()
        assert (body["missing"], sorted(body["outside"])) == ([], sorted(written)), reply.body
        text = reply.body.decode()
        assert not [name for name in stored if name in text], "the store's file names must never be shown"
        shown = [name for name in on_disk if len(name) > 3 and name in text and not any(name in w for w in written)]
        assert shown == [], f"names from the server's disk in the reply: {shown}"
        assert str(data_dir) not in text and STAGING_DIR + "/" not in text
    assert touched == [], f"the trace looked at the server's disk: {touched[:10]}"
    assert time.monotonic() - started < 60, "nothing was walked: the refusal is quick"
    assert farm.call(lambda s: len(s.farm.jobs)) == 1 and set(store_of(farm)) == stored and staging_left(farm) == []


def zip_of(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def bomb(kind: str, size: int) -> bytes:
    """A .blend header and `size` zero bytes, compressed: a few KiB that decompress to `size`."""
    out = io.BytesIO()
    zero = bytes(1 << 20)
    if kind == "zstd":
        with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as writer:
            writer.write(b"BLENDER-v405")
            for _ in range(size >> 20):
                writer.write(zero)
    else:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as writer:
            writer.write(b"BLENDER-v405")
            for _ in range(size >> 20):
                writer.write(zero)
    return out.getvalue()


def folder_bytes(folder: Path, recursive: bool) -> int:
    """The bytes of the files in `folder` (and below): what is removed while counting counts as gone."""
    total = 0
    for parent, _dirs, names in os.walk(folder):  # os.walk ignores folders that vanish
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                pass
        if not recursive:
            break
    return total


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_a_compressed_bomb_is_refused_at_the_upload_limit(farm: Farm, web: Http, kind: str) -> None:
    data = bomb(kind, 512 << 20)
    assert len(data) < 1 << 20
    tmp = Path(tempfile.gettempdir())
    staging = farm.call(lambda s: s.config.resolved_data_dir) / STAGING_DIR
    tmp_before = folder_bytes(tmp, recursive=False)
    peaks = {"tmp": 0, "staging": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peaks["tmp"] = max(peaks["tmp"], folder_bytes(tmp, recursive=False) - tmp_before)
            if staging.exists():
                peaks["staging"] = max(peaks["staging"], folder_bytes(staging, recursive=True))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        single = post(web, [("file", "bomb.blend", data)])
        zipped = upload_zip(web, zip_of({"proj/bomb.blend": data}))
    finally:
        done.set()
        watcher.join(timeout=10)
    elapsed = time.monotonic() - started
    print(f"{kind} bomb: {len(data)} bytes uploaded, 512 MiB inside; refused in {elapsed:.2f} s; peak growth: "
          f"TMPDIR {peaks['tmp']} bytes, staging {peaks['staging']} bytes (cap {SMALL_LIMIT})")
    for reply, name in ((single, "bomb.blend"), (zipped, "proj/bomb.blend")):
        assert reply.status == 413, reply.body
        assert reply.error == f"refused: {name} decompresses to more than 32 MiB, more than this farm accepts"
    assert peaks["staging"] <= SMALL_LIMIT + 2 * len(data) + (1 << 20), peaks
    assert peaks["tmp"] < 1 << 20, "nothing is decompressed into TMPDIR"
    assert farm.call(lambda s: len(s.farm.jobs)) == 0 and store_of(farm) == {} and staging_left(farm) == []


@pytest.mark.bpy
def test_a_trace_over_its_time_limit_is_refused(farm: Farm, web: Http, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    blend = make_project(tmp_path / "work")
    monkeypatch.setattr(projects, "WEB_TRACE_SECONDS", 0.0)
    reply = post(web, [("file", "scene.blend", blend.read_bytes())])
    assert reply.status == 400, reply.body
    assert "took longer than 0 s, the limit for a web upload" in reply.error, reply.error
    assert farm.call(lambda s: len(s.farm.jobs)) == 0 and staging_left(farm) == []


def test_sequences_and_tiles_are_expanded_from_the_uploads_files(tmp_path: Path) -> None:
    files = ["t/tiles.1001.png", "t/tiles.1002.png", "t/.tiles.1003.png", "seq/flip_0001.png",
             "seq/flip_0002.png", "seq/other.png", "cache/a.bphys", "cache/sub/b.bphys"]
    confine = Confinement(tmp_path, files, tmp_path.parent / "scratch", 0, 60)
    assert confine.expand(tmp_path / "t/tiles.<UDIM>.png") == [tmp_path / "t/tiles.1001.png",
                                                                 tmp_path / "t/tiles.1002.png"]
    assert confine.expand(tmp_path / "seq/flip_0001.png") == [tmp_path / "seq/flip_0001.png",
                                                               tmp_path / "seq/flip_0002.png"]
    assert confine.expand(tmp_path / "seq/other.png") == [tmp_path / "seq/other.png"]
    assert confine.expand(tmp_path / "cache") == [tmp_path / "cache/a.bphys", tmp_path / "cache/sub/b.bphys"]
    assert confine.expand(tmp_path / "nope.png") is None
    assert confine.expand(tmp_path / "**" / "<UDIM>") == [], "no folder is globbed"
    assert confine.expand("/etc/<UDIM>") is None and not confine.holds(tmp_path / "../x.png")
    many = Confinement(tmp_path, [f"t/tile.{n}.png" for n in range(1000)], tmp_path / "s", 0, 60)
    with pytest.raises(TraceLimit, match="compared more than"):
        for n in range(3000):  # each distinct pattern compares the folder's 1000 names
            many.expand(tmp_path / f"t/x{n}.<UDIM>.png")


def test_a_compressed_project_blend_travels_as_uploaded_and_renders(farm: Farm, clients: Clients, web: Http,
                                                                    tmp_path: Path) -> None:
    work = tmp_path / "work"
    blend = make_project(work, "--texture")
    bpy_script(RESAVE_COMPRESSED, str(blend))
    for leftover in work.rglob("*.blend1"):
        leftover.unlink()
    compressed = blend.read_bytes()
    assert compressed[:4] == b"\x28\xb5\x2f\xfd", "Blender saves it zstd-compressed"
    local = tmp_path / "local"
    render_local(blend, local)
    files = {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    assert sorted(files) == ["scene.blend", "textures/wood.png"]

    reply = upload_zip(web, zip_folder(work, prefix="shot/"), start="0")
    assert reply.status == 201, reply.body
    project = reply.json()["project"]
    assert (project["files"], project["missing"], project["outside"], project["traced"]) == (2, [], [], True)
    job_id = reply.json()["id"]
    manifest = farm.call(lambda s: s.farm.jobs[job_id].manifest)
    assert {f.relpath: f.sha256 for f in manifest.files} == {f"shot/{r}": sha(d) for r, d in files.items()}
    assert staging_left(farm) == []

    clients.start("solo", farm.address)
    farm.wait_until(connected(1), what="client")
    assert web.request("POST", f"/api/jobs/{job_id}/resume").status == 200
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=RENDER_TIMEOUT_S, what="the job")
    view = web.get(f"/api/jobs/{job_id}").json()
    assert view["state"] == "done" and view["warnings"] == [], (view, clients.log("solo")[-3000:])
    for frame in sorted((farm.output / job_id).glob("frame_*.png")):
        assert np.array_equal(pixels(frame), pixels(local / frame.name)), f"{frame.name} differs from local"
