"""The render-client bundle: one folder (or zip) that runs in any stock Blender 4.2+ with nothing installed.

    microfarm-client/
        README.txt          the one command, per platform
        bundle.json         version, protocol, vendored packages and the sha256 of every file
        client/ protocol/   our sources
        vendor/             pure-Python copies of msgpack, zeroconf and ifaddr (+ vendor/licenses/)

Only the .py sources of the vendored packages are copied: without their compiled modules msgpack uses
msgpack.fallback and zeroconf its pure-Python code, so one bundle serves every platform and every CPython
that Blender ships (3.11, 3.13). The packages are found through their modules' __file__, so the builder
works from the repository, the headless server and the installed extension alike. No bpy here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol.limits import PROTOCOL_VERSION

from .. import __version__

BUNDLE_DIR = "microfarm-client"
MANIFEST = "bundle.json"
#: What the client imports beyond the standard library and bpy, with what those need at run time on
#: CPython 3.11+ (zeroconf wants async_timeout only before 3.11).
VENDORED = ("msgpack", "zeroconf", "ifaddr")
#: Our own packages in the bundle, each with a file that tells it apart from a namesake.
SOURCES = {"client": "app.py", "protocol": "framing.py"}
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")
#: Fixed entry dates and modes: the same sources build the same zip, byte for byte.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_HERE = Path(__file__).resolve()


class BundleError(Exception):
    """The client bundle could not be built; the message says why."""


@dataclass(frozen=True)
class Vendored:
    name: str
    version: str
    package: Path          # the package folder the .py files are copied from
    licenses: tuple[Path, ...]


def zip_name(version: str = __version__) -> str:
    return f"{BUNDLE_DIR}-{version}.zip"


# --- finding what goes in ----------------------------------------------------------------------

def source_package(name: str) -> Path:
    """One of our packages: next to server_addon (the repository), inside it (the extension), or importable."""
    candidates = [_HERE.parents[2] / name, _HERE.parents[1] / name]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module of that name without a spec (run as a script)
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    for folder in candidates:
        if (folder / "__init__.py").is_file() and (folder / SOURCES[name]).is_file():
            return folder
    raise BundleError(f"the {name!r} package was not found (looked in {', '.join(map(str, candidates))})")


def vendored_package(name: str) -> Vendored:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise BundleError(f"{name} is not installed in this Python ({sys.executable}): {exc}") from None
    if module.__file__ is None:
        raise BundleError(f"{name} has no __file__ (a namespace package?)")
    package = Path(module.__file__).resolve().parent
    dist_info = _dist_info(package.parent, name)
    if dist_info is None:
        raise BundleError(f"no {name}-*.dist-info next to {package}: its version and licence are unknown")
    version = _metadata_field(dist_info / "METADATA", "Version")
    licenses = tuple(sorted(p for p in dist_info.rglob("*") if p.is_file() and p.name.upper().startswith(
        LICENSE_PREFIXES)))
    if not licenses:
        raise BundleError(f"{dist_info} holds no licence file: {name} cannot be redistributed without it")
    return Vendored(name, version, package, licenses)


def _dist_info(site: Path, name: str) -> Path | None:
    wanted = _normalise(name)
    for folder in sorted(site.glob("*.dist-info")):
        metadata = folder / "METADATA"
        if metadata.is_file() and _normalise(_metadata_field(metadata, "Name")) == wanted:
            return folder
    return None


def _metadata_field(path: Path, field: str) -> str:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            break  # the headers end at the first empty line
        key, _, value = line.partition(":")
        if key.strip().lower() == field.lower():
            return value.strip()
    raise BundleError(f"{path} has no {field} field")


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" not in path.relative_to(root).parts and path.is_file():
            yield path


# --- the bundle's contents ---------------------------------------------------------------------

def bundle_entries() -> list[tuple[str, bytes]]:
    """(path inside microfarm-client/, bytes) for every file of the bundle, sorted by path."""
    entries: dict[str, bytes] = {}
    for name in SOURCES:
        root = source_package(name)
        for path in _python_files(root):
            entries[f"{name}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    vendored = [vendored_package(name) for name in VENDORED]
    for item in vendored:
        for path in _python_files(item.package):
            entries[f"vendor/{item.name}/{path.relative_to(item.package).as_posix()}"] = path.read_bytes()
        for path in item.licenses:
            entries[f"vendor/licenses/{item.name}/{path.name}"] = path.read_bytes()
    own_license = next((p / "LICENSE" for p in (_HERE.parents[2], _HERE.parents[1]) if (p / "LICENSE").is_file()),
                       None)
    if own_license is not None:
        entries["LICENSE"] = own_license.read_bytes()
    entries["README.txt"] = readme_text().encode()
    manifest = {
        "name": BUNDLE_DIR,
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "requires": "Blender 4.2 or newer (CPython 3.11+)",
        "vendor": {v.name: {"version": v.version, "licenses": [f"vendor/licenses/{v.name}/{p.name}"
                                                              for p in v.licenses]} for v in vendored},
        "files": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(entries.items())},
    }
    entries[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return sorted(entries.items())


def readme_text() -> str:
    script = f"{BUNDLE_DIR}/client/__main__.py"
    script_win = script.replace("/", "\\")
    win_blender = '"C:\\Program Files\\Blender Foundation\\Blender 4.2\\blender.exe"'
    return f"""MicroFarm render client {__version__} (protocol {PROTOCOL_VERSION})

Runs in a stock Blender 4.2 or newer with nothing installed into Blender's Python.
Copy this folder to the render node, then run from the folder that holds it:

  Linux:    blender --background --python {script} -- --name NODE
  macOS:    /Applications/Blender.app/Contents/MacOS/Blender --background --python {script} -- --name NODE
  Windows:  {win_blender} --background --python {script_win} -- --name NODE   (Command Prompt)

Without --server the client finds the farm on the LAN (zeroconf). Add --server HOST:PORT where
multicast does not pass, --token-file PATH (or set MICROFARM_TOKEN) when the farm has a secret,
--interface ADDRESS to look for the farm on one network only. --help lists every option.

vendor/ holds pure-Python copies of msgpack, zeroconf and ifaddr; their versions are in
{MANIFEST}, their licences in vendor/licenses/. MicroFarm itself is GPL-3.0-or-later (LICENSE).
"""


# --- writing it ---------------------------------------------------------------------------------

def build_bundle(out_dir: Path) -> Path:
    """Write the bundle as out_dir/microfarm-client (replacing an older one) and return that folder."""
    entries = bundle_entries()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / BUNDLE_DIR
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLE_DIR}-", dir=out_dir))
    try:
        staging.chmod(0o755)  # mkdtemp's folder is private; the bundle is meant to be copied and shared
        for rel, data in entries:
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def zip_bytes() -> bytes:
    """The bundle as a zip whose one top folder is microfarm-client/: sorted entries, fixed dates."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for rel, data in bundle_entries():
            info = zipfile.ZipInfo(f"{BUNDLE_DIR}/{rel}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix, so the mode above is honoured everywhere alike
            zf.writestr(info, data)
    return buffer.getvalue()


def build_zip(out_dir: Path) -> Path:
    """Write out_dir/microfarm-client-<version>.zip and return its path."""
    data = zip_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / zip_name()
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path
