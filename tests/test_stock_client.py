"""The render client in a stock Blender: the client bundle run by a Python that has only PyPI's bpy.

For every version of the matrix (tools.bpyenv) the bundle is run as Blender runs a script (by path, from a
folder outside the repository, no PYTHONPATH) against a real server: it renders a scene made by that same
version, frame for frame equal to a local render of the file by that version. Without the bundle's vendor/
the client stops with one line that says where to get the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import LOOPBACK, Farm, connected, repo_env, submit
from PIL import Image
from web_support import Http, start_web_on, stop_web

from server_addon.core.client_bundle import BUNDLE_DIR, MANIFEST, VENDORED, ZIP_DATE, zip_name
from tools.bpyenv import MATRIX, BpyEnvError, StockBlender, ensure, find_python
from tools.client_bundle import build_bundle
from tools.localfarm import REPO

pytestmark = pytest.mark.integration

FRAMES = 3
SIZE = (64, 36)
#: Largest difference of one 8-bit channel between a farm frame and the local render of the same file by the
#: same Blender: Cycles on the CPU with a fixed seed renders the same pixels whichever process runs it.
PIXEL_TOLERANCE = 1
STEP_TIMEOUT_S = 120


@dataclass(frozen=True)
class Stock:
    entry: StockBlender
    python: Path


@pytest.fixture(scope="session", params=MATRIX, ids=[e.line for e in MATRIX])
def stock(request: pytest.FixtureRequest) -> Stock:
    entry: StockBlender = request.param
    try:
        return Stock(entry, ensure(entry))
    except BpyEnvError as exc:
        if find_python(entry.python) is None and os.environ.get("CI") != "true":
            pytest.skip(f"{entry.label} cannot be tested here: {exc}")
        pytest.fail(f"{entry.label}: {exc}")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def zip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip as the command-line tool writes it."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "tools.client_bundle", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == out / zip_name() and path.is_file()
    return path


@pytest.fixture(scope="session")
def unzipped(tmp_path_factory: pytest.TempPathFactory, zip_path: Path) -> Path:
    """The zip unpacked into a fresh folder, as on a render node."""
    target = tmp_path_factory.mktemp("node")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(target)
    return target / BUNDLE_DIR


def stock_env() -> dict[str, str]:
    """A render node's environment: nothing points Python at the repository or a venv."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MICROFARM_TOKEN")}


class StockClients:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, stock: Stock, bundle: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
        work = self.root / f"node-{name}"  # the client's working folder, outside the repository
        work.mkdir()
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(stock.python), str(bundle / "client" / "__main__.py"), "--", *args, "--name", name,
                 "--cache-dir", str(work / "cache")], cwd=work, env=stock_env(), stdout=log,
                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def stock_clients(tmp_path: Path) -> Iterator[StockClients]:
    c = StockClients(tmp_path)
    yield c
    c.stop_all()


def run_with_stock(stock: Stock, bundle: Path, *args: str) -> None:
    """A tool of the repository (tools.scenes, tools.render_local) in the stock Python, on the bundle's packages."""
    env = {**stock_env(), "PYTHONPATH": os.pathsep.join([str(bundle / "vendor"), str(bundle), str(REPO)])}
    result = subprocess.run([str(stock.python), "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=STEP_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(args[:1])} in {stock.entry.label} failed:\n{result.stderr[-3000:]}"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.int16)


# --- the bundle itself ---------------------------------------------------------------------------

def test_zip_unpacks_to_the_bundle(zip_path: Path, unzipped: Path, bundle: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names) and all(n.startswith(f"{BUNDLE_DIR}/") for n in names)
    assert {info.date_time for info in infos} == {ZIP_DATE}
    # Only sources: one bundle for every platform and Python.
    assert not [n for n in names if n.endswith((".so", ".pyd", ".pyc", ".dylib", ".dll"))]

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert tree(unzipped) == tree(bundle)
    manifest = json.loads((unzipped / MANIFEST).read_text())
    files = tree(unzipped)
    del files[MANIFEST]
    assert manifest["files"] == {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    from importlib.metadata import version
    assert {name: v["version"] for name, v in manifest["vendor"].items()} == {n: version(n) for n in VENDORED}
    for name in VENDORED:
        assert (unzipped / "vendor" / name / "__init__.py").is_file()
        assert manifest["vendor"][name]["licenses"] and all((unzipped / p).is_file()
                                                           for p in manifest["vendor"][name]["licenses"])
    assert "--python microfarm-client/client/__main__.py" in (unzipped / "README.txt").read_text()
    # Reproducible: a second build writes the same bytes.
    again = subprocess.run([sys.executable, "-m", "tools.client_bundle", "--out", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert Path(again.stdout.strip()).read_bytes() == zip_path.read_bytes()


def test_web_page_serves_the_bundle(farm: Farm, zip_path: Path) -> None:
    web = start_web_on(farm)
    try:
        http = Http(web.port)
        first, second = http.get("/client/microfarm-client.zip"), http.get("/client/microfarm-client.zip")
        page = http.get("/")
    finally:
        stop_web(farm, web)
    assert first.status == 200 and first.headers["Content-Type"] == "application/zip"
    assert zip_name() in first.headers["Content-Disposition"]
    assert first.body == second.body == zip_path.read_bytes()
    assert b'href="/client/microfarm-client.zip"' in page.body


# --- the client in each stock Blender -------------------------------------------------------------

#: A process that has seen Python drivers' namespace (as opening a file with Python drivers does, scripts or not).
_DRIVER_NAMESPACE_SEEN = """
import bpy
bpy.app.driver_namespace["mf_seen"] = abs
print(bpy.app.tempdir, flush=True)
from client.finish import exit_process
exit_process(3)
"""


def test_a_process_that_saw_python_drivers_ends_with_its_code(stock: Stock, bundle: Path, tmp_path: Path) -> None:
    """bpy 4.2 as a module crashes, and 4.5 hangs for ever, after Python finishes once the driver namespace was
    read: a client that rendered a scene with Python drivers never stopped, tools lost their exit code."""
    env = {**stock_env(), "PYTHONPATH": os.pathsep.join([str(bundle / "vendor"), str(bundle)])}
    result = subprocess.run([str(stock.python), "-c", _DRIVER_NAMESPACE_SEEN], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, (result.returncode, result.stderr[-3000:])
    tempdir = Path(result.stdout.strip().splitlines()[-1])
    assert tempdir.name.startswith("blender_") and not tempdir.exists(), "Blender's session folder is removed"


def test_without_vendor_the_client_says_where_to_get_the_bundle(stock: Stock, bundle: Path, tmp_path: Path) -> None:
    bare = tmp_path / BUNDLE_DIR
    shutil.copytree(bundle, bare, ignore=shutil.ignore_patterns("vendor"))
    result = subprocess.run([str(stock.python), str(bare / "client" / "__main__.py"), "--", "--name", "bare",
                             "--server", "127.0.0.1:9"], cwd=tmp_path, env=stock_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error:") and "no msgpack and zeroconf" in lines[0]
    assert "/client/microfarm-client.zip" in lines[0] and "python -m tools.client_bundle" in lines[0]


def test_stock_client_renders_like_a_local_render(stock: Stock, bundle: Path, farm: Farm,
                                                  stock_clients: StockClients, tmp_path: Path) -> None:
    # A file saved by this very version: older Blenders cannot open newer files.
    blend = tmp_path / f"anim-{stock.entry.bpy}.blend"
    run_with_stock(stock, bundle, "tools.scenes", str(blend), "--frames", str(FRAMES),
                   "--size", "x".join(map(str, SIZE)), "--samples", "4")
    local = tmp_path / "local"
    run_with_stock(stock, bundle, "tools.render_local", str(blend), "1", str(FRAMES), str(local))

    name = f"stock-{stock.entry.line}"
    stock_clients.start(stock, bundle, name, "--server", farm.address)
    farm.wait_until(connected(1), timeout=STEP_TIMEOUT_S, what=f"{name} to connect")
    reported = farm.call(lambda s: [c.blender.split()[0] for c in s.farm.clients.values()])
    result = submit(farm, blend)
    assert result.returncode == 0, f"{result.stderr}\n--- client log:\n{stock_clients.log(name)[-3000:]}"
    job_id = result.stdout.strip()

    frames = sorted((farm.output / job_id).glob("frame_*.png"))
    assert [f.name for f in frames] == [f"frame_{n:04d}.png" for n in range(1, FRAMES + 1)]
    for frame in frames:
        farm_pixels, local_pixels = pixels(frame), pixels(local / frame.name)
        assert farm_pixels.shape == (SIZE[1], SIZE[0], 4)
        worst = int(np.abs(farm_pixels - local_pixels).max())
        assert worst <= PIXEL_TOLERANCE, f"{frame.name} differs from the local render by {worst} levels"
    assert np.abs(pixels(frames[0]) - pixels(frames[-1])).max() > 8, "the cube moves, yet the frames are alike"
    log = stock_clients.log(name)
    assert f"Blender {stock.entry.bpy}" in log and "Traceback" not in log
    assert reported == [stock.entry.bpy]  # "4.2.23 LTS" as Blender spells it


def test_stock_client_finds_the_farm_from_the_unzipped_bundle(stock: Stock, unzipped: Path, tmp_path: Path,
                                                              stock_clients: StockClients) -> None:
    from test_discovery import _loopback_multicast_problem

    problem = _loopback_multicast_problem()
    if problem:
        pytest.skip(problem)
    name = f"stock-{stock.entry.line}-{uuid.uuid4().hex[:8]}"
    farm = Farm(tmp_path / "output", name=name, discovery=True)  # advertised on 127.0.0.1 only
    try:
        stock_clients.start(stock, unzipped, "finder", "--interface", LOOPBACK, "--farm", name)
        farm.wait_until(connected(1), timeout=STEP_TIMEOUT_S, what="the client to find the farm")
        assert farm.call(lambda s: [c.name for c in s.farm.clients.values()]) == ["finder"]
    finally:
        stock_clients.stop_all()
        farm.stop()
    assert f"farm {name!r}" in stock_clients.log("finder")


SAVE_CLIENT_SCRIPT = """
import sys, time
import bpy
import server_addon
from server_addon.addon import runtime
server_addon.register()
try:
    assert bpy.ops.microfarm.save_client(directory=sys.argv[-1]) == {"FINISHED"}
    deadline, notices = time.monotonic() + 60, []
    while not notices and time.monotonic() < deadline:  # the zip is written on a worker thread
        notices = runtime.get().drain()[1]
        time.sleep(0.05)
    print("NOTICE", *((notices[0].level, notices[0].text) if notices else ("none",)))
finally:
    server_addon.unregister()
"""


def test_addon_saves_the_bundle(zip_path: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", SAVE_CLIENT_SCRIPT, str(tmp_path)], cwd=REPO, env=repo_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"NOTICE INFO Saved the render client as {tmp_path / zip_name()}" in result.stdout, result.stdout
    assert (tmp_path / zip_name()).read_bytes() == zip_path.read_bytes()


def test_stock_client_speaks_tls_to_a_farm_with_a_secret(stock: Stock, bundle: Path, tmp_path: Path,
                                                         stock_clients: StockClients) -> None:
    """The standard library's ssl is all the render client needs for TLS: in every Python of the matrix."""
    farm = Farm(tmp_path / "output", secret="stock-secret")
    try:
        name = f"tls-{stock.entry.line}"
        stock_clients.start(stock, bundle, name, "--server", farm.address, "--token", "stock-secret")
        farm.wait_until(connected(1), timeout=STEP_TIMEOUT_S, what=f"{name} to connect")
        line = f"connected to farm 'test-farm' at {farm.address} as c1 (TLS)"
        deadline = time.monotonic() + 30  # the client logs it a moment after the server counts it connected
        while line not in stock_clients.log(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert line in stock_clients.log(name), stock_clients.log(name)
    finally:
        farm.stop()
