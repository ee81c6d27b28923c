"""A job is a project: the .blend and every file it needs travel by content and are laid out on the client.

Real bpy, real files: a project folder made by tools.projects (a texture at //textures/wood.png,
a collection linked from //lib/props.blend that has its own texture, an image sequence, a texture at an
absolute path outside the project) is submitted with tools.submit and deleted before any client sees the
job; the frames must match a local render of the file where it lay, pixel for pixel.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Clients, Farm, connected, jobs_tool, repo_env, submit
from PIL import Image

from client.cache import FREE_MARGIN_BYTES, BlendCache, CacheFull
from client.layout import UNLOCKED_GRACE_S, JobFolders, LayoutError
from client.link import Link, fixed_target
from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.framing import encode
from protocol.handshake import client_handshake
from protocol.limits import MAX_MESSAGE_BYTES, MAX_PROJECT_FILES, MAX_RELPATH_BYTES
from protocol.manifest import Manifest, ManifestError, ProjectFile, check_relpath
from protocol.messages import Role
from protocol.settings import JobRequest
from protocol.stream import MessageStream, sha256_file
from server_addon.core.config import ServerConfig
from server_addon.thread import ServerThread

pytestmark = pytest.mark.unit

SHA = "ab" * 32
TIMEOUT = 30.0

HOSTILE = ["../x", "/etc/x", "C:\\x", "C:x", "c:/x", "\\\\host\\share\\x", "//host/share/x", "a/../../x", "a/..",
           "..", ".", "./a", "a/./b", "a//b", "a/", "", "a\x00b", "a\nb", "a\tb", "a\u202eb",
           "x" * (MAX_RELPATH_BYTES + 1), "a/" * 40 + "b", "con.png", "tex/aux", "a:stream", "a./b", "a /b",
           "con .txt", "tex/NUL  .png", "COM\u00b9", "lpt\u00b2.png", "Com\u00b3.tar.gz", "aux .x/y.png"]
SAFE = ["scene.blend", "textures/wood.png", "_outside_project/home/artist/noise.png", "téxtures/wöod 01.png",
        "seq/flip_0001.png", "a-b_c.d/e", "console.txt", "com10.png", "lpt.png", "nul_pass.png", "con-x .txt"]


# --- the one validator --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_relative_paths_are_refused(path: str) -> None:
    with pytest.raises(ManifestError):
        check_relpath(path)


@pytest.mark.parametrize("path", SAFE)
def test_project_paths_are_accepted(path: str) -> None:
    assert check_relpath(path) == path


def entry(relpath: str, sha: str = SHA, size: int = 10) -> ProjectFile:
    return ProjectFile(relpath, sha, size)


def test_a_manifest_names_each_file_once_and_its_main_blend() -> None:
    with pytest.raises(ManifestError, match="twice"):
        Manifest.build([entry("scene.blend"), entry("Tex/A.png"), entry("tex/a.png")], "scene.blend")
    with pytest.raises(ManifestError, match="file and a folder"):
        Manifest.build([entry("scene.blend"), entry("tex"), entry("tex/a.png")], "scene.blend")
    # NFC and NFD spellings of one name are one file on macOS (and case does not count there or on Windows).
    with pytest.raises(ManifestError, match="twice"):
        Manifest.build([entry("scene.blend"), entry("t\u00e9x/a.png"), entry("te\u0301x/A.png")], "scene.blend")
    with pytest.raises(ManifestError, match="file and a folder"):
        Manifest.build([entry("scene.blend"), entry("caf\u00e9"), entry("cafe\u0301/a.png")], "scene.blend")
    with pytest.raises(ManifestError, match="not among"):
        Manifest.build([entry("scene.blend"), entry("te\u0301x.blend")], "t\u00e9x.blend")
    scene = "sc\u00e8ne.blend"
    assert Manifest.build([entry(scene), entry("t\u00e9x/a.png")], scene).main == scene
    with pytest.raises(ManifestError, match="not among"):
        Manifest.build([entry("textures/wood.png")], "scene.blend")
    with pytest.raises(ManifestError, match="not a .blend"):
        Manifest.build([entry("textures/wood.png")], "textures/wood.png")
    with pytest.raises(ManifestError, match="at most"):
        Manifest.from_wire([entry(f"f{n}.png").to_wire() for n in range(MAX_PROJECT_FILES + 1)], "f0.png")
    with pytest.raises(ManifestError):
        Manifest.from_wire([{"relpath": "scene.blend", "sha256": "x", "size": 1}], "scene.blend")


def test_the_largest_manifest_fits_in_one_message() -> None:
    long = "/".join(["y" * 99] * 4)[:MAX_RELPATH_BYTES - 5]
    files = [entry(f"{n:04d}/{long}", size=2**26).to_wire() for n in range(MAX_PROJECT_FILES)]
    files[0] = entry("scene.blend").to_wire()
    assign = m.Assign(lease_id=1, job_id="j", blend_sha256=SHA, blend_size=10, frames=list(range(64)),
                      settings={"file_format": "PNG"}, files=files, main="scene.blend")
    assert len(encode(assign.to_wire(), MAX_MESSAGE_BYTES)) < MAX_MESSAGE_BYTES


@pytest.mark.parametrize("path", ["../x", "/etc/x", "C:\\x", "\\\\host\\share\\x", "a/../../x"])
def test_messages_with_hostile_paths_are_refused_on_receipt(path: str) -> None:
    files = [entry("scene.blend").to_wire(), entry(path).to_wire()]
    wire = {"t": "assign", "lease_id": 1, "job_id": "j", "blend_sha256": SHA, "blend_size": 10, "frames": [1],
            "settings": {}, "files": files, "main": "scene.blend"}
    with pytest.raises(ProtocolError):
        m.from_wire(wire)
    with pytest.raises(ProtocolError):
        m.from_wire({**wire, "t": "probe", "frames": None, "settings": None})
    with pytest.raises(ProtocolError):
        m.from_wire({"t": "submit", "name": "x.blend", "blend_sha256": SHA, "blend_size": 10, "settings": {},
                     "files": files, "main": "scene.blend"})
    with pytest.raises(ProtocolError, match="main file"):  # blend_sha256 must be the main file's
        m.from_wire({**wire, "blend_sha256": "cd" * 32, "files": files[:1]})


# --- the client's store and job folders ------------------------------------------------------------------

def stored(cache: BlendCache, data: bytes) -> ProjectFile:
    import hashlib
    sha = hashlib.sha256(data).hexdigest()
    path = cache.path(sha)
    path.write_bytes(data)
    return ProjectFile("x", sha, len(data))


def test_job_folders_lay_files_out_in_their_places(tmp_path: Path) -> None:
    cache = BlendCache(tmp_path / "cache")
    blend, wood = stored(cache, b"BLENDER-v500 scene"), stored(cache, b"wood pixels")
    manifest = Manifest.build([ProjectFile("shot.blend", blend.sha256, blend.size),
                               ProjectFile("textures/wood.png", wood.sha256, wood.size),
                               ProjectFile("again/wood.png", wood.sha256, wood.size)], "shot.blend")
    folders = JobFolders(cache)
    main = folders.lay_out("job-1", manifest)
    assert main == (folders.root / "job-1" / "shot.blend").resolve()
    assert (main.parent / "textures" / "wood.png").read_bytes() == b"wood pixels"
    assert os.path.samefile(main.parent / "textures" / "wood.png", cache.path(wood.sha256)), "a hard link"
    folders.lay_out("job-2", manifest)
    folders.remove_others(keep="job-2")
    assert sorted(p.name for p in folders.root.iterdir()) == [".lock", "job-2"]
    folders.close()
    assert not folders.root.exists()


def test_job_folders_never_write_outside(tmp_path: Path) -> None:
    cache = BlendCache(tmp_path / "cache")
    blend, data = stored(cache, b"BLENDER-v500 scene"), stored(cache, b"payload")
    outside = tmp_path / "outside"
    outside.mkdir()
    folders = JobFolders(cache)
    # A symlink in the way (another program, or an older layout): refused, nothing lands where it points.
    job = folders.job_dir("job-1")
    job.mkdir(parents=True)
    (job / "textures").symlink_to(outside, target_is_directory=True)
    manifest = Manifest.build([ProjectFile("s.blend", blend.sha256, blend.size),
                               ProjectFile("textures/wood.png", data.sha256, data.size)], "s.blend")
    with pytest.raises(LayoutError, match="symlink"):
        folders.lay_out("job-1", manifest)
    (job / "link.png").symlink_to(outside / "target.png")
    with pytest.raises(LayoutError, match="symlink"):
        folders.lay_out("job-1", Manifest.build([ProjectFile("s.blend", blend.sha256, blend.size),
                                                  ProjectFile("link.png", data.sha256, data.size)], "s.blend"))
    # A manifest that skipped the validator (built field by field) is checked again before anything is written.
    for path in ("../x", "/etc/x", "C:\\x", "\\\\host\\share\\x", "a/../../x"):
        hostile = Manifest((ProjectFile("s.blend", blend.sha256, blend.size), ProjectFile(path, data.sha256,
                                                                                            data.size)), "s.blend")
        with pytest.raises(LayoutError):
            folders.lay_out("job-2", hostile)
    with pytest.raises(LayoutError):
        folders.job_dir("../job")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x").exists() and not (folders.root / "x").exists()


def test_a_damaged_file_in_the_store_is_not_used(tmp_path: Path) -> None:
    cache = BlendCache(tmp_path / "cache")
    good = stored(cache, b"texture bytes")
    assert cache.lookup(good.sha256, good.size) is not None
    path = cache.path(good.sha256)
    path.write_bytes(b"texture bytez")  # same size, other bytes
    assert cache.lookup(good.sha256, good.size) is None
    assert not path.exists(), "removed, so that it is fetched again"


#: A client process's job folders, in a process of its own: lays out one job, prints its pid and .blend, then
#: waits for a line on stdin and says whether its .blend is still there.
HOLDER = """
import hashlib, sys
from pathlib import Path
from client.cache import BlendCache
from client.layout import JobFolders
from protocol.manifest import Manifest, ProjectFile
import os
cache = BlendCache(Path(sys.argv[1]))
data = b"BLENDER-v500 " + sys.argv[2].encode()
sha = hashlib.sha256(data).hexdigest()
sink = cache.sink(sha, len(data)); sink.write(data); sink.finish(sha); cache.commit(sink, sha)
folders = JobFolders(cache)  # held, with its lock, for the life of the process
blend = folders.lay_out("job-" + sys.argv[2], Manifest.single("scene.blend", sha, len(data)))
print(os.getpid(), blend, flush=True)
sys.stdin.readline()
print(blend.exists(), flush=True)
"""


def hold(cache_dir: Path, role: str, *wrapper: str) -> tuple[subprocess.Popen[str], int, Path]:
    proc = subprocess.Popen([*wrapper, sys.executable, "-c", HOLDER, str(cache_dir), role], cwd=REPO, env=repo_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=TIMEOUT)[1]
    pid, blend = line.split(maxsplit=1)
    return proc, int(pid), Path(blend.strip())


def still_there(proc: subprocess.Popen[str]) -> bool:
    out, err = proc.communicate("\n", timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return out.strip() == "True"


@pytest.mark.integration
def test_job_folders_of_stopped_clients_are_removed_at_start(tmp_path: Path) -> None:
    cache = BlendCache(tmp_path / "cache")
    running, _, running_blend = hold(cache.base, "running")
    stopped, _, stopped_blend = hold(cache.base, "stopped")
    stopped.kill()  # its lock goes with it
    stopped.wait(timeout=TIMEOUT)
    # Folders without a lock (an older client's): left alone while fresh, removed once old.
    old, fresh = cache.base / "jobs" / "12345" / "job-1", cache.base / "jobs" / "other-1-abc" / "job-1"
    old.mkdir(parents=True)
    fresh.mkdir(parents=True)
    past = time.time() - 2 * UNLOCKED_GRACE_S
    os.utime(old.parent, (past, past))
    mine = JobFolders(cache)
    try:
        assert not stopped_blend.parent.parent.exists() and not old.parent.exists()
        assert fresh.exists() and f"-{os.getpid()}-" in mine.root.name
        assert (mine.root / ".lock").is_file()
        assert still_there(running), "a running client's job folder was removed"
    finally:
        mine.close()
    assert not mine.root.exists()


def pid_namespaces() -> list[str]:
    """The command that runs a process as pid 1 of a pid namespace of its own; skips (fails on CI) without one."""
    wrapper = ["unshare", "--pid", "--fork", "--mount-proc"]
    reason = ""
    if shutil.which("unshare") is None:
        reason = "no unshare command"
    else:
        trial = subprocess.run([*wrapper, "true"], capture_output=True, text=True, timeout=TIMEOUT)
        if trial.returncode != 0:
            reason = f"unshare --pid does not work here: {trial.stderr.strip()}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return wrapper


@pytest.mark.integration
def test_clients_in_other_pid_namespaces_keep_their_job_folders(tmp_path: Path) -> None:
    """Two containers on one cache volume: both clients are pid 1, and neither removes the other's folders."""
    wrapper = pid_namespaces()
    first, pid_first, blend_first = hold(tmp_path / "shared", "first", *wrapper)
    second, pid_second, blend_second = hold(tmp_path / "shared", "second", *wrapper)
    assert pid_first == pid_second == 1
    assert blend_first.parent.parent != blend_second.parent.parent
    assert still_there(first), "the second client removed the first one's job folder"
    assert still_there(second)


def test_the_store_evicts_the_least_recently_used_files(tmp_path: Path) -> None:
    cache = BlendCache(tmp_path / "cache", max_bytes=4500)
    files = [committed(cache, bytes([n]) * 1000) for n in range(4)]
    shas = [f.sha256 for f in files]
    for sha in (shas[0], shas[2], shas[3], shas[1]):  # used in this order: 0 is the least recently used
        assert cache.lookup(sha, 1000) is not None
    cache.make_room(1000)
    assert [cache.path(sha).exists() for sha in shas] == [False, True, True, True]
    # Never the job being opened, nor the open job, nor a file a job folder links to.
    cache.pin([shas[2]])
    os.link(cache.path(shas[3]), tmp_path / "linked-from-a-job-folder")
    cache.make_room(2500, keep=[shas[1]])
    assert [cache.path(sha).exists() for sha in shas[1:]] == [True, True, True], "over the bound, but all in use"
    cache.pin([])
    cache.make_room(2500, keep=[shas[1]])
    assert [cache.path(sha).exists() for sha in shas[1:]] == [True, False, True]


def committed(cache: BlendCache, data: bytes) -> ProjectFile:
    """A file stored as a download stores it (read-only, verified)."""
    import hashlib
    sha = hashlib.sha256(data).hexdigest()
    sink = cache.sink(sha, len(data))
    sink.write(data)
    sink.finish(sha)
    cache.commit(sink, sha)
    return ProjectFile("x", sha, len(data))


def test_a_damaged_read_only_file_in_the_store_is_replaced(tmp_path: Path) -> None:
    cache = BlendCache(tmp_path / "cache")
    good = committed(cache, b"texture bytes")
    path = cache.path(good.sha256)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    os.chmod(path, 0o644)
    path.write_bytes(b"texture bytez")
    os.chmod(path, 0o444)
    assert cache.lookup(good.sha256, good.size) is None and not path.exists()
    path.write_bytes(b"texture bytez")  # damaged again, and in the way of the download
    os.chmod(path, 0o444)
    assert committed(cache, b"texture bytes") == good
    assert cache.lookup(good.sha256, good.size) == path


def test_only_a_filesystem_without_links_turns_job_folders_to_copies(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlendCache(tmp_path / "cache")
    blend, wood = stored(cache, b"BLENDER-v500 scene"), stored(cache, b"wood pixels")
    manifest = Manifest.build([ProjectFile("s.blend", blend.sha256, blend.size),
                               ProjectFile("tex/wood.png", wood.sha256, wood.size)], "s.blend")
    real_link = os.link
    folders = JobFolders(cache)
    failure = OSError(errno.EACCES, "Permission denied")

    def failing(source: object, target: object) -> None:
        if str(target).endswith("wood.png"):
            raise failure
        real_link(source, target)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "link", failing)
    with pytest.raises(PermissionError):  # not a reason to copy: said, not hidden
        folders.lay_out("job-1", manifest)
    failure = OSError(errno.EMLINK, "Too many links")  # this one file: copied, the others still linked
    main = folders.lay_out("job-1", manifest)
    assert os.path.samefile(main, cache.path(blend.sha256))
    assert not os.path.samefile(main.parent / "tex" / "wood.png", cache.path(wood.sha256))
    assert folders._linked
    folders.close()


# --- the server: hostile manifests, and files only for the client's own job ---------------------------------

@pytest.mark.asyncio
async def test_server_refuses_hostile_manifests_and_foreign_files(tmp_path: Path) -> None:
    thread = ServerThread(ServerConfig(output_dir=tmp_path / "out", host="127.0.0.1", port=0))
    thread.start()
    try:
        store = thread.service.files
        for path in HOSTILE[:8]:
            reader, writer = await asyncio.open_connection("127.0.0.1", thread.port)
            stream = MessageStream(reader, writer)
            await client_handshake(stream, role=Role.CONTROL, name="evil", secret=None)
            files = [{"relpath": "scene.blend", "sha256": SHA, "size": 12}, {"relpath": path, "sha256": "cd" * 32,
                                                                                "size": 5}]
            writer.write(encode({"t": "submit", "name": "x.blend", "blend_sha256": SHA, "blend_size": 12,
                                 "settings": {}, "files": files, "main": "scene.blend"}, MAX_MESSAGE_BYTES))
            await writer.drain()
            reply = await asyncio.wait_for(stream.recv(), TIMEOUT)
            assert isinstance(reply, m.Error) and "path" in reply.reason, (path, reply)
            await stream.aclose()
        assert thread.call(lambda s: len(s.farm.jobs)) == 0
        assert list(store.root.iterdir()) == []
        written = {p for p in tmp_path.rglob("*") if p.is_file()}
        assert all(p.is_relative_to(tmp_path / "out") for p in written)

        # Two jobs; a client given work of the first asks for a file of the second: refused.
        mine, theirs = b"BLENDER-v405 mine", b"BLENDER-v405 theirs"
        import hashlib
        shas = [hashlib.sha256(data).hexdigest() for data in (mine, theirs)]
        for sha, data in zip(shas, (mine, theirs), strict=True):
            store.path(sha).write_bytes(data)
        thread.call(lambda s: s.create_job("mine.blend", shas[0], len(mine), JobRequest(), priority=5))
        thread.call(lambda s: s.create_job("theirs.blend", shas[1], len(theirs), JobRequest(), start=False))
        reader, writer = await asyncio.open_connection("127.0.0.1", thread.port)
        stream = MessageStream(reader, writer)
        await client_handshake(stream, role=Role.WORKER, name="w", secret=None, blender="5.0.1")
        await stream.send(m.Heartbeat(state="idle"))
        probe = await asyncio.wait_for(stream.recv(), TIMEOUT)
        while not isinstance(probe, m.Probe):
            probe = await asyncio.wait_for(stream.recv(), TIMEOUT)
        assert probe.manifest().main == "mine.blend"  # a bare .blend keeps its own name
        await stream.send(m.BlendRequest(sha256=shas[1]))
        reply = await asyncio.wait_for(stream.recv(), TIMEOUT)
        while isinstance(reply, m.Heartbeat):
            reply = await asyncio.wait_for(stream.recv(), TIMEOUT)
        assert isinstance(reply, m.BlendRefused)
        await stream.send(m.BlendRequest(sha256=shas[0]))
        reply = await asyncio.wait_for(stream.recv(), TIMEOUT)
        while isinstance(reply, m.Heartbeat):
            reply = await asyncio.wait_for(stream.recv(), TIMEOUT)
        assert isinstance(reply, m.BlendBegin) and reply.size == len(mine)
        await stream.aclose()
    finally:
        await asyncio.to_thread(thread.stop)


# --- end to end: real bpy, real files, a project the clients cannot see --------------------------------------

#: The project of these tests: a texture, a library with its own texture, an image sequence, an outside texture.
PROJECT = ("--texture", "--library", "--sequence")


def make_project(src: Path, external: Path | None = None, *flags: str) -> Path:
    """A project folder made by tools.projects (PROJECT, or the flags given); returns its .blend."""
    options = [*(flags or PROJECT), *(["--external", str(external)] if external is not None else [])]
    subprocess.run([sys.executable, "-m", "tools.projects", str(src), *options], cwd=REPO, env=repo_env(),
                   check=True, capture_output=True, timeout=180)
    assert not list(src.rglob("*.blend1"))
    return src / "scene.blend"


def render_local(blend: Path, out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "tools.render_local", str(blend), "1", "2", str(out), *extra], cwd=REPO,
                   env=repo_env(), check=True, capture_output=True, timeout=180)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.int16)


def same_frames(farm: Farm, job_id: str, local: Path) -> None:
    frames = sorted((farm.output / job_id).glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_0001.png", "frame_0002.png"]
    for frame in frames:
        assert np.array_equal(pixels(frame), pixels(local / frame.name)), f"{frame.name} differs from the local render"


def stats(farm: Farm) -> tuple[int, int, int]:
    return farm.call(lambda s: (s.stats.upload_bytes_received, s.stats.files_received, s.stats.blend_bytes_sent))


def test_a_project_renders_on_clients_that_cannot_see_it(farm: Farm, clients: Clients, tmp_path: Path) -> None:
    work, ext = tmp_path / "work", tmp_path / "ext"  # submitted from here, then deleted
    make_project(work, ext)
    src, src_ext = tmp_path / "src", tmp_path / "src-ext"  # kept out of sight, to put the project back later
    shutil.copytree(work, src)
    shutil.copytree(ext, src_ext)

    def restore() -> None:
        shutil.copytree(src, work)
        shutil.copytree(src_ext, ext)

    def remove() -> None:
        shutil.rmtree(work)
        shutil.rmtree(ext)

    blend = work / "scene.blend"
    local1 = tmp_path / "local1"
    render_local(blend, local1)
    before = stats(farm)
    first = submit(farm, blend, "--queue", wait=False)
    assert first.returncode == 0, first.stderr
    job1 = first.stdout.strip()
    assert "travels: 7 files" in first.stderr and "uploading 7" in first.stderr, first.stderr
    assert f"outside the project: {ext / 'noise.png'}" in first.stderr
    after = stats(farm)
    project_bytes = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) + (ext / "noise.png").stat().st_size
    assert after[1] - before[1] == 7
    # The .blend that names the external texture travels rewritten (a path inside the job folder).
    assert abs((after[0] - before[0]) - project_bytes) < 4096
    remove()

    clients.start("solo", farm.address)
    farm.wait_until(connected(1), what="client")
    assert jobs_tool(farm.address, "resume", job1).returncode == 0
    farm.wait_until(lambda s: s.farm.jobs[job1].state.finished, timeout=180, what="first job")
    assert farm.job(job1)["state"] == "done", (farm.job(job1), clients.log("solo")[-3000:])
    same_frames(farm, job1, local1)
    log = clients.log("solo")
    assert "does not exist" not in log and "missing" not in log.lower(), log[-3000:]
    sent_first = stats(farm)[2]

    # The client's stored copy of the library's texture is damaged: found by its checksum, fetched again.
    cache = BlendCache(tmp_path / "cache-solo")
    marble = cache.path(sha256_file(src / "lib" / "tex" / "marble.png"))
    os.chmod(marble, 0o644)
    damaged = bytearray(marble.read_bytes())
    damaged[-20] ^= 0xFF
    marble.write_bytes(bytes(damaged))

    # A second job of the project with one texture changed sends only that texture.
    restore()
    Image.new("RGBA", (8, 8), (30, 160, 40, 255)).save(work / "textures" / "wood.png")
    wood = (work / "textures" / "wood.png").stat().st_size
    local2 = tmp_path / "local2"
    render_local(blend, local2)
    before = stats(farm)
    second = submit(farm, blend, "--queue", wait=False)
    assert second.returncode == 0, second.stderr
    job2 = second.stdout.strip()
    after = stats(farm)
    assert "the farm has 6 of them already; uploading 1" in second.stderr, second.stderr
    assert (after[0] - before[0], after[1] - before[1]) == (wood, 1), "only the changed texture travels"
    remove()
    assert jobs_tool(farm.address, "resume", job2).returncode == 0
    farm.wait_until(lambda s: s.farm.jobs[job2].state.finished, timeout=180, what="second job")
    assert farm.job(job2)["state"] == "done", (farm.job(job2), clients.log("solo")[-3000:])
    same_frames(farm, job2, local2)
    assert not np.array_equal(pixels(local1 / "frame_0001.png"), pixels(local2 / "frame_0001.png"))
    # The client fetched the new texture and the damaged one again, nothing else.
    assert stats(farm)[2] - sent_first == wood + marble.stat().st_size
    assert "no longer matches its checksum" in clients.log("solo")

    # A third job of the same files sends nothing at all.
    restore()
    before = stats(farm)
    third = submit(farm, blend, "--queue", wait=False)
    assert third.returncode == 0, third.stderr
    assert "uploading 0 (0 bytes)" in third.stderr, third.stderr
    assert stats(farm)[:2] == before[:2], "0 bytes when nothing changed"


@pytest.mark.bpy
def test_a_file_missing_on_the_submitting_disk_stops_the_submission(farm: Farm, tmp_path: Path) -> None:
    work, ext = tmp_path / "work", tmp_path / "ext"
    make_project(work, ext)
    (work / "textures" / "wood.png").unlink()
    refused = submit(farm, work / "scene.blend", "--queue", wait=False)
    assert refused.returncode == 1
    assert "missing on this disk: //textures/wood.png" in refused.stderr and "--allow-missing" in refused.stderr
    assert refused.stdout == "" and farm.call(lambda s: len(s.farm.jobs)) == 0
    assert farm.call(lambda s: s.stats.files_received) == 0, "refused before anything was uploaded"
    allowed = submit(farm, work / "scene.blend", "--queue", "--allow-missing", wait=False)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: missing on this disk, the job renders without them: //textures/wood.png" in allowed.stderr
    assert "travels: 6 files" in allowed.stderr
    job_id = allowed.stdout.strip()
    assert farm.call(lambda s: s.farm.jobs[job_id].request.allow_missing)


def test_a_jobs_files_outlive_a_restart_and_an_older_database_opens(tmp_path: Path) -> None:
    import sqlite3

    from server_addon.core.database import Database
    from server_addon.core.jobs import Job
    from server_addon.core.recovery import load_jobs
    from server_addon.core.storage import OutputStore

    project = Manifest.build([entry("shot/scene.blend"), entry("shot/textures/wood.png", "cd" * 32, 3)],
                             "shot/scene.blend")
    db = Database(tmp_path / "jobs.sqlite3")
    db.save_job(Job(id="job-p", name="scene.blend", blend_sha256=SHA, blend_size=10, request=JobRequest(),
                    created=0.0, project=project))
    db.save_job(Job(id="job-b", name="bare.blend", blend_sha256=SHA, blend_size=10, request=JobRequest(),
                    created=0.0))
    db.close()
    jobs = {j.id: j for j in load_jobs(Database(tmp_path / "jobs.sqlite3"), OutputStore(tmp_path / "out"))}
    assert jobs["job-p"].manifest == project
    assert jobs["job-b"].manifest.main == "bare.blend" and len(jobs["job-b"].manifest.files) == 1

    # A database from before job files (schema 3) gains the column, its jobs are the .blend alone.
    old = sqlite3.connect(tmp_path / "jobs.sqlite3")
    old.execute("ALTER TABLE jobs DROP COLUMN project")
    old.execute("PRAGMA user_version = 3")
    old.commit()
    old.close()
    jobs = {j.id: j for j in load_jobs(Database(tmp_path / "jobs.sqlite3"), OutputStore(tmp_path / "out"))}
    assert jobs["job-p"].project is None and jobs["job-p"].manifest.main == "scene.blend"


def test_the_server_moves_an_older_stores_blends_into_the_content_store(tmp_path: Path) -> None:
    from server_addon.core.storage import ContentStore

    legacy = tmp_path / "blends"
    legacy.mkdir()
    (legacy / f"{SHA}.blend").write_bytes(b"BLENDER-v405")
    (legacy / ".incoming-x.part").write_bytes(b"half")
    store = ContentStore(tmp_path / "files", legacy=legacy)
    assert store.has(SHA, 12) and not legacy.exists()


def test_job_folders_copy_where_hard_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlendCache(tmp_path / "cache")
    blend, wood = stored(cache, b"BLENDER-v500 scene"), stored(cache, b"wood pixels")
    manifest = Manifest.build([ProjectFile("s.blend", blend.sha256, blend.size),
                               ProjectFile("tex/wood.png", wood.sha256, wood.size)], "s.blend")

    def no_links(*_args: object) -> None:
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_links)
    main = JobFolders(cache).lay_out("job-1", manifest)
    copy = main.parent / "tex" / "wood.png"
    assert copy.read_bytes() == b"wood pixels" and not os.path.samefile(copy, cache.path(wood.sha256))


# --- the client's store on a small disk ---------------------------------------------------------------------

def test_a_bounded_cache_evicts_the_files_of_earlier_jobs(farm: Farm, clients: Clients, tmp_path: Path,
                                                          scenes: Callable[..., Path]) -> None:
    blends = [scenes(f"evict{n}", "--frames", "1", "--size", "32x18", "--samples", str(n)) for n in (1, 2, 3)]
    shas = [sha256_file(blend) for blend in blends]
    assert len(set(shas)) == 3
    bound = int(max(blend.stat().st_size for blend in blends) * 1.5)  # one job and a half
    clients.start("small", farm.address, "--cache-max", str(bound))
    farm.wait_until(connected(1), what="client")
    for blend in blends:
        done = submit(farm, blend)
        assert done.returncode == 0, (done.stderr, clients.log("small")[-3000:])
    store = BlendCache(tmp_path / "cache-small")
    # The first job's file made room; the second stays while its job folder is there; the third is open.
    assert [store.path(sha).exists() for sha in shas] == [False, True, True], clients.log("small")[-3000:]
    assert "evicted 1 least recently used files" in clients.log("small")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    """small_disk(folder, bytes): a tmpfs of that size mounted at a folder made here, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> Path:
        folder.mkdir(parents=True)
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                              text=True, timeout=TIMEOUT)
        if made.returncode != 0:
            reason = f"cannot mount a tmpfs here: {made.stderr.strip()}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True, timeout=TIMEOUT)


def test_a_full_cache_disk_fails_the_fetch_with_a_sentence(farm: Farm, clients: Clients, tmp_path: Path,
                                                           animation: Path,
                                                           small_disk: Callable[[Path, int], Path]) -> None:
    size = animation.stat().st_size
    # Room for half of the job's .blend beyond what the cache leaves free.
    disk = small_disk(tmp_path / "cache-tight", FREE_MARGIN_BYTES + size // 2)
    try:
        clients.start("tight", farm.address)
        farm.wait_until(connected(1), what="client")
        result = submit(farm, animation, wait=False)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip()
        farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=120, what="the job to fail")
        job = farm.job(job_id)
        assert job["state"] == "failed", job
        assert "the client's cache disk is full" in job["error"], job["error"]
        assert "do not fit in the" in job["error"]
        assert list((disk / "files").iterdir()) == [], "no half-written file"
        assert farm.call(connected(1)), "the client carries on"
    finally:
        clients.stop_all()


def test_a_disk_that_fills_during_a_download_fails_that_file_only(tmp_path: Path,
                                                                  small_disk: Callable[[Path, int], Path]) -> None:
    """Something else filled the disk after the check: the write fails, that file fails with a sentence, no
    partial file stays, and the connection carries on."""
    import hashlib

    thread = ServerThread(ServerConfig(output_dir=tmp_path / "out", host="127.0.0.1", port=0))
    thread.start()
    big = b"BLENDER-v405" + os.urandom(3 << 20)
    sha = hashlib.sha256(big).hexdigest()
    thread.service.files.path(sha).write_bytes(big)
    thread.call(lambda s: s.create_job("big.blend", sha, len(big), JobRequest()))
    disk = small_disk(tmp_path / "disk", 1 << 20)
    cache = BlendCache(disk)
    cache.check_free = lambda need: None  # type: ignore[method-assign]  # the disk fills after the check
    link = Link(fixed_target("127.0.0.1", thread.port), name="w", secret=None, cache=cache, blender="5.0.1")
    link.start()
    try:
        task = None
        while task is None:
            task = link.next_task(TIMEOUT)
        assert isinstance(task.message, m.Probe)
        with pytest.raises(CacheFull, match="cache disk filled up while downloading"):
            link.fetch_blend(task.epoch, sha, len(big), timeout=TIMEOUT)
        assert list(cache.root.iterdir()) == [], "no half-written file"
        # The rest of that file was read and dropped: the same connection serves the next request.
        with pytest.raises(CacheFull):
            link.fetch_blend(task.epoch, sha, len(big), timeout=TIMEOUT)
        assert link.connected.is_set() and link.epoch == task.epoch, "the same connection"
        assert list(cache.root.iterdir()) == []
    finally:
        link.stop()
        thread.stop()


def test_the_add_on_hashes_a_file_replaced_with_the_same_size_and_time_again(tmp_path: Path) -> None:
    from server_addon.addon.project import Hashes

    class Never:
        def check(self) -> None:
            pass
    texture = tmp_path / "wood.png"
    texture.write_bytes(b"old pixels")
    hashes = Hashes()
    first, _ = hashes.of(texture, Never())
    then = texture.stat().st_mtime_ns
    other = tmp_path / "new.png"
    other.write_bytes(b"new pixels")  # same size
    os.utime(other, ns=(then, then))  # and the same modification time (a copy that keeps times)
    os.replace(other, texture)
    assert texture.stat().st_mtime_ns == then and texture.stat().st_size == 10
    second, _ = hashes.of(texture, Never())
    assert first != second == sha256_file(texture)
