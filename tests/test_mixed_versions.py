"""Mixed farms, with real clients of different Blender versions: stock bpy 4.2 / 4.5 venvs running
the render-client bundle as a stock Blender would, beside the dev venv's bpy 5.0.1 client."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Clients, Farm, connected, repo_env, status_json, submit

from protocol.blendfile import BlenderVersion, read_version
from tools.bpyenv import BpyEnvError, ensure, lookup
from tools.client_bundle import build_bundle
from tools.localfarm import REPO

pytestmark = pytest.mark.e2e


def stock_python(line: str) -> Path:
    try:
        return ensure(lookup(line))
    except BpyEnvError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no stock bpy {line}: {exc}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


class StockClients:
    """Render clients run by a stock bpy venv from the bundle: no PYTHONPATH, a cwd outside the repo."""

    def __init__(self, root: Path, bundle: Path) -> None:
        self.root, self.bundle = root, bundle
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, line: str, name: str, server: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MICROFARM_TOKEN")}
        with open(self.root / f"client-{name}.log", "ab") as log:
            cmd = [str(stock_python(line)), str(self.bundle / "client" / "__main__.py"), "--",
                   "--server", server, "--name", name, "--cache-dir", str(self.root / f"cache-{name}")]
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def stock(tmp_path: Path, bundle: Path) -> Iterator[StockClients]:
    clients = StockClients(tmp_path, bundle)
    yield clients
    clients.stop()


def scene_saved_by(line: str, out: Path) -> Path:
    """A tiny animation saved by the stock bpy of that release line."""
    env = {**repo_env(), "PYTHONPATH": str(REPO)}  # tools.scenes needs only bpy and the standard library
    subprocess.run([str(stock_python(line)), "-m", "tools.scenes", str(out), "--frames", "6", "--size", "64x36",
                    "--samples", "2"], cwd=REPO, env=env, check=True, capture_output=True, timeout=180)
    return out


def renderers(farm: Farm, job_id: str) -> dict[int, str]:
    return farm.call(lambda s: {n: f.rendered_by for n, f in s.farm.jobs[job_id].frames.items()})


def client_named(name: str) -> Callable[[object], bool]:
    return lambda s: any(c.name == name and c.connected and c.ready for c in s.farm.clients.values())


@pytest.mark.matrix
def test_an_old_client_first_never_gets_a_newer_file_and_the_job_waits_for_a_new_one(
        farm: Farm, clients: Clients, stock: StockClients, scenes: Callable[..., Path]) -> None:
    blend = scenes("anim6", "--frames", "6", "--size", "64x36", "--samples", "2")
    assert read_version(blend).line == (5, 0)
    stock.start("4.2", "old-42", farm.address)
    farm.wait_until(client_named("old-42"), timeout=120, what="the 4.2 client")
    job_id = submit(farm, blend, "--chunk", "2", wait=False).stdout.strip()
    waiting = "waiting for a client with Blender 5.0 or newer; connected: 4.2.23"
    farm.wait_until(lambda s: s.farm.jobs[job_id].waiting == waiting, what="the waiting sentence")
    job = next(j for j in status_json(farm.address)["jobs"] if j["id"] == job_id)
    assert (job["state"], job["waiting"], job["blender_file"]) == ("probing", waiting, "5.0")
    assert farm.call(lambda s: s.farm.leases) == {}, "the 4.2 client was given nothing, not even the probe"

    clients.start("new-50", farm.address)
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.value == "done", timeout=180, what="the job done")
    assert set(renderers(farm, job_id).values()) == {"new-50"}
    status = status_json(farm.address)
    by_name = {c["name"]: c for c in status["clients"]}
    assert by_name["old-42"]["failures"] == 0 and by_name["old-42"]["blender"].startswith("4.2.23")
    assert by_name["new-50"]["blender"] == "5.0.1"
    assert next(j for j in status["jobs"] if j["id"] == job_id)["blender"] == "5.0.1"
    assert len(list((farm.output / job_id).glob("frame_*.png"))) == 6


@pytest.mark.matrix
def test_a_45_and_a_50_client_on_a_file_saved_by_45_render_it_with_one_version(
        farm: Farm, clients: Clients, stock: StockClients, tmp_path: Path) -> None:
    blend = scene_saved_by("4.5", tmp_path / "saved-by-45.blend")
    assert read_version(blend) == BlenderVersion(4, 5)
    stock.start("4.5", "lts-45", farm.address)
    clients.start("new-50", farm.address)
    farm.wait_until(lambda s: client_named("lts-45")(s) and client_named("new-50")(s), timeout=120,
                    what="both clients")
    farm.wait_until(connected(2))
    result = submit(farm, blend, "--chunk", "1")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[0]
    by = renderers(farm, job_id)
    assert len(by) == 6 and len(set(by.values())) == 1, f"frames from more than one Blender: {by}"
    # One client of each: the tie goes to the file's own release line.
    assert set(by.values()) == {"lts-45"}
    job = next(j for j in status_json(farm.address)["jobs"] if j["id"] == job_id)
    assert job["blender"] == "4.5.15" and job["blender_file"] == "4.5"


@pytest.mark.matrix
def test_blender_file_choice_and_a_file_that_is_no_blend(farm: Farm, clients: Clients, tmp_path: Path,
                                                          scenes: Callable[..., Path]) -> None:
    clients.start("new-50", farm.address)
    farm.wait_until(connected(1))
    fake = tmp_path / "notes.blend"
    fake.write_bytes(b"BLENDER? not really a blend file" + bytes(100))
    result = submit(farm, fake, wait=False)
    assert result.returncode == 1 and "notes.blend: not a .blend file" in result.stderr
    blend = scenes("anim6", "--frames", "6", "--size", "64x36", "--samples", "2")
    result = subprocess.run([sys.executable, "-m", "tools.submit", str(blend), "--server", farm.address,
                             "--blender", "5.3", "--frames", "1-2"], cwd=REPO, env=repo_env(),
                            capture_output=True, text=True, timeout=60)
    job_id = result.stdout.strip()
    farm.wait_until(lambda s: s.farm.jobs[job_id].waiting
                    == "waiting for a client with Blender 5.3; connected: 5.0.1", what="the waiting sentence")
    assert submit(farm, blend, "--blender", "file", "--frames", "1-2").returncode == 0
