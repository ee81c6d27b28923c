"""The render client's store of job files trusts a file only by its checksum: a file is hashed when its identity
(inode, size, modification and change time) is not the one written down when its content last matched, so a
same-size substitute, even one that restores the modification time, is found, removed and fetched again; an
unchanged file is not hashed again, not even by the next client process."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
from conftest import Farm

from client.cache import BlendCache
from client.link import Link, fixed_target
from protocol import messages as m
from protocol.settings import JobRequest

TIMEOUT = 20.0
DATA = b"BLENDER-v500" + bytes(range(256)) * 40
SHA = hashlib.sha256(DATA).hexdigest()
FAKE = DATA[:-5] + b"EVIL!"  # the same size, other bytes


def _download(cache: BlendCache, data: bytes = DATA) -> Path:
    """As the link stores a file: through the cache's sink, which checks the digest as it writes."""
    sink = cache.sink(SHA, len(data))
    sink.write(data)
    sink.finish(SHA)
    return cache.commit(sink, SHA)


def _substitute(path: Path, *, replace: bool) -> None:
    """Other bytes of the same size in the store file, its modification time put back as it was."""
    before = path.stat()
    os.chmod(path, 0o644)
    if replace:  # a new file in its place (the inode number may well be reused)
        path.unlink()
    with open(path, "r+b" if path.exists() else "wb") as out:
        out.write(FAKE)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.unit
@pytest.mark.parametrize("replace", [False, True], ids=["written in place", "replaced"])
@pytest.mark.parametrize("restart", [False, True], ids=["same process", "next process"])
def test_a_same_size_substitute_is_found_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      replace: bool, restart: bool) -> None:
    cache = BlendCache(tmp_path)
    path = _download(cache)
    assert cache.lookup(SHA, len(DATA), "shot.blend") == path
    _substitute(path, replace=replace)
    if restart:
        cache = BlendCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="client.cache"):
        assert cache.lookup(SHA, len(DATA), "shot.blend") is None
    assert not path.exists(), "removed, so that it is fetched again"
    assert any("//shot.blend" in r.getMessage() and "fetching it again" in r.getMessage() for r in caplog.records)
    # Fetched again: trusted again.
    assert _download(cache) == path and cache.lookup(SHA, len(DATA)) == path


@pytest.mark.unit
def test_an_unchanged_file_is_not_hashed_again_by_the_next_process(tmp_path: Path) -> None:
    path = _download(BlendCache(tmp_path))
    # The content no longer matches, but nothing a program can do without changing the identity: so the note
    # written when it was downloaded is what the next process goes by (a file the store may not read would
    # be hashed, and fail).
    note = (tmp_path / "verified" / SHA).read_text().split()
    info = path.stat()
    assert [int(x) for x in note] == [info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    if os.geteuid() != 0:  # root reads anything: an unreadable file proves nothing there
        os.chmod(path, 0)
        assert BlendCache(tmp_path).lookup(SHA, len(DATA)) == path
        os.chmod(path, 0o444)
    # A note that no longer fits (the file changed since): hashed, found intact, noted afresh.
    os.utime(path)
    again = BlendCache(tmp_path)
    assert again.lookup(SHA, len(DATA)) == path
    info = path.stat()
    assert [int(x) for x in (tmp_path / "verified" / SHA).read_text().split()][4] == info.st_ctime_ns


@pytest.mark.integration
def test_the_client_fetches_a_substituted_blend_again_from_the_server(farm: Farm, tmp_path: Path) -> None:
    farm.server.files.path(SHA).write_bytes(DATA)
    farm.call(lambda s: s.create_job("shot.blend", SHA, len(DATA), JobRequest()))
    cache = BlendCache(tmp_path / "cache")
    link = Link(fixed_target("127.0.0.1", farm.port), name="c", secret=None, cache=cache, blender="5.0.1")
    link.start()
    try:
        link.set_state("idle")
        task = link.next_task(TIMEOUT)
        assert task is not None and isinstance(task.message, m.Probe)
        first = link.fetch_blend(task.epoch, SHA, len(DATA), name="shot.blend")
        assert first.read_bytes() == DATA
        farm.wait_until(lambda s: s.stats.files_sent == 1, TIMEOUT, "the first download counted")
        _substitute(first, replace=False)
        second = link.fetch_blend(task.epoch, SHA, len(DATA), name="shot.blend")
        assert second.read_bytes() == DATA, "the substitute was used"
        farm.wait_until(lambda s: s.stats.files_sent == 2, TIMEOUT, "fetched again")
        # Unchanged now: the next use takes it from the store.
        assert link.fetch_blend(task.epoch, SHA, len(DATA)) == second
        assert farm.call(lambda s: s.stats.files_sent) == 2
    finally:
        link.stop()


@pytest.mark.integration
@pytest.mark.bpy  # client.worker imports the renderer
def test_a_substitute_put_in_an_open_jobs_folder_is_not_rendered(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from test_project_kinds import _Renderer, _Server

    from client.worker import Worker
    from protocol.manifest import Manifest, ProjectFile

    files = {"scene.blend": b"BLENDER-v500 scene", "textures/wood.png": b"wood pixels"}
    manifest = Manifest.build([ProjectFile(relpath, hashlib.sha256(data).hexdigest(), len(data))
                               for relpath, data in files.items()], "scene.blend")
    server = _Server(BlendCache(tmp_path / "cache"), files)
    renderer = _Renderer()
    worker = Worker(server, renderer)  # type: ignore[arg-type]
    try:
        worker._open(1, "job-1", manifest)
        folder = renderer.opened[0].parent
        texture = folder / "textures" / "wood.png"
        texture.unlink()  # another file in its place, of the same size: the store's copy is intact
        texture.write_bytes(b"evil pixels")
        with caplog.at_level(logging.WARNING):
            worker._open(1, "job-1", manifest)
        assert "job-1: //textures/wood.png gone or changed on this client" in caplog.text
        assert texture.read_bytes() == b"wood pixels" and len(renderer.opened) == 2
    finally:
        worker.folders.close()
