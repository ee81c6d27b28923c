"""Shared fixtures: generated scenes, an in-process farm server, and real client processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server_addon.core.config import ServerConfig
from server_addon.core.service import FarmService
from server_addon.thread import ServerThread
from tools import localfarm
from tools.localfarm import REPO, start_client

#: Short heartbeats so that tests of lost clients finish in seconds.
TEST_HEARTBEAT_S = 0.3
TEST_HEARTBEAT_TIMEOUT_S = 2.0
#: The only interface zeroconf may use in tests.
LOOPBACK = "127.0.0.1"


def repo_env() -> dict[str, str]:
    env = localfarm.repo_env()
    env.pop("MICROFARM_TOKEN", None)
    return env


def make_scene(out: Path, *args: str) -> Path:
    """Generate a scene with tools.scenes in a separate bpy process."""
    subprocess.run([sys.executable, "-m", "tools.scenes", str(out), *args], cwd=REPO, env=repo_env(),
                   check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """scenes("name", *args) -> path of a generated .blend, made once per session."""
    root = tmp_path_factory.mktemp("scenes")
    made: dict[tuple[str, ...], Path] = {}

    def get(name: str, *args: str) -> Path:
        key = (name, *args)
        if key not in made:
            made[key] = make_scene(root / f"{name}.blend", *args)
        return made[key]
    return get


@pytest.fixture
def animation(scenes: Callable[..., Path]) -> Path:
    """12 frames, 64x36, a cube moving across the view."""
    return scenes("anim12", "--frames", "12", "--size", "64x36", "--samples", "4")


def build(out: Path, **env: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The add-on zip, built into `out` by the real tool (python -m tools.build_addon)."""
    result = subprocess.run([sys.executable, "-m", "tools.build_addon", "--out", str(out)], cwd=REPO,
                            env={**repo_env(), **env}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1]), result


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The extension zip, built once per session (its wheels are cached under build/wheels)."""
    path, _ = build(tmp_path_factory.mktemp("dist"))
    return path


class Farm:
    """A farm server running in this process on its own thread, plus helpers to watch it."""

    def __init__(self, output: Path, secret: str | None = None, port: int = 0, *, name: str = "test-farm",
                 discovery: bool = False, **config: Any) -> None:
        self.output = output
        self.thread = ServerThread(ServerConfig(
            output_dir=output, host="127.0.0.1", port=port, secret=secret, farm_name=name,
            heartbeat_interval=TEST_HEARTBEAT_S, heartbeat_timeout=TEST_HEARTBEAT_TIMEOUT_S, **config),
            discovery=discovery, interfaces=[LOOPBACK])  # zeroconf in tests: loopback only
        self.thread.start()
        self.port = self.thread.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def server(self) -> FarmService:
        assert self.thread.service is not None
        return self.thread.service

    def call(self, fn: Callable[[FarmService], Any]) -> Any:
        return self.thread.call(fn)

    def wait_until(self, predicate: Callable[[FarmService], Any], timeout: float = 60.0, what: str = "") -> Any:
        """Wait (on the server's change events, not by sleeping) until predicate(server) is truthy."""
        async def waiter() -> Any:
            server = self.server
            async with asyncio.timeout(timeout):
                while True:
                    version = server.feed.version
                    result = predicate(server)
                    if result:
                        return result
                    await server.feed.wait_change(version, timeout=1.0)
        try:
            return self.thread.submit(waiter(), timeout=timeout + 5)
        except TimeoutError:
            snapshot = self.call(lambda s: s.snapshot())
            raise AssertionError(f"timed out waiting for {what or predicate}: {snapshot}") from None

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call(lambda s: s.farm.jobs[job_id].view())

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    f = Farm(tmp_path / "output")
    yield f
    f.stop()


class Clients:
    """Real render client processes (python -m client with PyPI's bpy)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, server: str | None, *extra: str, cache: str | None = None,
              as_script: bool = False) -> subprocess.Popen[bytes]:
        """server None: the client finds the farm by discovery (pass --interface 127.0.0.1 in extra)."""
        proc = start_client(server, name, self.root / f"cache-{cache or name}", self.root / f"client-{name}.log",
                            *extra, as_script=as_script)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"client-{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Clients]:
    c = Clients(tmp_path)
    yield c
    c.stop_all()


def connected(count: int) -> Callable[[FarmService], bool]:
    return lambda s: sum(1 for c in s.farm.clients.values() if c.connected) >= count


def submit(farm: Farm, blend: Path, *args: str, wait: bool = True,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the real submit tool against the farm."""
    return submit_to(farm.address, blend, *args, wait=wait, timeout=timeout)


def submit_to(address: str, blend: Path, *args: str, wait: bool = True,
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tools.submit", str(blend), "--server", address, *args]
    if wait:
        cmd.append("--wait")
    return subprocess.run(cmd, cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=timeout)


async def _watch_until(address: str, job_id: str, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float) -> dict[str, Any] | None:
    from tools.control import Control
    control = await Control.connect(address, None)
    try:
        async with asyncio.timeout(timeout):
            async for job in control.watch(job_id):
                if predicate(job):
                    return job
    finally:
        await control.close()
    return None


def watch_until(address: str, job_id: str, predicate: Callable[[dict[str, Any]], bool],
                timeout: float = 120) -> dict[str, Any]:
    """Follow a job through the real control protocol until predicate(job view) holds."""
    job = asyncio.run(_watch_until(address, job_id, predicate, timeout))
    assert job is not None, f"job {job_id} ended before the condition held"
    return job


def jobs_tool(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.jobs", "--server", address, *args], cwd=REPO,
                          env=repo_env(), capture_output=True, text=True, timeout=60)


def status_json(address: str) -> dict[str, Any]:
    import json
    result = subprocess.run([sys.executable, "-m", "tools.status", "--server", address, "--json"], cwd=REPO,
                            env=repo_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class RogueServer:
    """A stranger on 127.0.0.1 that speaks the handshake but cannot pass it: its Welcome carries a made-up
    proof of the farm secret ("proof") or claims another protocol version ("version"). Counts who came."""

    def __init__(self, kind: str) -> None:
        assert kind in ("proof", "version")
        self.kind = kind
        self.connections = 0
        self.port = 0
        self._came = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"rogue-{kind}", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from protocol import messages as m
        from protocol.auth import new_nonce
        from protocol.limits import PROTOCOL_VERSION
        from protocol.stream import MessageStream

        with self._came:
            self.connections += 1
            self._came.notify_all()
        stream = MessageStream(reader, writer)
        try:
            await asyncio.wait_for(stream.recv(), 10.0)  # the client's Hello
            version = PROTOCOL_VERSION + 1 if self.kind == "version" else PROTOCOL_VERSION
            await stream.send(m.Welcome(version=version, farm="rogue", nonce=new_nonce(), auth_required=True,
                                        proof=os.urandom(32)))
            while True:  # whatever the client says (its Error), until it hangs up
                await asyncio.wait_for(stream.recv(), 10.0)
        except Exception:  # noqa: BLE001 - the client hanging up is the expected end
            pass
        finally:
            await stream.aclose()

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` connections came (each client that meets it, and each retry)."""
        with self._came:
            assert self._came.wait_for(lambda: self.connections >= count, timeout), \
                f"{self.connections} connections to the rogue server, not {count}"

    def __enter__(self) -> RogueServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, LOOPBACK, 0), self._loop).result(10.0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server that is to appear there later."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# --- test groups -------------------------------------------------------------------------------------------------
#
# Every test is in exactly one group:
#   unit         no subprocess, no bpy, no browser and no farm server: pure logic, files, real SQLite in-process, real
#                TCP on 127.0.0.1 between two ends the test holds itself. `make test-fast` (pytest -m unit) runs them.
#   integration  an in-process farm server with real sockets and scripted peers (raw TCP, HTTP, the control protocol,
#                zeroconf on 127.0.0.1), the project's own command-line tools and the headless server as processes,
#                real ffmpeg, scenes made by bpy in a subprocess.
#   e2e          real Blender render clients, stock Blenders of the version matrix, a real browser.
# and carries what it needs: bpy (PyPI's bpy, in process or in a subprocess), browser (Chromium), ffmpeg, matrix.
#
# A test's group is the highest of what its fixtures imply and of its module's default (`pytestmark = pytest.mark.unit`
# at the top of a file); a group marker on the test function itself is its group, and may not be lower than what its
# fixtures imply. A test that ends up in no group stops the collection with its name.

LEVELS = ("unit", "integration", "e2e")
#: Fixture -> the group it puts a test in at least (fixturenames holds the fixtures a test uses, directly or not).
FIXTURE_LEVELS = {
    "clients": "e2e", "stock": "e2e", "stock_clients": "e2e", "client_bundle": "e2e", "browser": "e2e", "page": "e2e",
    "farm": "integration", "web": "integration", "server": "integration", "start_server": "integration",
    "running": "integration", "impatient_farm": "integration", "loopback_multicast": "integration",
    "small_disk": "integration", "addon_zip": "integration", "zip_path": "integration", "scenes": "integration",
    "projects": "integration",
}
#: Fixture -> the markers of what it needs.
FIXTURE_NEEDS = {
    "scenes": ("bpy",), "projects": ("bpy",), "clients": ("bpy",), "stock": ("bpy", "matrix"),
    "stock_clients": ("bpy",), "browser": ("browser",), "page": ("browser",),
}


def _fixture_level(fixtures: set[str]) -> str | None:
    implied = [LEVELS.index(FIXTURE_LEVELS[name]) for name in fixtures if name in FIXTURE_LEVELS]
    return LEVELS[max(implied)] if implied else None


def _group(item: pytest.Item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    implied = _fixture_level(fixtures)
    own = {mark.name for mark in item.own_markers if mark.name in LEVELS}
    if len(own) > 1:
        raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(sorted(own))}: one of {', '.join(LEVELS)}")
    if own:
        (level,) = own
        if implied is not None and LEVELS.index(implied) > LEVELS.index(level):
            used = sorted(name for name in fixtures if FIXTURE_LEVELS.get(name) == implied)
            raise pytest.UsageError(f"{item.nodeid} is marked {level}, but its fixtures {used} make it {implied}")
        return level
    default = next((mark.name for mark in item.iter_markers() if mark.name in LEVELS), None)
    candidates = [LEVELS.index(name) for name in (default, implied) if name is not None]
    if not candidates:
        raise pytest.UsageError(f"{item.nodeid} is in no test group: mark it (or its module) with one of "
                                f"{', '.join(LEVELS)}, or give tests/conftest.py a rule for its fixtures")
    return LEVELS[max(candidates)]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put every test in its group (see above) and add the markers of what its fixtures need: `pytest -m unit` runs
    the fast group, `-m matrix` the version matrix alone, `-m "not bpy and not browser"` what runs without them."""
    groups = {item: _group(item) for item in items}
    # A module's default group is one candidate above, not a marker of its own: a test the fixtures lift to
    # integration must not match `-m unit` through its module.
    for item in items:
        for node in item.listchain()[:-1]:
            node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in LEVELS]
        item.own_markers[:] = [mark for mark in item.own_markers if mark.name not in LEVELS]
        item.add_marker(groups[item])
        fixtures = set(getattr(item, "fixturenames", ()))
        for need in sorted({need for name in fixtures for need in FIXTURE_NEEDS.get(name, ())}):
            if item.get_closest_marker(need) is None:
                item.add_marker(need)


# --- unit tests stay units ----------------------------------------------------------------------------------------
#
# While a unit test runs, starting a process or importing bpy fails it: the audit hook sees every subprocess (also
# asyncio's and those of libraries) and the first import of bpy.

_unit_running: list[str] = []
_unit_breaches: list[str] = []


def _unit_audit(event: str, args: tuple[Any, ...]) -> None:
    if not _unit_running:
        return
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.system"):
        what = args[1] if event == "subprocess.Popen" else args[0]
        _unit_breaches.append(f"{event} {what!r}"[:200])
    elif event == "import" and args[0] == "bpy":
        _unit_breaches.append("import bpy")


sys.addaudithook(_unit_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    if item.get_closest_marker("unit") is None:
        return (yield)
    _unit_running.append(item.nodeid)
    _unit_breaches.clear()
    try:
        result = yield
    finally:
        _unit_running.clear()
    if _unit_breaches:
        raise AssertionError(f"a unit test started a process or imported bpy (mark it integration, with what it "
                             f"needs): {'; '.join(_unit_breaches[:5])}")
    return result
