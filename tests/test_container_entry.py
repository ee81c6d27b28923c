"""The images' entry command (deploy/docker/entrypoint.py) run as the containers run it: the same script, the
same MICROFARM_* variables, against a real server; the images themselves are not built here."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LOOPBACK, Farm, repo_env, submit

from tools.localfarm import REPO

ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.py"
SECRET = "container-secret"


def entry(*args: str, env: dict[str, str], **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(ENTRYPOINT), *args], cwd=REPO, env={**repo_env(), **env},
                            **popen)  # type: ignore[call-overload]


def health(what: str, env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, str(ENTRYPOINT), f"health-{what}"], env={**repo_env(), **env},
                          timeout=30).returncode


def token_file(root: Path) -> Path:
    path = root / "token"  # as a Secret mounted in a pod
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.e2e
@pytest.mark.bpy
@pytest.mark.timeout(240)
def test_the_client_image_entry_renders_for_its_server(tmp_path: Path, scenes: Callable[..., Path]) -> None:
    farm = Farm(tmp_path / "output", secret=SECRET)
    env = {"MICROFARM_SERVER": farm.address, "MICROFARM_TOKEN_FILE": str(token_file(tmp_path)),
           "MICROFARM_NAME": "pod-1", "MICROFARM_DEVICE": "CPU", "MICROFARM_CACHE_DIR": str(tmp_path / "cache"),
           "MICROFARM_DRAIN_TIMEOUT": "25", "MICROFARM_HEALTH_FILE": str(tmp_path / "alive")}
    log = tmp_path / "client.log"
    with open(log, "wb") as out:
        proc = entry("client", env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert health("client", env) in (0, 1)  # (the file may not be there yet)
        farm.wait_until(lambda s: any(c.name == "pod-1" and c.ready for c in s.farm.clients.values()),
                        what="the client from the entry command")
        assert health("client", env) == 0
        blend = scenes("anim3", "--frames", "3", "--size", "64x36", "--samples", "2")
        result = submit(farm, blend, "--token-file", str(token_file(tmp_path)), "--chunk", "2")
        assert result.returncode == 0, result.stderr
        job = farm.job(result.stdout.strip())
        assert job["state"] == "done" and job["frames_done"] == 3
        client = farm.call(lambda s: [(c.name, c.device, c.frames_rendered) for c in s.farm.clients.values()])
        assert client == [("pod-1", "CPU", 3)]
        proc.send_signal(signal.SIGTERM)  # what Kubernetes sends; the entry command exec'd the client itself
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert health("client", {**env, "MICROFARM_HEALTH_FILE": str(tmp_path / "never")}) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        farm.stop()


@pytest.mark.integration
def test_the_client_entry_needs_its_server(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "client"], env={**repo_env(), "MICROFARM_SERVER": ""},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "MICROFARM_SERVER is not set" in result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_server_image_entry_serves_metrics_and_health(tmp_path: Path) -> None:
    env = {"MICROFARM_HOST": LOOPBACK, "MICROFARM_PORT": "0", "MICROFARM_WEB_PORT": "0",
           "MICROFARM_METRICS_PORT": str(_free_port()), "MICROFARM_DATA": str(tmp_path / "data"),
           "MICROFARM_TOKEN_FILE": str(token_file(tmp_path)), "MICROFARM_FARM_NAME": "cluster"}
    proc = entry("server", env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode() for _ in range(3)]
        assert lines[2].startswith(f"MicroFarm metrics on http://127.0.0.1:{env['MICROFARM_METRICS_PORT']}/"), lines
        assert health("server", env) == 0
        conn = http.client.HTTPConnection(LOOPBACK, int(env["MICROFARM_METRICS_PORT"]), timeout=10)
        conn.request("GET", "/api/queue", headers={"Authorization": f"Bearer {SECRET}"})
        reply = conn.getresponse()
        assert reply.status == 200 and b'"outstanding": 0' in reply.read()
        assert (tmp_path / "data" / "state" / "jobs.sqlite3").is_file() and (tmp_path / "data" / "output").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert health("server", env) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.unit
@pytest.mark.parametrize("image, role", [("server", "server"), ("client", "client"), ("client-cuda", "client")])
def test_each_image_runs_this_entry_command_as_a_user_with_a_health_check(image: str, role: str) -> None:
    text = (REPO / "deploy" / "docker" / f"{image}.Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    assert "COPY deploy/docker/entrypoint.py /usr/local/bin/microfarm-entrypoint" in lines
    assert f'ENTRYPOINT ["tini", "--", "python", "/usr/local/bin/microfarm-entrypoint", "{role}"]' in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") and f'"health-{role}"' in line for line in lines)
    if role == "client":
        assert any(line.startswith("RUN pip install") and "bpy==${BPY_VERSION}" in line for line in lines)
