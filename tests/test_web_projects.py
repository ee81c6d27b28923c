"""Projects through the web upload: a .zip or a folder of the project, traced on the server, stored by content.

Real bpy, real files: projects made by tools.projects (a texture at //textures/wood.png, a collection linked
from //lib/props.blend with its own //tex/marble.png, a texture at an absolute path outside the project),
uploaded over real HTTP; the frames of a real client must match a local render pixel for pixel, while the
project folder was deleted after the upload. Hostile zips are refused and write nothing outside the staging
folder, which is always removed.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Clients, Farm, connected, repo_env
from hidden import listing, require_hiding, start_hidden
from PIL import Image
from test_project_kinds import EVERYTHING, FONT
from web_support import Http, Reply, start_web_on, stop_web

from server_addon.web.staging import MAX_ZIP_ENTRIES, STAGING_DIR

pytestmark = pytest.mark.integration

#: The hostile-zip tests run with a small upload limit, so that a bomb is a bomb without filling the disk.
SMALL_LIMIT = 32 * 1024 * 1024
RENDER_TIMEOUT_S = 180


@pytest.fixture
def web(farm: Farm) -> Iterator[Http]:
    server = start_web_on(farm, max_upload_bytes=SMALL_LIMIT)
    yield Http(server.port)
    stop_web(farm, server)


def make_project(out: Path, *flags: str) -> Path:
    subprocess.run([sys.executable, "-m", "tools.projects", str(out), *flags], cwd=REPO, env=repo_env(),
                   check=True, capture_output=True, timeout=180)
    for leftover in out.rglob("*.blend1"):
        leftover.unlink()
    return out / "scene.blend"


def zip_folder(folder: Path, prefix: str = "", skip: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relpath = path.relative_to(folder).as_posix()
            if path.is_file() and relpath not in skip:
                archive.write(path, prefix + relpath)
    return out.getvalue()


def post(http: Http, files: list[tuple[str, str, bytes]], **fields: str) -> Reply:
    """A multipart job upload: the fields first, then each (part name, file name, bytes)."""
    boundary = f"----microfarm{secrets.token_hex(8)}"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return http.request("POST", "/api/jobs", b"".join(parts),
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def upload_zip(http: Http, data: bytes, name: str = "project.zip", **fields: str) -> Reply:
    return post(http, [("file", name, data)], **fields)


def upload_folder(http: Http, folder: dict[str, bytes], **fields: str) -> Reply:
    return post(http, [("files", relpath, data) for relpath, data in folder.items()], **fields)


def render_local(blend: Path, out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "tools.render_local", str(blend), "1", "2", str(out), *extra], cwd=REPO,
                   env=repo_env(), check=True, capture_output=True, timeout=180)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.int16)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_of(farm: Farm) -> dict[str, int]:
    root = farm.call(lambda s: s.files.root)
    return {p.name: p.stat().st_size for p in root.iterdir()}


def staging_left(farm: Farm) -> list[Path]:
    staging = farm.call(lambda s: s.config.resolved_data_dir) / STAGING_DIR
    return sorted(staging.rglob("*")) if staging.exists() else []


def test_a_zip_project_renders_like_a_local_render(farm: Farm, clients: Clients, web: Http, tmp_path: Path) -> None:
    work = tmp_path / "work"
    blend = make_project(work, "--texture", "--library")
    local = tmp_path / "local"
    render_local(blend, local)
    files = {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    assert sorted(files) == ["lib/props.blend", "lib/tex/marble.png", "scene.blend", "textures/wood.png"]
    archive = zip_folder(work, prefix="shot/")  # as a file manager zips a folder: everything in one folder
    shutil.rmtree(work)  # from here on the project exists only in the zip the browser sent

    reply = upload_zip(web, archive, chunk="2", start="0")
    assert reply.status == 201, reply.body
    project = reply.json()["project"]
    total = sum(len(data) for data in files.values())
    assert project == {
        "main": "shot/scene.blend", "files": 4, "bytes": total, "uploaded_files": 4, "uploaded_bytes": total,
        "stored_files": 4, "stored_bytes": total, "reused_files": 0, "reused_bytes": 0,
        "missing": [], "missing_count": 0, "outside": [], "outside_count": 0, "unused": [], "unused_count": 0,
        "traced": True, "trace_error": None}
    job_id = reply.json()["id"]
    manifest = farm.call(lambda s: s.farm.jobs[job_id].manifest)
    assert manifest.main == "shot/scene.blend"
    assert {f.relpath: f.sha256 for f in manifest.files} == {f"shot/{r}": sha(d) for r, d in files.items()}
    assert store_of(farm) == {sha(d): len(d) for d in files.values()}
    assert reply.json()["job"]["name"] == "scene.blend" and reply.json()["job"]["files"] == 4
    assert staging_left(farm) == []

    # The same zip again: nothing new is stored.
    again = upload_zip(web, archive, start="0")
    assert again.status == 201, again.body
    assert (again.json()["project"]["stored_bytes"], again.json()["project"]["reused_files"]) == (0, 4)
    assert store_of(farm) == {sha(d): len(d) for d in files.values()}

    # The same project as a folder (each file with its relative path), with a file the scene does not need.
    folder = {f"shot/{relpath}": data for relpath, data in files.items()}
    folder["shot/notes/todo.txt"] = b"not needed by the scene"
    as_folder = upload_folder(web, folder, start="0")
    assert as_folder.status == 201, as_folder.body
    summary = as_folder.json()["project"]
    assert (summary["files"], summary["stored_files"], summary["reused_files"]) == (4, 0, 4)
    assert summary["unused"] == ["shot/notes/todo.txt"] and summary["uploaded_files"] == 5
    folder_job = as_folder.json()["id"]
    assert farm.call(lambda s: s.farm.jobs[folder_job].manifest) == manifest
    assert sha(b"not needed by the scene") not in store_of(farm)

    clients.start("solo", farm.address)
    farm.wait_until(connected(1), what="client")
    assert web.request("POST", f"/api/jobs/{job_id}/resume").status == 200
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=RENDER_TIMEOUT_S, what="the zip's job")
    view = web.get(f"/api/jobs/{job_id}").json()
    assert view["state"] == "done" and view["warnings"] == [], (view, clients.log("solo")[-3000:])
    frames = sorted((farm.output / job_id).glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_0001.png", "frame_0002.png"]
    for frame in frames:
        assert np.array_equal(pixels(frame), pixels(local / frame.name)), f"{frame.name} differs from local"
    assert "does not exist" not in clients.log("solo") and "missing" not in clients.log("solo").lower()


def test_every_kind_of_file_in_a_zip_renders_on_a_client_that_cannot_see_it(
        farm: Farm, clients: Clients, web: Http, tmp_path: Path) -> None:
    """The all-kinds project of tests/test_project_kinds.py through the web: a zip of its folder, traced on the
    server, rendered by a client (scripts allowed, the job needing them) for which the folder is empty."""
    require_hiding()
    hidden = tmp_path / "hidden"
    work = hidden / "work"
    blend = make_project(work, *EVERYTHING)  # no --external: a browser's upload cannot bring an outside file
    local = tmp_path / "local"
    render_local(blend, local, "--allow-scripts")
    files = {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    caches = {r for r in files if r.startswith("blendcache_scene/")}
    assert len(caches) == 3 and all(r.endswith(".bphys") for r in caches), sorted(files)
    assert set(files) - caches == {
        "scene.blend", "textures/wood.png", "textures/tiles.1001.png", "textures/tiles.1002.png", FONT,
        "seq/flip_0001.png", "seq/flip_0002.png", "lib/props.blend", "lib/tex/marble.png", "lib/deep/rock.blend",
        "lib/deep/tex/rock.png"}, sorted(files)
    archive = zip_folder(work, prefix="shot/")
    shutil.rmtree(work)  # the project exists only in the zip the browser sent

    reply = upload_zip(web, archive, start="0", needs_scripts="1")
    assert reply.status == 201, reply.body
    project = reply.json()["project"]
    assert (project["files"], project["missing"], project["outside"], project["unused"]) == (len(files), [], [], [])
    job_id = reply.json()["id"]
    manifest = farm.call(lambda s: s.farm.jobs[job_id].manifest)
    assert manifest.main == "shot/scene.blend", "the .blend keeps its own name: Blender finds blendcache_scene/ by it"
    assert {f.relpath: f.sha256 for f in manifest.files} == {f"shot/{r}": sha(d) for r, d in files.items()}
    assert farm.call(lambda s: s.farm.jobs[job_id].request.needs_scripts)

    start_hidden(clients, "hidden", farm.address, hidden, "--allow-scripts")
    assert listing(hidden) == [], "the client must not see the project"
    farm.wait_until(connected(1), what="client")
    assert web.request("POST", f"/api/jobs/{job_id}/resume").status == 200
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=RENDER_TIMEOUT_S, what="the zip's job")
    view = web.get(f"/api/jobs/{job_id}").json()
    log = clients.log("hidden")
    assert view["state"] == "done" and view["warnings"] == [], (view, log[-3000:])
    frames = sorted((farm.output / job_id).glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_0001.png", "frame_0002.png"]
    for frame in frames:
        assert np.array_equal(pixels(frame), pixels(local / frame.name)), f"{frame.name} differs from local"
    for complaint in ("does not exist", "missing", "doesn't exist", "PyDriver", "scripts disabled"):
        assert complaint not in log, (complaint, log[-3000:])


@pytest.mark.bpy
def test_an_outside_path_of_the_all_kinds_project_is_named_in_the_refusal(farm: Farm, web: Http,
                                                                         tmp_path: Path) -> None:
    work, external = tmp_path / "work", tmp_path / "ext"
    make_project(work, *EVERYTHING, "--external", str(external))
    noise = external / "noise.png"
    archive = zip_folder(work, prefix="shot/")
    everything_inside = sum(1 for p in work.rglob("*") if p.is_file())
    refused = upload_zip(web, archive, needs_scripts="1")
    assert refused.status == 400, refused.body
    assert (refused.json()["missing"], refused.json()["outside"]) == ([], [str(noise)]), refused.body
    assert f"1 file(s) the scene needs are missing: outside the upload (the server does not read its own disk " \
           f"for them): {noise}" in refused.error
    assert farm.call(lambda s: len(s.farm.jobs)) == 0 and store_of(farm) == {} and staging_left(farm) == []

    allowed = upload_zip(web, archive, allow_missing="1", needs_scripts="1", start="0")
    assert allowed.status == 201, allowed.body
    project = allowed.json()["project"]
    assert (project["missing"], project["outside"], project["files"]) == ([], [str(noise)], everything_inside)
    assert sha(noise.read_bytes()) not in store_of(farm), "never read from the server's disk"
    view = web.get(f"/api/jobs/{allowed.json()['id']}").json()
    assert view["warnings"] == [f"outside the upload (not read from the server's disk): {noise}"], view


@pytest.mark.bpy
def test_missing_and_outside_files_are_named(farm: Farm, web: Http, tmp_path: Path) -> None:
    work, external = tmp_path / "work", tmp_path / "ext"
    make_project(work, "--texture", "--external", str(external))
    noise = external / "noise.png"
    assert noise.is_file()  # on this disk, which is the server's: never read for a web upload
    archive = zip_folder(work, skip=("textures/wood.png",))

    refused = upload_zip(web, archive)
    assert refused.status == 400
    body = refused.json()
    assert body["missing"] == ["//textures/wood.png"] and body["outside"] == [str(noise)]
    assert "2 file(s) the scene needs are missing: not in the upload: //textures/wood.png" in body["error"]
    assert farm.call(lambda s: len(s.farm.jobs)) == 0 and store_of(farm) == {} and staging_left(farm) == []

    allowed = upload_zip(web, archive, allow_missing="1", start="0")
    assert allowed.status == 201, allowed.body
    project = allowed.json()["project"]
    assert (project["missing"], project["outside"], project["files"]) == (["//textures/wood.png"], [str(noise)], 1)
    assert sha(noise.read_bytes()) not in store_of(farm)
    view = web.get(f"/api/jobs/{allowed.json()['id']}").json()
    assert view["warnings"] == ["missing from the upload: //textures/wood.png",
                                f"outside the upload (not read from the server's disk): {noise}"]
    assert view["allow_missing"] is True

    # A single .blend is traced too: its texture is named before any client opens it.
    single = post(web, [("file", "scene.blend", (work / "scene.blend").read_bytes())])
    assert single.status == 400 and single.json()["missing"] == ["//textures/wood.png"], single.body


@pytest.mark.bpy
def test_the_main_blend_is_chosen_or_asked_for(farm: Farm, web: Http, tmp_path: Path) -> None:
    work = tmp_path / "work"
    make_project(work)
    shutil.copyfile(work / "scene.blend", work / "other.blend")
    archive = zip_folder(work)
    asked = upload_zip(web, archive)
    assert asked.status == 400 and asked.json()["candidates"] == ["other.blend", "scene.blend"]
    assert "2 .blend files at the top level (other.blend, scene.blend)" in asked.error
    assert "field 'main'" in asked.error
    chosen = upload_zip(web, archive, main="other.blend", start="0")
    assert chosen.status == 201, chosen.body
    assert chosen.json()["project"]["main"] == "other.blend" and chosen.json()["project"]["unused"] == ["scene.blend"]
    assert upload_zip(web, archive, main="nope.blend").status == 400
    no_blend = upload_folder(web, {"textures/wood.png": b"pixels"})
    assert no_blend.status == 400 and "holds no .blend" in no_blend.error


def zip_of(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


def symlink_zip() -> bytes:
    link = zipfile.ZipInfo("textures/wood.png")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    return zip_of(("scene.blend", b"BLENDER-v500"), (link, b"/etc/passwd"))


def many_entries_zip(count: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for n in range(count):
            archive.writestr(f"f/{n}", b"")
    return out.getvalue()


def lying_zip(declared: int, actual: int) -> bytes:
    """A zip of one entry of `actual` zero bytes whose headers say it holds `declared` bytes."""
    data = bytearray(zip_of(("scene.blend", b"BLENDER-v500" + bytes(actual - 12))))
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, declared)
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)
    return bytes(data)


HOSTILE_ZIPS = {
    "parent": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("../evil.png", b"evil")), "'..' part"),
    "deep-parent": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("a/../../evil.png", b"evil")), "'..' part"),
    "absolute": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("/tmp/microfarm-evil.png", b"evil")),
                 "is absolute"),
    "drive": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("C:\\evil.png", b"evil")), "backslash"),
    "drive-slash": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("C:/evil.png", b"evil")), "is absolute"),
    "backslash": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("..\\..\\evil.png", b"evil")), "backslash"),
    "symlink": (symlink_zip, "is a symbolic link"),
    "duplicate": (lambda: zip_of(("scene.blend", b"BLENDER-v500"), ("Tex.png", b"a"), ("tex.png", b"b")),
                  "twice"),
    "entries": (lambda: many_entries_zip(100_000), "lists 100000 entries; a project holds at most"),
    "declared-bomb": (lambda: lying_zip(3 * 1024**3, 1024),
                      "unpacks to 3.0 GiB (3221225472 bytes), more than the 32.0 MiB"),
    "actual-bomb": (lambda: lying_zip(1024, 24 * 1024 * 1024), "damaged or lies about its sizes"),
    "honest-bomb": (lambda: zip_of(("scene.blend", b"BLENDER-v500" + bytes(SMALL_LIMIT))), "unpacks to"),
    "not-a-zip": (lambda: b"PK\x03\x04" + bytes(100), "not a zip"),
}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", list(HOSTILE_ZIPS))
def test_hostile_zips_are_refused(farm: Farm, web: Http, tmp_path: Path, kind: str) -> None:
    make, reason = HOSTILE_ZIPS[kind]
    data = make()
    before = files_under(tmp_path)
    reply = upload_zip(web, data)
    assert reply.status == 400 and reason in reply.error, reply.body
    assert reply.error.startswith("refused: "), reply.error
    assert farm.call(lambda s: len(s.farm.jobs)) == 0
    assert store_of(farm) == {} and staging_left(farm) == []
    assert files_under(tmp_path) - before == set(), "nothing written outside the store and the staging folder"
    assert not Path("/tmp/microfarm-evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert MAX_ZIP_ENTRIES < 100_000


# (aiohttp reads `filename="C:\\x"` as C:x, and drops a leading "/": such a name lands inside, or is refused.)
@pytest.mark.parametrize(("relpath", "reason"), [("../evil.png", "'..' part"), ("a/../../evil.png", "'..' part"),
                                                 ("C:\\evil.png", "is absolute"), ("a//b.png", "empty"),
                                                 ("tex/con.png", "no Windows client")])
def test_hostile_folder_paths_are_refused(farm: Farm, web: Http, tmp_path: Path, relpath: str, reason: str) -> None:
    before = files_under(tmp_path)
    reply = upload_folder(web, {"scene.blend": b"BLENDER-v500", relpath: b"evil"})
    assert reply.status == 400 and reason in reply.error, reply.body
    assert store_of(farm) == {} and staging_left(farm) == [] and files_under(tmp_path) - before == set()
