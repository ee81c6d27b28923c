"""The farm secret from a file (--token-file) or the environment ($MICROFARM_TOKEN) for the server, the render
client and the tools, never needed on a command line that every local user can read."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Clients, Farm, connected, repo_env

from protocol.secret import EXAMPLE_SECRET, SecretError, add_secret_options, read_secret_file, secret_from_args
from tools.localfarm import REPO, start_server

SECRET = "s3cret farm words"


def _file(tmp_path: Path, text: bytes, mode: int = 0o600, name: str = "farm.secret") -> Path:
    path = tmp_path / name
    path.write_bytes(text)
    os.chmod(path, mode)
    return path


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_secret_options(parser)
    return parser.parse_args(argv)


@pytest.mark.unit
@pytest.mark.parametrize("text", [b"s3cret farm words", b"s3cret farm words\n", b"s3cret farm words\r\n",
                                  b"  s3cret farm words \n# the rest is not read\n"])
def test_the_first_line_of_the_file_is_the_secret(tmp_path: Path, text: bytes) -> None:
    warnings: list[str] = []
    assert read_secret_file(_file(tmp_path, text), warnings.append) == SECRET
    assert warnings == []


@pytest.mark.unit
@pytest.mark.parametrize(("mode", "who"), [(0o640, "its group"), (0o644, "everyone"), (0o604, "everyone")])
def test_a_file_others_may_read_is_used_with_a_warning(tmp_path: Path, mode: int, who: str) -> None:
    warnings: list[str] = []
    path = _file(tmp_path, b"s3cret farm words\n", mode)
    assert read_secret_file(path, warnings.append) == SECRET
    (warning,) = warnings
    assert f"readable by {who}" in warning and f"chmod 600 {path}" in warning and SECRET not in warning


@pytest.mark.unit
def test_a_file_that_holds_no_secret_is_refused_with_a_sentence(tmp_path: Path) -> None:
    for text, message in ((b"", "is empty"), (b"\n\n", "is empty"), (b"\xff\xfe", "not UTF-8"),
                          (b"x" * 5000, "over 4096 bytes")):
        with pytest.raises(SecretError, match=message):
            read_secret_file(_file(tmp_path, text))
    with pytest.raises(SecretError, match="cannot read the token file .*nothing"):
        read_secret_file(tmp_path / "nothing")
    with pytest.raises(SecretError, match="token file"):  # a folder: "Is a directory", or not a regular file
        read_secret_file(tmp_path)


@pytest.mark.unit
def test_where_the_secret_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, b"from the file\n")
    monkeypatch.delenv("MICROFARM_TOKEN", raising=False)
    assert secret_from_args(_args([])) is None
    monkeypatch.setenv("MICROFARM_TOKEN", "from the environment")
    assert secret_from_args(_args([])) == "from the environment"
    assert secret_from_args(_args(["--token-file", str(path)])) == "from the file"
    assert secret_from_args(_args(["--token", "from the line"])) == "from the line"
    with pytest.raises(SystemExit):  # one or the other, not both
        _args(["--token", "a", "--token-file", str(path)])


@pytest.mark.unit
def test_the_manifests_example_secret_is_refused_wherever_it_comes_from(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = (REPO / "deploy" / "kubernetes" / "base" / "secret.yaml").read_text()
    assert f"token: {EXAMPLE_SECRET}" in shipped  # the value a cluster gets if its operator forgot to change it
    path = _file(tmp_path, f"{EXAMPLE_SECRET}\n".encode())
    monkeypatch.delenv("MICROFARM_TOKEN", raising=False)
    for argv in (["--token-file", str(path)], ["--token", EXAMPLE_SECRET]):
        with pytest.raises(SecretError, match="example value .* set a secret of your own"):
            secret_from_args(_args(argv))
    monkeypatch.setenv("MICROFARM_TOKEN", EXAMPLE_SECRET)
    with pytest.raises(SecretError, match="example value"):
        secret_from_args(_args([]))


@pytest.mark.integration
def test_help_discourages_token_on_the_command_line() -> None:
    for module in ("server_addon", "client", "tools.status", "tools.jobs", "tools.submit"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=repo_env(),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        flat = " ".join(out.split())
        assert "--token-file PATH" in flat, module
        assert "visible to other local users in the process list" in flat, module


@pytest.mark.integration
def test_server_and_tools_read_the_secret_from_a_file(tmp_path: Path) -> None:
    token = _file(tmp_path, b"s3cret farm words\n")
    server, port = start_server(tmp_path / "out", tmp_path / "server.log", extra=("--token-file", str(token)))
    try:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline
        env = {k: v for k, v in repo_env().items() if k != "MICROFARM_TOKEN"}
        status = [sys.executable, "-m", "tools.status", "--server", f"127.0.0.1:{port}"]
        ok = subprocess.run([*status, "--token-file", str(token)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        by_env = subprocess.run(status, cwd=REPO, env={**env, "MICROFARM_TOKEN": SECRET}, capture_output=True,
                                text=True, timeout=60)
        assert by_env.returncode == 0, by_env.stderr
        wrong = _file(tmp_path, b"other words\n", name="wrong.secret")
        refused = subprocess.run([*status, "--token-file", str(wrong)], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 1 and "secret" in refused.stderr, refused.stderr
        loose = _file(tmp_path, b"s3cret farm words\n", 0o644, name="loose.secret")
        warned = subprocess.run([*status, "--token-file", str(loose)], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        assert warned.returncode == 0, warned.stderr
        assert f"warning: the token file {loose} is readable by everyone" in warned.stderr
        missing = subprocess.run([*status, "--token-file", str(tmp_path / "none")], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and missing.stderr.startswith("error: cannot read the token file")
        assert "Traceback" not in missing.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    for program in (["-m", "server_addon", "--output-dir", str(tmp_path / "o2")], ["-m", "client"]):
        bad = subprocess.run([sys.executable, *program, "--token-file", str(tmp_path / "none")], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "error: cannot read the token file" in bad.stderr, bad.stderr


@pytest.mark.e2e
def test_a_render_client_joins_with_its_secret_from_a_file(tmp_path: Path, clients: Clients) -> None:
    token = _file(tmp_path, b"s3cret farm words\n")
    farm = Farm(tmp_path / "out", secret=SECRET)
    try:
        proc = clients.start("filed", farm.address, "--token-file", str(token))
        assert SECRET.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        farm.wait_until(connected(1), 120, "the client joined with the secret from its file")
    finally:
        farm.stop()
