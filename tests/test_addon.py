"""The Blender add-on as a user gets it: the extension zip that tools.build_addon makes, installed
into Blender (PyPI's bpy, in subprocesses: tests/addon_scenario.py), enabled and driven through its
operators while a real client renders.

Every Blender runs as a stock one (tools.bpyenv: a venv with only that bpy), and its render clients come
from the render-client bundle, run by that same Python: the version matrix installs the one zip into
each of 4.2, 4.5, 5.0 (CPython 3.11) and 5.3 (CPython 3.13), and every scenario runs in each of them
(a few seconds apiece: the scenes are tiny)."""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, build, repo_env
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from PIL import Image, ImageStat

from tools.bpyenv import MATRIX, BpyEnvError, StockBlender, ensure, find_python
from tools.build_addon import PLATFORMS, PYTHON_VERSIONS, python_tag, read_project

pytestmark = pytest.mark.integration

SCENARIO = REPO / "tests" / "addon_scenario.py"
#: The texture of the test scene: bright, and far from Blender's magenta "missing image" colour.
TEXTURE_RGB = (40, 210, 250)
#: Operators must return at once while frames stream in. This bound only a call that waits on the
#: network, a hash or a subprocess would exceed: it checks that the UI thread never waits on I/O;
#: it is not a benchmark.
OPERATOR_BOUND_S = 0.5
#: For each Blender platform: the sys_platform / platform_machine its wheels' markers see, and a
#: test of a wheel's platform tag.
PLATFORM_ENVIRONMENTS: dict[str, tuple[dict[str, str], Any]] = {
    "linux-x64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
                  lambda tag: tag.startswith("manylinux") and tag.endswith("_x86_64")),
    "linux-arm64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
                    lambda tag: tag.startswith("manylinux") and tag.endswith("_aarch64")),
    "windows-x64": ({"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
                    lambda tag: tag == "win_amd64"),
    "macos-arm64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
                    lambda tag: tag.startswith("macosx_") and tag.endswith(("_arm64", "_universal2"))),
    "macos-x64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
                  lambda tag: tag.startswith("macosx_") and tag.endswith(("_x86_64", "_universal2", "_intel"))),
}


@functools.cache
def stock_python(entry: StockBlender) -> Path:
    """The Python of a stock Blender venv; skipped where its CPython is missing, unless on CI (CI=true)."""
    try:
        return ensure(entry)
    except BpyEnvError as exc:
        if find_python(entry.python) is None and os.environ.get("CI") != "true":
            pytest.skip(str(exc))
        pytest.fail(str(exc))


@pytest.fixture(params=MATRIX, ids=[entry.line for entry in MATRIX])
def stock(request: pytest.FixtureRequest) -> tuple[StockBlender, Path]:
    return request.param, stock_python(request.param)


@pytest.fixture(scope="session")
def client_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The render-client bundle (client, protocol and pure-Python msgpack/zeroconf/ifaddr) a render node gets."""
    from tools.client_bundle import build_bundle
    return build_bundle(tmp_path_factory.mktemp("client-bundle"))


def scenario(name: str, work: Path, *args: str, python: Path, timeout: float = 300) -> dict[str, Any]:
    """Run tests/addon_scenario.py in a fresh process of a stock Blender's Python with a throw-away Blender
    user folder, and without the repository on its path (what the add-on imports must come from the zip)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MICROFARM_TOKEN")}
    env["BLENDER_USER_RESOURCES"] = str(work / "blender-user")
    result = subprocess.run([str(python), str(SCENARIO), name, "--work", str(work), *args], cwd=work, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the zip --------------------------------------------------------------------------------------

def _compatible(wheel: str, platform: str, python: str) -> bool:
    _, _, _, tags = parse_wheel_filename(wheel)
    platform_ok = PLATFORM_ENVIRONMENTS[platform][1]
    cp = python_tag(python)
    return any((tag.interpreter in ("py3", cp) and tag.abi in ("none", cp)
                or tag.abi == "abi3" and tag.interpreter.startswith("cp3") and int(tag.interpreter[3:]) <= int(cp[3:]))
               and (tag.platform == "any" or platform_ok(tag.platform)) for tag in tags)


def test_zip_is_an_installable_extension(addon_zip: Path, tmp_path: Path) -> None:
    version, dependencies = read_project(REPO / "pyproject.toml")
    assert addon_zip.name == f"microfarm-{version}.zip"
    with zipfile.ZipFile(addon_zip) as zf:
        names = zf.namelist()
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
        wheel_bytes = {name: zf.read(name) for name in names if name.startswith("wheels/")}
        sources = {name: zf.read(name).decode() for name in names if name.endswith(".py")}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], names
    assert "__main__.py" not in names, "the headless entry point is not part of the add-on"
    for required in ("__init__.py", "app.py", "thread.py", "core/service.py", "core/listener.py", "core/states.py",
                     "addon/__init__.py", "addon/panel.py",
                     "addon/operators.py", "addon/props.py", "addon/runtime.py", "addon/session.py",
                     "addon/bridge.py", "addon/outbox.py", "addon/sending.py", "LICENSE"):
        assert required in names

    assert manifest["schema_version"] == "1.0.0" and manifest["id"] == "microfarm"
    assert manifest["type"] == "add-on" and manifest["version"] == version
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert set(manifest["permissions"]) == {"network", "files"}
    assert set(manifest["platforms"]) == set(PLATFORMS)
    listed = manifest["wheels"]
    assert sorted(listed) == sorted(f"./{name}" for name in wheel_bytes), "every wheel listed and present"
    wheels = [name.removeprefix("./wheels/") for name in listed]

    # Self-contained on every platform and Python: each runtime dependency of pyproject.toml, and each of
    # their own dependencies (read from the wheels' METADATA), has a wheel for CPython 3.11 (Blender 4.2 to
    # 5.0) and for CPython 3.13 (Blender 5.1 to 5.3) there, and no wheel is there for any other Python.
    assert PYTHON_VERSIONS == ("3.11", "3.13")
    metadata = {}
    for wheel in wheels:
        (tmp_path / wheel).write_bytes(wheel_bytes[f"wheels/{wheel}"])
        with zipfile.ZipFile(tmp_path / wheel) as wz:
            meta = next(n for n in wz.namelist() if n.endswith(".dist-info/METADATA"))
            metadata[wheel] = wz.read(meta).decode()
        assert any(_compatible(wheel, platform, python) for platform in PLATFORMS for python in PYTHON_VERSIONS), \
            f"{wheel} is for no platform and Python the add-on supports"
    for platform, (environment, _), python in [(p, e, py) for p, e in PLATFORM_ENVIRONMENTS.items()
                                               for py in PYTHON_VERSIONS]:
        candidates = [w for w in wheels if _compatible(w, platform, python)]
        names = [canonicalize_name(parse_wheel_filename(w)[0]) for w in candidates]
        assert len(names) == len(set(names)), f"two wheels of one package for {platform}, CPython {python}"
        available = dict(zip(names, candidates, strict=True))
        needed = [Requirement(r) for r in dependencies] + [Requirement("microfarm-protocol")]
        seen: set[str] = set()
        while needed:
            requirement = needed.pop()
            name = canonicalize_name(requirement.name)
            if name in seen:
                continue
            seen.add(name)
            assert name in available, f"no wheel of {name} for {platform}, CPython {python}"
            for line in metadata[available[name]].splitlines():
                if line.startswith("Requires-Dist:"):
                    dep = Requirement(line.split(":", 1)[1].strip())
                    env = {"python_version": python, "python_full_version": f"{python}.0",
                           "implementation_name": "cpython", "platform_python_implementation": "CPython",
                           "extra": "", **environment}
                    if dep.marker is None or Marker(str(dep.marker)).evaluate(env):
                        needed.append(dep)
        assert {"msgpack", "zeroconf", "microfarm-protocol"} <= seen

    # The add-on imports protocol absolutely (from its wheel) and its own modules relatively; never the
    # repository's tools or client, never itself by the name `server_addon` (it is bl_ext.<repo>.microfarm).
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source, name)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("tools", "client", "server_addon", "tests"), f"{name}: {module}"

    # The protocol wheel works on its own: unpacked into an empty folder, imported from there. It carries
    # the client package too (for the render-client bundle), which imports without bpy.
    protocol_wheel = next(w for w in wheels if w.startswith("microfarm_protocol-"))
    assert protocol_wheel.endswith("-py3-none-any.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / protocol_wheel) as wz:
        assert wz.testzip() is None
        record = wz.read(f"microfarm_protocol-{version}.dist-info/RECORD").decode()
        wz.extractall(site)
    assert "protocol/messages.py,sha256=" in record and "client/app.py,sha256=" in record
    assert "client/__main__.py,sha256=" in record
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import protocol, protocol.messages, protocol.stream, "
             "protocol.discovery, client, client.app, client.link, client.cache; "
             "assert 'bpy' not in sys.modules, 'client imported bpy'; print(protocol.__file__); print(client.__file__)")
    result = subprocess.run([sys.executable, "-I", "-c", probe, str(site)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(Path(line).is_relative_to(site) for line in result.stdout.split())


def test_blenders_own_validator_accepts_the_zip(addon_zip: Path, stock: tuple[StockBlender, Path]) -> None:
    # The command-line half of Blender's extension system (`blender --command extension validate`), as each
    # stock Blender ships it, run by its own Python.
    _, python = stock
    site = python.parent.parent / "lib" / f"python{stock[0].python}" / "site-packages"
    (validator,) = site.glob("bpy/*/scripts/addons_core/bl_pkg/cli/blender_ext.py")
    result = subprocess.run([str(python), str(validator), "validate", str(addon_zip)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "Success" in result.stdout, result.stdout + result.stderr


def test_second_build_downloads_nothing_and_is_identical(addon_zip: Path, tmp_path: Path) -> None:
    # With every package index unreachable, the build still succeeds: it takes the wheels from its cache.
    again, result = build(tmp_path, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1")
    assert "downloading" not in result.stderr
    assert again.read_bytes() == addon_zip.read_bytes(), "the same sources build the same zip"


def test_package_imports_without_bpy() -> None:
    probe = ("import sys, server_addon, server_addon.addon, server_addon.addon.runtime, server_addon.addon.submit, "
             "server_addon.addon.session, server_addon.addon.bridge, server_addon.addon.outbox, "
             "server_addon.addon.sending; "
             "sys.exit('bpy was imported' if 'bpy' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


# --- in Blender -----------------------------------------------------------------------------------

def mean_rgb(path: Path, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    with Image.open(path) as image:
        return tuple(ImageStat.Stat(image.convert("RGB").crop(box)).mean)


def test_install_start_and_render_a_packed_job(addon_zip: Path, client_bundle: Path,
                                               stock: tuple[StockBlender, Path], tmp_path: Path) -> None:
    texture = tmp_path / "texture.png"  # next to the .blend, which uses it as //texture.png
    Image.new("RGB", (16, 16), TEXTURE_RGB).save(texture)
    result = scenario("render", tmp_path, "--zip", str(addon_zip), "--texture", str(texture),
                      "--client-bundle", str(client_bundle), python=stock[1])

    # Installed as an extension: protocol and the dependencies came from the zip's wheels, which Blender
    # unpacked into the throw-away user folder (ahead of this Python's own site-packages).
    assert Path(result["protocol_file"]).is_relative_to(tmp_path / "blender-user")
    modules = result["module_files"]
    assert {"protocol", "msgpack", "zeroconf"} <= set(modules), modules
    assert all(Path(f).is_relative_to(tmp_path / "blender-user") for f in modules.values()), modules

    job_a, job_b, job_c = result["order"]
    jobs = result["jobs"]
    assert [jobs[j]["state"] for j in (job_a, job_b, job_c)] == ["done"] * 3, jobs
    assert (jobs[job_a]["frame_range"], jobs[job_a]["frames_done"]) == ([1, 24], 24)
    assert (jobs[job_b]["frame_range"], jobs[job_b]["frames_done"]) == ([2, 3], 2), "the panel's frame range"
    assert jobs[job_a]["chunk"] == 2
    assert (jobs[job_c]["frames_done"], result["unsaved"]["name"]) == (2, "untitled.blend")

    # Every frame is there, and shows the texture: packed into the copy, since on the client the
    # file's //texture.png points nowhere (a missing image renders magenta).
    output = Path(result["output"])
    for job, frames in ((job_a, range(1, 25)), (job_b, range(2, 4)), (job_c, range(1, 3))):
        files = sorted((output / job).glob("frame_*.png"))
        assert [f.name for f in files] == [f"frame_{n:04d}.png" for n in frames]
        for path in files:
            assert Image.open(path).size == (64, 36)
            rgb = mean_rgb(path, (16, 9, 48, 27))
            assert all(abs(got - want) <= 6 for got, want in zip(rgb, TEXTURE_RGB, strict=True)), (path, rgb)
    size = result["texture_size"]
    assert result["packed_images"] == {"texture.png": size}, "the job's .blend carries the texture"
    assert result["unsaved"]["packed_images"] == {"texture.png": size}
    assert result["store_leftovers"] == [], "no temporary copy is left in the server's store"

    # The artist's file: same path, same dirty flag, nothing packed, same bytes on disk.
    before, during, after = result["before"], result["during"], result["after"]
    assert before == during == after
    assert before["packed"] == [] and before["image_paths"] == ["//texture.png"]
    assert before["filepath"].endswith("shot.blend") and before["sha256"]
    assert result["unsaved"]["before"] == result["unsaved"]["after"]
    assert result["unsaved"]["after"]["filepath"] == "" and result["unsaved"]["after"]["packed"] == []

    # Operators (and the timer's drain, and drawing the panel) returned at once while job A streamed,
    # and Stop Server with a client connected.
    done_before, done_after = result["frames_done_when_timed"]
    assert 1 <= done_before and done_after < 24, "the calls were timed while frames were still coming in"
    assert set(result["timings"]) == {"create_job", "pause_job", "resume_job", "create_job_2", "drain", "draw",
                                      "stop_server"}
    slow = {name: s for name, s in result["timings"].items() if s >= OPERATOR_BOUND_S}
    assert not slow, slow

    # The panel's state came through the queue the timer drains.
    view = {job["id"]: job for job in result["view"]["jobs"]}
    assert view[job_a]["state"] == "done" and view[job_a]["frames_done"] == 24
    (client,) = result["view"]["clients"]
    assert client["name"] == "addon-client" and client["state"] == "idle" and client["frames_rendered"] == 26
    panel = result["panel"]
    assert ["progress", 1.0, "24/24 frames"] in panel and ["progress", 1.0, "2/2 frames"] in panel
    assert ["label", "addon-client"] in panel and ["label", "idle"] in panel and ["label", "26 frames"] in panel
    assert ["operator", "microfarm.clear_completed"] in panel

    assert result["port_free_after_stop"]


def test_enable_disable_enable_leaves_nothing_behind(addon_zip: Path, stock: tuple[StockBlender, Path],
                                                     tmp_path: Path) -> None:
    # Timers, threads, zeroconf and the web interface (aiohttp from the zip's wheels for that Python) come
    # and go with the add-on.
    result = scenario("cycle", tmp_path, "--zip", str(addon_zip), python=stock[1])
    baseline = result["baseline"]
    for round_ in result["rounds"]:
        assert "microfarm-server" in round_["running_threads"], round_
        assert round_["advertised"] == round_["discovery"], round_
        if round_["discovery"]:  # the round with the web interface too (aiohttp from the zip's wheels)
            assert round_["web_page"].startswith("200 ") and "<html" in round_["web_page"].lower(), round_
            assert round_["web_port_free"], round_
        assert round_["threads_after"] == baseline, round_
        assert round_["port_free"], round_
        assert not round_["timer_left"] and not round_["operator_left"], round_
    modules = result["module_files"]
    assert "aiohttp" in modules and all(Path(f).is_relative_to(tmp_path / "blender-user") for f in modules.values())
    final = result["final"]
    assert final["port_free_after_stop"]
    assert final["threads_after_stop"] == baseline and final["threads_after_disable"] == baseline


def test_render_current_frame_split_and_shown(addon_zip: Path, client_bundle: Path,
                                              stock: tuple[StockBlender, Path], tmp_path: Path) -> None:
    texture = tmp_path / "texture.png"
    Image.new("RGB", (16, 16), TEXTURE_RGB).save(texture)
    result = scenario("frame", tmp_path, "--zip", str(addon_zip), "--texture", str(texture),
                      "--client-bundle", str(client_bundle), python=stock[1])
    for label in ("split", "whole"):
        entry = result["results"][label]
        job = entry["job"]
        assert job["state"] == "done" and job["frame_range"] == [2, 2], job
        assert job["tiles"] == (4 if label == "split" else 0) and job["frames_total"] == (4 if label == "split" else 1)
        path = Path(entry["path"])
        assert path.name == "frame_0002.png" and Image.open(path).size == (64, 36)
        rgb = mean_rgb(path, (0, 0, 64, 36))
        assert all(abs(got - want) <= 6 for got, want in zip(rgb, TEXTURE_RGB, strict=True)), (label, rgb)
        # Loaded into Blender on the main thread (under --background there is no Image Editor to show it in).
        image = entry["image"]
        assert image is not None, f"the {label} frame never reached bpy.data.images"
        assert image["size"] == [64, 36]
        centre = [round(v * 255) for v in image["centre"]]
        assert all(abs(got - want) <= 6 for got, want in zip(centre, TEXTURE_RGB, strict=True)), (label, centre)
        assert entry["tiles_left"] == [], "the tiles are removed once stitched"
    assert result["rendered_by"] == ["frame-client-1", "frame-client-2"], "the split frame's tiles went to both"
    # The artist's file is left as it was, but for the two frames it now shows as images.
    after = dict(result["after"])
    loaded = [path for path in after["image_paths"] if path.endswith("frame_0002.png")]
    assert sorted(loaded) == sorted(result["results"][label]["path"] for label in ("split", "whole"))
    after["image_paths"] = [path for path in after["image_paths"] if path not in loaded]
    assert result["before"] == after
    assert all(s < OPERATOR_BOUND_S for s in result["timings"].values()), result["timings"]


def pixels(path: Path) -> Any:
    import numpy as np
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.int16)


def test_the_open_file_travels_as_a_project(addon_zip: Path, client_bundle: Path,
                                            stock: tuple[StockBlender, Path], tmp_path: Path) -> None:
    # A project folder as an artist lays it out (a texture at //textures/wood.png, a collection linked from
    # //lib/props.blend with the library's own texture, a texture at an absolute path elsewhere), opened, the cube
    # moved and not saved, Pack Textures off. The add-on traces the saved copy as if it lay where the open file
    # lies and puts every file into the server's store; the folder is gone before the client starts.
    import numpy as np
    result = scenario("project", tmp_path, "--zip", str(addon_zip), "--client-bundle", str(client_bundle),
                      python=stock[1])
    assert result["pack_default"] is False, "packing is no longer needed: the files travel"
    blend = tmp_path / "project" / "scene.blend"
    outside = str(tmp_path / "external" / "noise.png")

    # Check Files: what travels, before anything is sent; the panel shows it.
    check = result["check"]
    assert check["filepath"] == str(blend) and check["job_id"] == ""
    assert (check["files"], check["on_farm"], check["missing"], check["outside"]) == (5, 0, [], [outside]), check
    assert ["label", outside] in result["check_panel"]
    assert any(item[0] == "label" and item[1].startswith("5 files (") and "the farm has 0 of them already" in item[1]
               for item in result["check_panel"]), result["check_panel"]

    # The job is the artist's folder: the .blend under its own name, every file in its relative place, the
    # outside texture moved in; each file by content, in the server's store.
    project = result["project"]
    assert project["main"] == "scene.blend"
    assert sorted(f["relpath"] for f in project["files"]) == sorted([
        "scene.blend", "textures/wood.png", "lib/props.blend", "lib/tex/marble.png",
        "_outside_project" + outside])
    assert result["sent"] == {**check, "job_id": result["job"]["id"]}
    job = result["job"]
    assert job["state"] == "done" and job["frames_done"] == 2 and job["warnings"] == [], job

    # Rendered by a client that never saw the folder: pixel for pixel the open file with its unsaved change.
    frames = [Path(p) for p in result["frames"]]
    assert [p.name for p in frames] == ["frame_0001.png", "frame_0002.png"]
    local, saved = Path(result["local"]), Path(result["local_saved"])
    for frame in frames:
        assert np.array_equal(pixels(frame), pixels(local / frame.name)), f"{frame.name} differs from a local render"
        assert not np.array_equal(pixels(frame), pixels(saved / frame.name)), "the unsaved change was not sent"

    # The same files again: the farm has them all, but for the new copy of the open file where this Blender's
    # saves differ from one to the next (5.3's do not: 0 bytes to send).
    recheck = result["recheck"]
    main_size = next(f["size"] for f in project["files"] if f["relpath"] == "scene.blend")
    assert recheck["files"] == 5 and recheck["missing"] == [] and recheck["on_farm"] >= 4, recheck
    assert recheck["to_send"] == (0 if recheck["on_farm"] == 5 else main_size), recheck

    # A texture gone from this disk: refused in one sentence that names it, before anything is sent.
    assert result["refusal"] == ["Not sent: 1 file the scene needs is missing on this disk: //textures/wood.png; "
                                 "turn on Render With Missing Files to send it anyway."]
    assert result["jobs_after_refusal"] == [job["id"]] and result["store_unchanged"]
    assert result["refused_check"]["missing"] == ["//textures/wood.png"]
    panel = result["refused_panel"]
    assert ["label", "//textures/wood.png"] in panel and any(
        item[0] == "label" and item[1].startswith("Missing on this disk (1)") for item in panel), panel
    # Allowed: sent without it, and the job's box in the panel carries the warning to the end.
    allowed = result["allowed_job"]
    assert allowed["state"] == "done" and allowed["allow_missing"] and allowed["frames_done"] == 2, allowed
    assert any("//textures/wood.png" in w for w in allowed["warnings"]), allowed
    assert ["WARNING", f"Render job {allowed['id']} sent to the farm without //textures/wood.png "
                       "(missing on this disk)."] in result["allowed_notices"]
    assert any(item[0] == "label" and "//textures/wood.png" in item[1] and "missing files" in item[1]
               for item in result["allowed_panel"]), result["allowed_panel"]
    assert not np.array_equal(pixels(Path(result["allowed_frames"][0])), pixels(frames[0])), "rendered without wood"

    # The artist's file: same bytes on disk, still dirty, same path, nothing packed; the operators returned at once.
    before = result["before"]
    assert before == result["during"] == result["after"] == result["final"]
    # (bpy 5.3 as a module does not flag a change made from Python as unsaved: is_dirty is compared, not required)
    assert before["filepath"] == str(blend) and before["packed"] == []
    assert "//textures/wood.png" in before["image_paths"] and outside in before["image_paths"]
    slow = {name: s for name, s in result["timings"].items() if s >= OPERATOR_BOUND_S}
    assert not slow, slow


def test_every_kind_of_file_travels_from_the_open_file(addon_zip: Path, client_bundle: Path,
                                                      stock: tuple[StockBlender, Path], tmp_path: Path) -> None:
    # The all-kinds project of tests/test_project_kinds.py (image texture, library two levels deep with its own
    # texture, image sequence, UDIM, external font, particles baked to //blendcache_scene/, a driver calling a
    # registered text block's function) plus a texture at an absolute path outside it, opened in Blender and sent
    # with Create Job and Needs Scripts on; the folder is gone before a client with --allow-scripts starts.
    import numpy as np
    from test_project_kinds import FONT

    result = scenario("kinds", tmp_path, "--zip", str(addon_zip), "--client-bundle", str(client_bundle),
                      python=stock[1])
    outside = tmp_path / "external" / "noise.png"
    relpaths = {f["relpath"] for f in result["project"]["files"]}
    expected = {"scene.blend", "textures/wood.png", "textures/tiles.1001.png", "textures/tiles.1002.png", FONT,
                "seq/flip_0001.png", "seq/flip_0002.png", "lib/props.blend", "lib/tex/marble.png",
                "lib/deep/rock.blend", "lib/deep/tex/rock.png", f"_outside_project{outside.as_posix()}"}
    caches = {r for r in relpaths if r.startswith("blendcache_scene/")}
    assert len(caches) == 3 and all(r.endswith(".bphys") for r in caches), sorted(relpaths)
    assert relpaths - caches == expected, sorted(relpaths ^ expected)
    assert result["project"]["main"] == "scene.blend", "Blender finds blendcache_scene/ by the .blend's name"
    assert result["sent"]["missing"] == [] and result["sent"]["outside"] == [str(outside)], result["sent"]
    assert result["needs_scripts"] is True
    job, log = result["job"], result["client_log"]
    assert job["state"] == "done" and job["frames_done"] == 2 and job["warnings"] == [], (job, log[-3000:])
    frames = [Path(p) for p in result["frames"]]
    assert [p.name for p in frames] == ["frame_0001.png", "frame_0002.png"]
    local = Path(result["local"])
    for frame in frames:
        assert np.array_equal(pixels(frame), pixels(local / frame.name)), f"{frame.name} differs from a local render"
    for complaint in ("does not exist", "missing", "doesn't exist", "PyDriver", "scripts disabled"):
        assert complaint not in log, (complaint, log[-3000:])
    assert result["before"] == result["after"], "the artist's file is left as it was"


# --- the version matrix ---------------------------------------------------------------------------

def test_every_blender_installs_the_zip_and_renders_with_its_own_version(
        addon_zip: Path, stock: tuple[StockBlender, Path], tmp_path: Path) -> None:
    entry, python = stock
    texture = tmp_path / "texture.png"
    Image.new("RGB", (16, 16), TEXTURE_RGB).save(texture)
    result = scenario("matrix", tmp_path, "--zip", str(addon_zip), "--texture", str(texture), python=python)
    assert result["blender"].split()[0] == entry.bpy and result["python"] == entry.python

    # Installed and enabled from the one zip: what the add-on imports came from the wheels for this Python,
    # which Blender unpacked into the throw-away user folder; the client package came along, without bpy work.
    site = tmp_path / "blender-user" / "extensions" / ".local" / "lib" / f"python{entry.python}" / "site-packages"
    modules = result["module_files"]
    assert {"protocol", "msgpack", "zeroconf"} <= set(modules), modules
    assert all(Path(f).is_relative_to(site) for f in modules.values()), modules
    assert Path(result["client_modules"]["client"]).is_relative_to(site)
    assert not result["client_modules"]["render_imported"]
    compiled = sorted(p.name for p in (site / "msgpack").glob("_cmsgpack*"))
    assert compiled and all(python_tag(entry.python)[2:] in name for name in compiled), compiled

    # Started by its operator, a job created by its operator: every frame rendered by a client of this same
    # Blender, run by this stock Python from the bundle that Save Render Client built from the installed
    # extension's own files (client and protocol from its wheel, msgpack/zeroconf/ifaddr from its wheels).
    job = result["job"]
    assert job["state"] == "done" and job["frames_done"] == job["frames_total"] == 4, job
    assert result["rendered_by"] == ["matrix-client"]
    bundle = Path(result["bundle"])
    assert bundle == tmp_path / "render-node" / "microfarm-client" and (bundle / "client" / "__main__.py").is_file()
    assert not list(bundle.rglob("*.so")) and not list(bundle.rglob("*.pyd")), "the bundle is pure Python"
    log = (tmp_path / "matrix-client.log").read_text(errors="replace")
    assert f"(Blender {result['blender']}," in log, log[-2000:]
    (client,) = result["clients"]
    assert client["blender"] in ("", result["blender"]), client
    assert result["packed_images"] == {"texture.png": texture.stat().st_size}, "packed on the way to the farm"
    assert result["before"] == result["after"], "the artist's file is left as it was"
    assert result["port_free_after_stop"] and result["notice_level"] in (None, "INFO"), result["notice"]
    assert all(s < OPERATOR_BOUND_S for s in result["timings"].values()), result["timings"]

    # The frames: all there, the size asked for, the texture where the plane is, and moving.
    frames = [Path(p) for p in result["frames"]]
    assert [p.name for p in frames] == [f"frame_{n:04d}.png" for n in range(1, 5)]
    for path in frames:
        assert Image.open(path).size == (64, 36)
    first, last = mean_rgb(frames[0], (0, 0, 64, 36)), mean_rgb(frames[-1], (0, 0, 64, 36))
    assert all(abs(got - want) <= 6 for got, want in zip(first, TEXTURE_RGB, strict=True)), first
    assert sum(last) < sum(first) / 2, (first, last)
    # The plane slides out of view to the side: the frames darken, frame by frame (the first two alike).
    means = [sum(mean_rgb(p, (0, 0, 64, 36))) for p in frames]
    assert means == sorted(means, reverse=True) and len({round(m) for m in means}) >= 3, means
