"""Stock Blenders for tests and benchmarks: one venv per PyPI bpy, holding only bpy and its own dependencies.

    python -m tools.bpyenv [VERSION ...]      (default: every version of the matrix; prints each venv's python)

A venv here is what a render node's stock Blender holds: bpy and what bpy itself depends on
(numpy, requests, zstandard, ...), nothing of ours and no msgpack or zeroconf. The venvs live in a
cache outside the checkout (MICROFARM_BPY_VENVS, default ~/.cache/microfarm/bpy-venvs), so a fresh
clone reuses them; each is made once, under a lock, and marked complete only after its check passed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PIP_TIMEOUT_S = 1800
CHECK_TIMEOUT_S = 120


@dataclass(frozen=True)
class StockBlender:
    line: str      # the release line an artist names: "4.2", "5.3"
    bpy: str       # the PyPI bpy version standing in for it
    python: str    # the CPython minor version that bpy is built for

    @property
    def label(self) -> str:
        return f"bpy {self.bpy} (CPython {self.python})"


#: The versions the suite covers: the LTS lines, 5.0, and the newest release on CPython 3.13.
MATRIX: tuple[StockBlender, ...] = (
    StockBlender("4.2", "4.2.23", "3.11"),
    StockBlender("4.5", "4.5.15", "3.11"),
    StockBlender("5.0", "5.0.1", "3.11"),
    StockBlender("5.3", "5.3.0", "3.13"),
)


class BpyEnvError(Exception):
    """A stock Blender venv could not be made; the message says why."""


def cache_root() -> Path:
    configured = os.environ.get("MICROFARM_BPY_VENVS")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microfarm" / "bpy-venvs"


def lookup(version: str) -> StockBlender:
    """A matrix entry by its line ("4.2") or bpy version ("4.2.23")."""
    for entry in MATRIX:
        if version in (entry.line, entry.bpy):
            return entry
    raise BpyEnvError(f"bpy {version} is not in the matrix ({', '.join(e.bpy for e in MATRIX)})")


def find_python(minor: str) -> Path | None:
    """An interpreter for CPython `minor` (e.g. "3.13"): this one, one on PATH, or one under pyenv."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == minor:
        return Path(sys.executable)
    on_path = shutil.which(f"python{minor}")
    if on_path and _runs(on_path):  # a pyenv shim is on PATH even when that version is not selected
        return Path(on_path)
    pyenv = shutil.which("pyenv") or str(Path.home() / ".pyenv" / "bin" / "pyenv")
    if not Path(pyenv).is_file():
        return None
    try:
        listed = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    candidates = [v.strip() for v in listed.stdout.splitlines() if v.strip().startswith(minor + ".")]
    for name in sorted(candidates, reverse=True):
        try:
            prefix = subprocess.run([pyenv, "prefix", name], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        python = Path(prefix) / "bin" / "python3"
        if python.is_file():
            return python
    return None


def _runs(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", ""], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def venv_python(entry: StockBlender) -> Path:
    return cache_root() / entry.bpy / "bin" / "python"


def ensure(entry: StockBlender) -> Path:
    """The python of a venv with only bpy `entry.bpy` in it, made if it is not there yet."""
    folder = cache_root() / entry.bpy
    stamp = folder / ".microfarm-complete"
    if stamp.is_file():
        return venv_python(entry)
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{entry.bpy}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be making the same venv
        if stamp.is_file():
            return venv_python(entry)
        base = find_python(entry.python)
        if base is None:
            raise BpyEnvError(f"{entry.label} needs CPython {entry.python}, and none was found "
                              f"(looked for python{entry.python} on PATH and under pyenv)")
        shutil.rmtree(folder, ignore_errors=True)  # a half-made venv from an interrupted run
        _run([str(base), "-m", "venv", str(folder)], f"making the venv for {entry.label}")
        python = venv_python(entry)
        _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"bpy=={entry.bpy}"],
             f"installing {entry.label}", PIP_TIMEOUT_S)
        check = "import bpy, sys; print('%d.%d.%d' % bpy.app.version, '%d.%d' % sys.version_info[:2])"
        out = _run([str(python), "-c", check], f"importing {entry.label}", CHECK_TIMEOUT_S)
        version, py = out.split()[-2:]
        if version != entry.bpy or py != entry.python:
            raise BpyEnvError(f"the venv for {entry.label} runs Blender {version} on Python {py}")
        stamp.write_text(f"{version} {py}\n")
        return python


def _run(cmd: list[str], what: str, timeout: float = 300) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BpyEnvError(f"{what} took longer than {timeout:.0f} s") from None
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BpyEnvError(f"{what} failed: {tail}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        entries = [lookup(v) for v in args] if args else list(MATRIX)
        for entry in entries:
            print(f"{entry.line}\t{ensure(entry)}", flush=True)
    except BpyEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
