"""Path safety of the server's stores, and a live server facing a hostile job id from a worker."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import pytest

from protocol import messages as m
from protocol.errors import ConnectionClosed
from protocol.framing import encode
from protocol.handshake import client_handshake
from protocol.messages import Role
from protocol.settings import JobRequest, SceneInfo, resolve
from protocol.stream import MessageStream
from server_addon.core.config import ServerConfig
from server_addon.core.jobs import FrameRecord, Job, JobState
from server_addon.core.storage import BlendStore, OutputStore, UnsafeName, frame_name, is_job_id, is_sha256, new_job_id
from server_addon.thread import ServerThread

pytestmark = pytest.mark.unit

TIMEOUT = 5.0
SHA = hashlib.sha256(b"blend").hexdigest()


@pytest.fixture
def store(tmp_path) -> OutputStore:
    return OutputStore(tmp_path / "out")


@pytest.mark.parametrize("job_id", [
    "../x", "..", ".", "/etc", "a/b", "", ".hidden", "x" * 65, "nul\0byte", "back\\slash", "-dash", "sp ace",
    "ünï", "a\nb",
])
def test_job_dir_rejects_unsafe_ids(store, job_id):
    with pytest.raises(UnsafeName):
        store.job_dir(job_id)


@pytest.mark.parametrize("job_id", ["a", "shot-01_final", "x" * 64, "0abc"])
def test_job_dir_accepts_safe_ids(store, job_id):
    assert store.job_dir(job_id) == store.root / job_id


@pytest.mark.parametrize("check", ["job_id", "sha256"])
def test_a_trailing_newline_is_not_a_valid_name(tmp_path, check):
    if check == "job_id":
        assert not is_job_id("job\n")
        with pytest.raises(UnsafeName):
            OutputStore(tmp_path / "out").job_dir("job\n")
    else:
        assert not is_sha256(SHA + "\n")
        with pytest.raises(UnsafeName):
            BlendStore(tmp_path / "blends").path(SHA + "\n")


@pytest.mark.parametrize("ext", ["png/../../x", "sh", "", "PNG", "png\0", ".png", "blend", "py"])
def test_frame_name_rejects_unknown_extensions(store, ext):
    with pytest.raises(UnsafeName):
        frame_name(1, ext)
    with pytest.raises(UnsafeName):
        store.frame_path("job-1", 1, ext)


def test_frame_names_are_built_from_the_number_and_a_listed_extension(store):
    assert frame_name(7, "png") == "frame_0007.png"
    assert frame_name(12345, "exr") == "frame_12345.exr"
    assert store.frame_path("job-1", 3, "jpg") == store.root / "job-1" / "frame_0003.jpg"


def test_a_symlinked_job_dir_pointing_outside_is_rejected(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeName, match="outside"):
        store.job_dir("linked")
    with pytest.raises(UnsafeName):
        store.frame_path("linked", 1, "png")
    with pytest.raises(UnsafeName):
        store.frame_sink("linked", 10)
    assert list(outside.iterdir()) == []


def test_a_symlinked_frame_file_pointing_outside_is_rejected(store, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (store.root / "job-1").mkdir()
    (store.root / "job-1" / "frame_0001.png").symlink_to(target)
    with pytest.raises(UnsafeName):
        store.frame_path("job-1", 1, "png")
    assert target.read_text() == "keep me"


def test_a_frame_stored_over_a_symlink_replaces_the_link_and_leaves_its_target_alone(store, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (store.root / "job-1").mkdir()
    (store.root / "job-1" / "frame_0001.png").symlink_to(target)
    sink = store.frame_sink("job-1", 5)
    sink.write(b"frame")
    sink.finish(hashlib.sha256(b"frame").hexdigest())
    stored = store.commit_frame(sink, "job-1", 1, "png")
    assert not stored.is_symlink() and stored.read_bytes() == b"frame"
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("sha", [
    "", "abc", SHA[:-1], SHA + "0", SHA.upper(), "g" * 64, "../" + SHA[3:], SHA[:32] + "/" + SHA[33:], " " + SHA[1:],
])
def test_blend_store_rejects_bad_digests(tmp_path, sha):
    blends = BlendStore(tmp_path / "blends")
    with pytest.raises(UnsafeName):
        blends.path(sha)
    with pytest.raises(UnsafeName):
        blends.sink(sha, 10)
    assert list(blends.root.iterdir()) == []


def test_blend_store_path_is_named_by_the_digest(tmp_path):
    blends = BlendStore(tmp_path / "blends")
    assert blends.path(SHA) == tmp_path / "blends" / SHA


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "ü∂ƒ.blend", "", "a" * 500, "x" * 499 + ".blend", "..", "/", "shot 01 (final).blend",
    "nul\0name.blend", "back\\slash.blend", "-.blend", ".hidden.blend", "\n\r\t",
])
def test_new_job_id_is_safe_for_hostile_names(store, name):
    job_id = new_job_id(name)
    assert is_job_id(job_id), job_id
    assert store.job_dir(job_id).parent == store.root
    assert new_job_id(name) != job_id  # a random suffix keeps ids unique


def test_new_job_id_keeps_a_readable_slug():
    assert new_job_id("Shot 01.blend").startswith("shot-01-")
    assert new_job_id("../../etc/passwd").startswith("passwd-")


# --- a live server and a worker sending a hostile job id --------------------------------------

@pytest.fixture
def server(tmp_path):
    thread = ServerThread(ServerConfig(output_dir=tmp_path / "out", host="127.0.0.1", port=0))
    thread.start()
    yield thread
    thread.stop()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def hostile_rendering_job(job_id: str) -> Job:
    """A job that bypassed id generation (defence in depth: storage must still refuse it)."""
    scene = SceneInfo(scene="S", engine="CYCLES", frame_start=1, frame_end=1, frame_step=1, fps=24.0,
                      resolution_x=64, resolution_y=36, percentage=100, file_format="PNG")
    settings = resolve(JobRequest(), scene)
    return Job(id=job_id, name="evil.blend", blend_sha256=SHA, blend_size=5, request=JobRequest(), created=0.0,
               state=JobState.RENDERING, scene=scene, settings=settings, frames={1: FrameRecord(1)})


async def send_escaping_frame(port: int) -> list[m.Message]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    stream = MessageStream(reader, writer)
    try:
        await client_handshake(stream, role=Role.WORKER, name="evil", secret=None, timeout=TIMEOUT)
        data = b"evil"
        writer.write(encode(m.FrameBegin(lease_id=1, job_id="../../escape", frame=1, ext="png",
                                         size=len(data)).to_wire())
                     + encode(m.Chunk(data=data).to_wire())
                     + encode(m.End(sha256=hashlib.sha256(data).hexdigest()).to_wire()))
        got = []
        while True:  # until the server closes the connection (EOF, or a reset: we sent bytes it never read)
            try:
                got.append(await asyncio.wait_for(stream.recv(), TIMEOUT))
            except (ConnectionClosed, ConnectionResetError):
                return got
    finally:
        await stream.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("job_exists", [False, True], ids=["unknown-job", "injected-job"])
async def test_worker_cannot_write_outside_the_output_dir(server, tmp_path, caplog, job_exists):
    caplog.set_level(logging.INFO, logger="server_addon")
    if job_exists:
        server.call(lambda s: s.farm.restore_job(hostile_rendering_job("../../escape")))
    out = tmp_path / "out"
    parent_before, tmp_before = set(os.listdir(tmp_path.parent)), tree(tmp_path)

    got = await send_escaping_frame(server.port)

    assert all(isinstance(msg, (m.Assign, m.Error)) for msg in got), got
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    expected = "invalid job id '../../escape'"
    assert any(expected in text for text in warnings), warnings
    assert set(os.listdir(tmp_path.parent)) == parent_before
    assert tree(tmp_path) == tmp_before
    assert [p for p in out.rglob("*") if p.is_file() and ".microfarm" not in p.parts] == []
    for root in (tmp_path.parent.parent, tmp_path.parent, tmp_path, out):
        assert not any("escape" in p.name for p in root.iterdir()), root
    assert server.call(lambda s: s.stats.frames_stored) == 0
