"""Build the MicroFarm add-on: one Blender extension zip that "Install from Disk" accepts.

    python -m tools.build_addon [--out dist/] [--cache build/wheels]

The zip holds the add-on package (server_addon with core/ and addon/, without the headless
entry point), its blender_manifest.toml with `version` and `wheels` filled in, and ./wheels/:
a wheel made here of the `protocol` and `client` packages (the client travels with the add-on so
that a render-client bundle can be made from the installed files), plus the wheels of
pyproject.toml's runtime dependencies (and theirs) for Linux x64/arm64, Windows x64 and macOS
arm64/x64, for CPython 3.11 (Blender 4.2, 4.5, 5.0) and 3.13 (Blender 5.1 to 5.3).

One zip serves every one of those Blenders: Blender reads the Python versions an extension supports
from its wheels' tags (the union over all wheels, `python_versions_from_wheels` in bl_pkg), and
installs only the wheels that match its own platform and Python (`_extensions_wheel_filter_for_this_system`).
Downloaded wheels are cached per Python version and platform (build/wheels/cp311/linux-x64/...),
keyed by the dependency list, so a second build downloads nothing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .bpyenv import find_python
from .localfarm import REPO

#: The CPython versions of the Blenders the add-on supports: 4.2, 4.5, 5.0 run 3.11; 5.1 to 5.3 run 3.13.
PYTHON_VERSIONS = ("3.11", "3.13")
ADDON_PACKAGE = "server_addon"
PROTOCOL_PACKAGE = "protocol"
#: The top-level packages of the self-built wheel: the wire format, and the render client that uses it.
WHEEL_PACKAGES = (PROTOCOL_PACKAGE, "client")
PROTOCOL_DIST = "microfarm_protocol"
EXTENSION_ID = "microfarm"
#: Blender 4.2's Linux builds need glibc 2.28; a manylinux wheel for an older glibc works too.
MANYLINUX_GLIBC = range(28, 16, -1)


def _manylinux(arch: str) -> tuple[str, ...]:
    # pip does not expand manylinux_2_X tags to older ones by itself (it does for manylinux2014 and macOS).
    return (*(f"manylinux_2_{minor}_{arch}" for minor in MANYLINUX_GLIBC), f"manylinux2014_{arch}")


#: Blender's platform names (as in the manifest) -> the pip --platform tags a wheel may carry there.
PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux-x64": _manylinux("x86_64"),
    "linux-arm64": _manylinux("aarch64"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_11_0_arm64",),
    "macos-x64": ("macosx_11_0_x86_64",),  # pip adds the older macOS versions and universal2
}
#: Left out of the zip: the headless entry point, byte code, editor and OS litter.
EXCLUDED_TOP_FILES = frozenset({"__main__.py", "blender_manifest.toml"})
EXCLUDED_DIRS = frozenset({"__pycache__"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")
EXCLUDED_NAMES = frozenset({".DS_Store"})
#: Zip entries get a fixed date, so the same sources build the same zip.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
PIP_TIMEOUT_S = 600


#: Packages that Blender 4.2 to 5.3 bundle in their own Python: the headless server installs them from
#: pyproject.toml, the extension does not ship them again (a second copy would only shadow Blender's).
BLENDER_PROVIDES = frozenset({"numpy", "requests", "zstandard"})


class BuildError(Exception):
    """The add-on could not be built; the message says why."""


def read_project(pyproject: Path) -> tuple[str, list[str]]:
    """The version and the runtime dependencies from pyproject.toml that the extension must carry (those
    every supported Blender's Python already holds are left out)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [r for r in project.get("dependencies", []) if _requirement_name(r) not in BLENDER_PROVIDES]
    return project["version"], requirements


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement


# --- the protocol wheel -----------------------------------------------------------------------

def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _zip_write(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _package_files(root: Path) -> Iterator[Path]:
    """Files under root worth shipping, in a stable order."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.name in EXCLUDED_NAMES or path.name.endswith(EXCLUDED_SUFFIXES):
            continue
        yield path


def build_protocol_wheel(repo: Path, version: str, requires: list[str], dest: Path) -> Path:
    """A pure-Python wheel (PEP 427) of the protocol and client packages, written with the standard library.

    The client imports bpy only when it renders, so `import client` works anywhere protocol does."""
    dist_info = f"{PROTOCOL_DIST}-{version}.dist-info"
    metadata = "\n".join([
        "Metadata-Version: 2.1",
        f"Name: {PROTOCOL_DIST}",
        f"Version: {version}",
        "Summary: MicroFarm's wire format (protocol) and render client (client), as the add-on carries them",
        "License: GPL-3.0-or-later",
        f"Requires-Python: >={min(PYTHON_VERSIONS)}",
        *(f"Requires-Dist: {requirement}" for requirement in requires),
        "",
    ])
    wheel = "\n".join(["Wheel-Version: 1.0", "Generator: microfarm tools.build_addon", "Root-Is-Purelib: true",
                       "Tag: py3-none-any", ""])
    entries: list[tuple[str, bytes]] = []
    for package in WHEEL_PACKAGES:
        source = repo / package
        files = [(f"{package}/{path.relative_to(source).as_posix()}", path.read_bytes())
                 for path in _package_files(source)]
        if not any(name == f"{package}/__init__.py" for name, _ in files):
            raise BuildError(f"{source} is not the {package} package (no __init__.py)")
        entries += files
    entries += [(f"{dist_info}/METADATA", metadata.encode()), (f"{dist_info}/WHEEL", wheel.encode()),
                (f"{dist_info}/top_level.txt", "".join(f"{p}\n" for p in WHEEL_PACKAGES).encode())]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist_info}/RECORD,,\n"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{PROTOCOL_DIST}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            _zip_write(zf, name, data)
        _zip_write(zf, f"{dist_info}/RECORD", record.encode())
    return path


# --- third-party wheels -----------------------------------------------------------------------

def _cache_key(requirements: list[str], tags: tuple[str, ...], python: str) -> str:
    text = json.dumps({"requirements": sorted(requirements), "tags": tags, "python": python})
    return hashlib.sha256(text.encode()).hexdigest()


def _python_version(python: Path) -> str:
    try:
        out = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{python} does not run: {exc}") from None
    return out.stdout.strip() or "?"


def python_tag(python: str) -> str:
    """"3.13" -> "cp313", the name of that Python's wheel cache."""
    return "cp" + python.replace(".", "")


def download_wheels(requirements: list[str], cache: Path, platform: str, tags: tuple[str, ...],
                    python: str) -> list[Path]:
    """The wheels of `requirements` and their dependencies for one platform and CPython version, from the
    cache or PyPI."""
    folder = cache / python_tag(python) / platform
    stamp = folder / ".stamp.json"
    # pip picks wheels by the target's tags but evaluates dependency markers (python_version < "3.13")
    # for the Python that runs it: run the target's own Python where this machine has one.
    pip_python = find_python(python)
    if pip_python is None:
        pip_python = Path(sys.executable)
        print(f"warning: no CPython {python} here; the dependency markers of its wheels are evaluated for "
              f"{sys.version_info.major}.{sys.version_info.minor}", file=sys.stderr)
    resolver = _python_version(pip_python)
    key = _cache_key(requirements, (*tags, f"resolved-by-{resolver}"), python)
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        wheels = [folder / name for name in recorded.get("wheels", [])]
        if recorded.get("key") == key and all(w.is_file() for w in wheels):
            return wheels
    if not requirements:
        return []
    # Another dependency list (or a broken cache): start over, so no outdated wheel is shipped.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cmd = [str(pip_python), "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--quiet",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
           *(arg for tag in tags for arg in ("--platform", tag)), "--dest", str(folder), *requirements]
    print(f"downloading wheels for {platform}, CPython {python}: {', '.join(requirements)}", file=sys.stderr,
          flush=True)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError(f"pip download for {platform}, CPython {python} took longer than {PIP_TIMEOUT_S} s") \
            from None
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"pip could not download the wheels for {platform}, CPython {python}: {detail}")
    wheels = sorted(folder.glob("*.whl"))
    stamp.write_text(json.dumps({"key": key, "wheels": [w.name for w in wheels]}, indent=1))
    return wheels


# --- the manifest and the zip -----------------------------------------------------------------

def manifest_text(template: str, version: str, wheels: list[str]) -> str:
    """The manifest with its version and wheel list filled in (checked by parsing it back)."""
    listing = "wheels = [\n" + "".join(f'  "./wheels/{name}",\n' for name in wheels) + "]"
    text, versions = re.subn(r'(?m)^version = ".*"$', f'version = "{version}"', template)
    text, lists = re.subn(r"(?m)^wheels = \[\]$", lambda _: listing, text)
    if versions != 1 or lists != 1:
        raise BuildError('the manifest template needs one `version = "..."` line and one `wheels = []` line')
    parsed = tomllib.loads(text)
    if parsed.get("wheels") != [f"./wheels/{name}" for name in wheels] or parsed.get("version") != version:
        raise BuildError("the filled-in manifest does not read back as written")
    return text


def addon_files(package: Path) -> Iterator[tuple[Path, str]]:
    """(file, name in the zip) for the add-on package; the zip's root is the package."""
    for path in _package_files(package):
        rel = path.relative_to(package)
        if len(rel.parts) == 1 and rel.name in EXCLUDED_TOP_FILES:
            continue
        yield path, rel.as_posix()


def build(out: Path, cache: Path, *, repo: Path = REPO) -> Path:
    version, requirements = read_project(repo / "pyproject.toml")
    with tempfile.TemporaryDirectory(prefix="microfarm-build-") as staging:
        return _build(out, cache, repo, version, requirements, Path(staging))


def _build(out: Path, cache: Path, repo: Path, version: str, requirements: list[str], staging: Path) -> Path:
    wheels: dict[str, Path] = {}
    protocol_wheel = build_protocol_wheel(repo, version, requirements, staging)
    wheels[protocol_wheel.name] = protocol_wheel
    for python in PYTHON_VERSIONS:
        for platform, tags in PLATFORMS.items():
            for wheel in download_wheels(requirements, cache, platform, tags, python):
                wheels.setdefault(wheel.name, wheel)  # a py3-none-any or abi3 wheel is listed once
    names = sorted(wheels)
    package = repo / ADDON_PACKAGE
    manifest = manifest_text((package / "blender_manifest.toml").read_text(encoding="utf-8"), version, names)

    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{EXTENSION_ID}-{version}.zip"
    partial = out / f".{target.name}.part"
    with zipfile.ZipFile(partial, "w") as zf:
        _zip_write(zf, "blender_manifest.toml", manifest.encode())
        for path, arcname in addon_files(package):
            _zip_write(zf, arcname, path.read_bytes())
        if (repo / "LICENSE").is_file():
            _zip_write(zf, "LICENSE", (repo / "LICENSE").read_bytes())
        for name in names:
            # Wheels are zips already: stored, not compressed again.
            info = zipfile.ZipInfo(f"wheels/{name}", date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, wheels[name].read_bytes(), compress_type=zipfile.ZIP_STORED)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.build_addon",
                                     description="Build the MicroFarm Blender extension zip.")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="folder for the zip (default: dist/)")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "wheels",
                        help="downloaded wheels, per Python version and platform (default: build/wheels/)")
    args = parser.parse_args(argv)
    try:
        target = build(args.out.resolve(), args.cache.resolve())
    except (BuildError, OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
