"""The add-on's runtime without Blender: the server thread's lifecycle, the views and notices that the
panel's timer drains, job actions and job submission (server_addon/addon/session.py, bridge.py, sending.py,
submit.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from protocol.settings import JobRequest
from server_addon.addon.bridge import ServerSettings
from server_addon.addon.errors import FarmError
from server_addon.addon.session import Session, State
from server_addon.addon.submit import JobSubmission

pytestmark = pytest.mark.integration

WAIT_S = 30.0


def microfarm_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("microfarm-"))


def drain_until(rt: Session, predicate, timeout: float = WAIT_S) -> list:
    """Take notices as the timer would, until one satisfies predicate (waiting on the view queue between)."""
    seen = []
    for _ in range(int(timeout / 0.1)):
        _, notices = rt.drain()
        seen += notices
        if any(predicate(n) for n in seen):
            return seen
        rt.wait_view(0.1)
    raise AssertionError(f"no such notice; got {seen}")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Session]:
    rt = Session()
    rt.start(ServerSettings(output_dir=tmp_path / "out", host="127.0.0.1", port=0, discovery=False))
    assert rt.wait_for(State.RUNNING, WAIT_S)
    yield rt
    rt.shutdown()


def test_start_stop_and_no_thread_left(tmp_path: Path) -> None:
    rt = Session()
    rt.start(ServerSettings(output_dir=tmp_path / "out", host="127.0.0.1", port=0, discovery=False))
    with pytest.raises(FarmError, match="already"):
        rt.start(ServerSettings(output_dir=tmp_path / "out", host="127.0.0.1", port=0, discovery=False))
    assert rt.wait_for(State.RUNNING, WAIT_S)
    assert rt.address is not None and rt.address[1] > 0
    port = rt.address[1]
    assert rt.wait_view(WAIT_S) and rt.view.farm  # the first view is published at once
    rt.stop()
    assert rt.wait_for(State.STOPPED, WAIT_S)
    notices = drain_until(rt, lambda n: n.text == "Farm server stopped.")
    assert notices[0].text == f"Farm server listening on 127.0.0.1:{port}."
    assert rt.view.jobs == () and rt.view.clients == ()
    rt.shutdown()
    assert microfarm_threads() == []


def test_busy_port_is_one_clear_sentence(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rt = Session()
        rt.start(ServerSettings(output_dir=tmp_path / "out", host="127.0.0.1", port=port, discovery=False))
        (notice,) = drain_until(rt, lambda n: n.level == "ERROR")
    assert rt.state is State.STOPPED
    assert notice.text == f"Could not start the farm server on 127.0.0.1:{port}: Address already in use."
    rt.shutdown()
    assert microfarm_threads() == []


def test_views_are_coalesced(running: Session) -> None:
    assert running.wait_view(WAIT_S)  # the first view, published when the server started
    published = []
    original = running.outbox.put_view

    def counting(view):
        published.append(view)
        original(view)
    running.outbox.put_view = counting
    running.thread.call(lambda s: [s.feed.bump() for _ in range(500)])
    assert running.wait_view(WAIT_S)
    running.thread.call(lambda s: None)
    assert 1 <= len(published) <= 2, f"{len(published)} snapshots for 500 changes"


def test_drain_keeps_to_its_budget(running: Session) -> None:
    running.drain()
    for i in range(2000):
        running.post("INFO", f"message {i}")
    changed, first = running.drain(budget_s=0.0)
    assert changed and len(first) == 1, "an exhausted budget still shows one message"
    rest = []
    while len(first) + len(rest) < 2000:
        rest += running.drain(budget_s=0.01)[1]
    assert running.notice is not None and running.notice.text == "message 1999"


def test_job_actions_report_the_servers_reason(running: Session) -> None:
    with pytest.raises(FarmError, match=r"^There is no job 'nope'\.$"):
        running.job_action("cancel", "nope")
    with pytest.raises(FarmError, match=r"^Unknown job action 'explode'"):
        running.job_action("explode", "x")
    assert running.job_action("clear_completed") == "cleared 0 finished jobs"


def test_submission_stores_the_copy_and_creates_the_job(running: Session, animation: Path) -> None:
    drops = []
    for _ in range(2):  # the same file twice: one .blend in the store, two jobs
        copy = running.blend_drop_path()
        shutil.copyfile(animation, copy)
        drops.append(copy)
        running.submit(JobSubmission(blend=copy, name="anim.blend", request=JobRequest(chunk=3), pack=False))
        drain_until(running, lambda n: n.text.startswith("Render job anim-"))
    jobs = running.thread.call(lambda s: [j.view() for j in s.farm.jobs.values()])
    assert len(jobs) == 2 and all(j["chunk"] == 3 for j in jobs)
    store, shas = running.thread.call(lambda s: (s.files.root, {j.blend_sha256 for j in s.farm.jobs.values()}))
    assert [p.name for p in store.iterdir()] == sorted(shas)  # stored under the sha256 alone
    assert not any(p.exists() for p in drops)


@pytest.mark.bpy
def test_a_copy_that_cannot_be_packed_is_reported(running: Session) -> None:
    copy = running.blend_drop_path()
    copy.write_bytes(b"this is not a .blend file")
    running.submit(JobSubmission(blend=copy, name="broken.blend", request=JobRequest()))
    notices = drain_until(running, lambda n: n.level == "ERROR", timeout=120)
    error = next(n for n in notices if n.level == "ERROR").text
    assert error.startswith("Could not pack the textures into the copy for the farm: "), error
    assert "\n" not in error
    assert not copy.exists()
    assert running.thread.call(lambda s: len(s.farm.jobs)) == 0


MISSING_IMAGE_SCENE = """\
import sys
import bpy
bpy.ops.wm.read_homefile(use_empty=True)
image = bpy.data.images.load(sys.argv[1])
image.use_fake_user = True
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[2])
image.filepath = sys.argv[1]  # absolute: the copy below is made without Blender's remapping
bpy.ops.wm.save_mainfile()
"""


@pytest.mark.bpy
def test_a_missing_texture_is_named(running: Session, tmp_path: Path) -> None:
    texture = tmp_path / "gone.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(texture)
    blend = tmp_path / "scene.blend"
    subprocess.run([sys.executable, "-c", MISSING_IMAGE_SCENE, str(texture), str(blend)], check=True,
                   capture_output=True, timeout=120)
    texture.unlink()  # the artist moved it away since
    copy = running.blend_drop_path()
    shutil.copyfile(blend, copy)
    running.submit(JobSubmission(blend=copy, name="scene.blend", request=JobRequest()))
    notices = drain_until(running, lambda n: n.level == "ERROR", timeout=120)
    error = next(n for n in notices if n.level == "ERROR").text
    assert error == ("Could not pack the textures into the copy for the farm: "
                     f"Unable to pack file, source path '{texture}' not found."), error
    assert running.thread.call(lambda s: len(s.farm.jobs)) == 0


@pytest.mark.unit
def test_nothing_without_a_server(tmp_path: Path) -> None:
    rt = Session()
    with pytest.raises(FarmError, match="not running"):
        rt.job_action("cancel", "x")
    with pytest.raises(FarmError, match="not running"):
        rt.blend_drop_path()
    with pytest.raises(FarmError, match="not running"):
        rt.stop()


# --- the open file as a project (the copy keeps the artist's `//` paths; see project.py) ------------------------

PROJECT_SCENE = """\
import sys
import bpy
bpy.ops.wm.read_homefile(use_empty=True)
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[3])  # where the copy is saved: not the artist's folder
relative, absolute = bpy.data.images.load(sys.argv[1]), bpy.data.images.load(sys.argv[2])
relative.use_fake_user = absolute.use_fake_user = True
relative.filepath = "//textures/wood.png"  # as the artist wrote it, relative to the open file's folder
bpy.ops.wm.save_mainfile(relative_remap=False)
"""


def saved_copy(running: Session, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the copy in the server's drop folder, the artist's folder, the outside texture)."""
    artist, outside = tmp_path / "artist", tmp_path / "elsewhere" / "noise.png"
    for path, rgb in ((artist / "textures" / "wood.png", (9, 8, 7)), (outside, (1, 2, 3))):
        path.parent.mkdir(parents=True)
        Image.new("RGB", (4, 4), rgb).save(path)
    made = tmp_path / "made.blend"
    subprocess.run([sys.executable, "-c", PROJECT_SCENE, str(artist / "textures" / "wood.png"), str(outside),
                    str(made)], check=True, capture_output=True, timeout=120)
    copy = running.blend_drop_path()
    shutil.copyfile(made, copy)
    return copy, artist, outside


def job_project(running: Session) -> dict:
    return running.thread.call(lambda s: next(iter(s.farm.jobs.values())).project.to_wire())


@pytest.mark.bpy
def test_the_copy_is_traced_where_the_open_file_lies(running: Session, tmp_path: Path) -> None:
    copy, artist, outside = saved_copy(running, tmp_path)
    # The open file itself need not even be on disk (never read): its folder is the project.
    running.submit(JobSubmission(blend=copy, name="shot.blend", request=JobRequest(), location=artist / "shot.blend",
                                 pack=False))
    drain_until(running, lambda n: n.text.startswith("Render job shot-"))
    project = job_project(running)
    assert project["main"] == "shot.blend"
    assert sorted(f["relpath"] for f in project["files"]) == sorted(
        ["shot.blend", "textures/wood.png", "_outside_project" + str(outside)])
    check = running.check
    assert check is not None and (check.files, check.on_farm, check.missing) == (3, 0, ())
    assert check.outside == (str(outside),) and check.job_id
    assert not copy.exists() and not (artist / "shot.blend").exists(), "nothing is written into the artist's folder"
    store = running.thread.call(lambda s: s.files)
    assert all(store.has(f["sha256"], f["size"]) for f in project["files"])


@pytest.mark.bpy
def test_an_unsaved_file_sends_what_it_uses_from_outside(running: Session, tmp_path: Path) -> None:
    copy, _, outside = saved_copy(running, tmp_path)
    (tmp_path / "artist" / "textures" / "wood.png").unlink()  # an unsaved file has no folder: `//` resolves nowhere
    running.submit(JobSubmission(blend=copy, name="untitled.blend", request=JobRequest(allow_missing=True),
                                 pack=False))
    drain_until(running, lambda n: n.text.startswith("Render job untitled-"))
    project = job_project(running)
    assert project["main"] == "untitled.blend"
    assert sorted(f["relpath"] for f in project["files"]) == sorted(
        ["untitled.blend", "_outside_project" + str(outside)])


@pytest.mark.bpy
def test_check_files_sends_nothing_and_missing_files_refuse_the_job(running: Session, tmp_path: Path) -> None:
    copy, artist, _ = saved_copy(running, tmp_path)
    (artist / "textures" / "wood.png").unlink()
    running.submit(JobSubmission(blend=copy, name="shot.blend", request=JobRequest(), location=artist / "shot.blend",
                                 pack=False, check_only=True))
    notices = drain_until(running, lambda n: n.level == "WARNING")
    assert "missing on this disk: //textures/wood.png" in notices[-1].text
    assert running.check is not None and running.check.missing == ("//textures/wood.png",)
    store = running.thread.call(lambda s: s.files.root)
    assert list(store.iterdir()) == [] and running.thread.call(lambda s: len(s.farm.jobs)) == 0

    copy, _, _ = saved_copy(running, tmp_path / "again")
    running.submit(JobSubmission(blend=copy, name="shot.blend", request=JobRequest(), location=artist / "shot.blend",
                                 pack=False))
    notices = drain_until(running, lambda n: n.level == "ERROR")
    assert notices[-1].text == ("Not sent: 1 file the scene needs is missing on this disk: //textures/wood.png; "
                                "turn on Render With Missing Files to send it anyway.")
    assert list(store.iterdir()) == [] and running.thread.call(lambda s: len(s.farm.jobs)) == 0
