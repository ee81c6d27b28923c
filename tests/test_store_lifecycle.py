"""The server's content store over the life of submissions: files a submission in progress reuses survive the
deletion of the job they came from, files of failed or abandoned submissions do not stay, and an upload the
disk cannot hold is refused before it starts. Real servers on 127.0.0.1, real files, a real tmpfs."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Farm, repo_env

from protocol import messages as m
from protocol.manifest import Manifest, ProjectFile
from protocol.stream import sha256_file
from server_addon.core.storage import FREE_SPACE_MARGIN_BYTES, PARTIAL_PREFIX
from tools.control import Control, ToolError
from tools.localfarm import start_server

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
SETTINGS = {"frame_start": 1, "frame_end": 1}
#: Enough of a .blend for the server: it reads the header (the version that saved it), never the rest.
BLEND_HEAD = b"BLENDER-v500"


def project(root: Path, **files: int) -> Path:
    """A folder with scene.blend and the named files of the given sizes (random bytes)."""
    root.mkdir(parents=True)
    (root / "scene.blend").write_bytes(BLEND_HEAD + os.urandom(4096))
    for name, size in files.items():
        (root / f"{name}.png").write_bytes(os.urandom(size))
    return root


def manifest_of(folder: Path, *relpaths: str) -> Manifest:
    entries = [ProjectFile(r, sha256_file(folder / r), (folder / r).stat().st_size) for r in relpaths]
    return Manifest.build(entries, "scene.blend")


def raw_submit(manifest: Manifest) -> m.Submit:
    main = manifest.main_file
    return m.Submit(name="scene.blend", blend_sha256=main.sha256, blend_size=main.size, settings=SETTINGS,
                    start=False, **manifest.to_wire())


def stored(farm: Farm) -> set[str]:
    return {p.name for p in farm.server.files.root.iterdir() if not p.name.startswith(PARTIAL_PREFIX)}


def test_a_job_deleted_during_an_upload_keeps_the_files_the_upload_reuses(tmp_path: Path) -> None:
    folder = project(tmp_path / "proj", tex=1 << 20, new=1 << 20)
    farm = Farm(tmp_path / "out")

    async def scenario() -> None:
        first = await Control.connect(farm.address, None)
        job_a, _ = await first.submit(folder / "scene.blend", SETTINGS, start=False, main="scene.blend",
                                      files=[(r, folder / r) for r in ("scene.blend", "tex.png")])
        second = await Control.connect(farm.address, None)
        man = manifest_of(folder, "scene.blend", "tex.png", "new.png")
        await second.stream.send(raw_submit(man))
        ready = await asyncio.wait_for(second._reply(m.UploadReady), TIMEOUT)
        assert ready.need == [sha256_file(folder / "new.png")], "the files of job A are reused"
        # While the new texture is on its way, the artist deletes job A, the only job that uses the others.
        third = await Control.connect(farm.address, None)
        assert "deleted" in (await third.job_action("delete", job_a)).message
        assert stored(farm) >= {sha256_file(folder / "scene.blend"), sha256_file(folder / "tex.png")}
        await second.stream.send_file(None, folder / "new.png")
        done = await asyncio.wait_for(second._reply(m.Submitted), TIMEOUT)
        assert stored(farm) == man.shas()
        # Once job B exists its files are pinned by it, not by the finished submission: deleting it empties the store.
        assert "deleted" in (await third.job_action("delete", done.job_id)).message
        assert stored(farm) == set()
        for control in (first, second, third):
            await control.close()

    try:
        asyncio.run(scenario())
    finally:
        farm.stop()


def test_files_of_a_refused_or_abandoned_submission_do_not_stay(tmp_path: Path) -> None:
    folder = project(tmp_path / "proj", tex=1 << 20, big=4 << 20)
    (folder / "fake.blend").write_bytes(b"not a blend at all" + os.urandom(100))
    farm = Farm(tmp_path / "out")

    async def scenario() -> None:
        # Refused by create_job (the main file is no .blend): the file it sent goes with the refusal.
        fake = ProjectFile("fake.blend", sha256_file(folder / "fake.blend"), (folder / "fake.blend").stat().st_size)
        control = await Control.connect(farm.address, None)
        with pytest.raises(ToolError, match="fake.blend"):
            await control.submit(folder / "fake.blend", SETTINGS, start=False, main="fake.blend",
                                 files=[("fake.blend", folder / "fake.blend")])
        assert fake.sha256 not in stored(farm)
        await control.close()

        # The submitter goes away after one of its three files, in the middle of the second.
        man = manifest_of(folder, "scene.blend", "tex.png", "big.png")
        control = await Control.connect(farm.address, None)
        await control.stream.send(raw_submit(man))
        ready = await asyncio.wait_for(control._reply(m.UploadReady), TIMEOUT)
        by_sha = {f.sha256: folder / f.relpath for f in man.files}
        first, second = ready.need[0], ready.need[1]
        await control.stream.send_file(None, by_sha[first])
        farm.wait_until(lambda s: s.files.has(first), what="the first file in the store")
        await control.stream.send(m.Chunk(data=by_sha[second].read_bytes()[:65536]))
        await control.close()
        farm.wait_until(lambda s: not any(s.files.root.iterdir()), what="an empty store")

    try:
        asyncio.run(scenario())
    finally:
        farm.stop()


def test_an_upload_abandoned_by_a_killed_server_is_cleaned_at_restart(tmp_path: Path) -> None:
    folder = project(tmp_path / "proj", tex=1 << 20, big=8 << 20)
    output = tmp_path / "out"
    server, port = start_server(output, tmp_path / "server-1.log")
    address = f"127.0.0.1:{port}"
    store = output / ".microfarm" / "files"
    kept = manifest_of(folder, "scene.blend", "tex.png")
    try:
        async def scenario() -> str:
            control = await Control.connect(address, None)
            job_id, _ = await control.submit(folder / "scene.blend", SETTINGS, start=False, main="scene.blend",
                                             files=[(r, folder / r) for r in ("scene.blend", "tex.png")])
            await control.close()
            # A second project: a new .blend of its own, then the server dies in the middle of its big texture.
            (folder / "other.blend").write_bytes(BLEND_HEAD + os.urandom(4096))
            entries = [ProjectFile(r, sha256_file(folder / r), (folder / r).stat().st_size)
                       for r in ("other.blend", "tex.png", "big.png")]
            man = Manifest.build(entries, "other.blend")
            control = await Control.connect(address, None)
            main = man.main_file
            await control.stream.send(m.Submit(name="other.blend", blend_sha256=main.sha256, blend_size=main.size,
                                               settings=SETTINGS, start=False, **man.to_wire()))
            ready = await asyncio.wait_for(control._reply(m.UploadReady), TIMEOUT)
            assert ready.need == [main.sha256, sha256_file(folder / "big.png")]
            await control.stream.send_file(None, folder / "other.blend")
            await control.stream.send(m.Chunk(data=(folder / "big.png").read_bytes()[:1 << 20]))
            deadline = time.monotonic() + TIMEOUT
            while not ((store / main.sha256).exists() and list(store.glob(f"{PARTIAL_PREFIX}*"))):
                assert time.monotonic() < deadline, "the server did not store the first file"
                await asyncio.sleep(0.05)  # polling the disk of another process: there is no event to await
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=TIMEOUT)
            await control.close()
            return job_id

        job_id = asyncio.run(scenario())
        assert (store / sha256_file(folder / "other.blend")).exists(), "left by the killed server"
        server, _ = start_server(output, tmp_path / "server-2.log", port=port)
        assert {p.name for p in store.iterdir()} == kept.shas(), "only the files of the one job stay"
        log = (tmp_path / "server-2.log").read_text()
        assert "removed 1 stored files that no job uses" in log
        status = subprocess.run([sys.executable, "-m", "tools.status", "--server", address, "--json"], cwd=REPO,
                                env=repo_env(), capture_output=True, text=True, timeout=60)
        assert job_id in status.stdout, status.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a tmpfs in a private mount namespace needs root and unshare")
def test_an_upload_the_servers_disk_cannot_hold_is_refused_before_it_starts(tmp_path: Path) -> None:
    """The server's data dir on a 320 MiB tmpfs of its own (a mount namespace: nothing leaks to the host)."""
    data = tmp_path / "data"
    data.mkdir()
    log_path = tmp_path / "server.log"
    size_mib = FREE_SPACE_MARGIN_BYTES // 2**20 + 64
    inner = (f'mount -t tmpfs -o size={size_mib}m microfarm-test "$0" && exec "$@"')
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, str(data),
           sys.executable, "-m", "server_addon", "--host", "127.0.0.1", "--port", "0", "--no-discovery",
           "--output-dir", str(tmp_path / "out"), "--data-dir", str(data), "--farm-name", "full", "--web-port", "0"]
    with open(log_path, "ab") as log:
        server = subprocess.Popen(cmd, cwd=REPO, env=repo_env(), stdout=subprocess.PIPE, stderr=log)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        assert "listening on" in line, log_path.read_text()
        address = line.split("listening on ", 1)[1].split()[0]
        web_line = server.stdout.readline().decode()
        assert "web interface on" in web_line, log_path.read_text()
        web_port = int(web_line.rstrip().rstrip("/").rsplit(":", 1)[1])
        small = tmp_path / "small.blend"
        small.write_bytes(BLEND_HEAD + os.urandom(1 << 20))
        fits = submit_blend(address, small)
        assert fits.returncode == 0, fits.stderr
        large = tmp_path / "large.blend"
        large.write_bytes(BLEND_HEAD + os.urandom((100 << 20) - len(BLEND_HEAD)))
        refused = submit_blend(address, large)
        assert refused.returncode != 0
        message = refused.stderr.strip().splitlines()[-1]
        assert "the farm server has" in message and "this project needs 100.0 MiB more" in message, refused.stderr
        assert "Traceback" not in refused.stderr
        assert "refused: the farm server has" in log_path.read_text()
        # The web upload is refused from its headers, before its body is read (or sent: this one never is).
        status, body = web_upload_headers(web_port, 100 << 20)
        assert status == 507, body
        assert "the farm server has" in json.loads(body)["error"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert not any(data.iterdir()), "the tmpfs lived in the server's namespace only"


def web_upload_headers(port: int, length: int) -> tuple[int, bytes]:
    """A job upload announced with its Content-Length: the reply to the headers alone."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                     f"boundary=x\r\nContent-Length: {length}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def submit_blend(address: str, blend: Path) -> subprocess.CompletedProcess[str]:
    """The real submit tool; --blend-only: these .blends are a header and noise, nothing to trace."""
    cmd = [sys.executable, "-m", "tools.submit", str(blend), "--server", address, "--queue", "--blend-only"]
    return subprocess.run(cmd, cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=120)



def test_files_of_a_job_that_cannot_be_restored_are_kept(tmp_path: Path) -> None:
    """A job row a newer or damaged database holds is left untouched at start-up, and so are the stored files
    it may use: nothing of a job is lost because this server cannot read it."""
    import sqlite3

    folder = project(tmp_path / "proj", tex=4096)
    output = tmp_path / "out"
    farm = Farm(output)
    try:
        async def submit_one() -> None:
            control = await Control.connect(farm.address, None)
            await control.submit(folder / "scene.blend", SETTINGS, start=False, main="scene.blend",
                                 files=[(r, folder / r) for r in ("scene.blend", "tex.png")])
            await control.close()
        asyncio.run(submit_one())
        before = stored(farm)
        assert len(before) == 2
    finally:
        farm.stop()
    with sqlite3.connect(output / ".microfarm" / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET request = '{\"chunk\": \"many\"}'")
    again = Farm(output)
    try:
        assert again.call(lambda s: list(s.farm.jobs)) == []
        assert stored(again) == before
    finally:
        again.stop()
