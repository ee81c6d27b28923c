"""The in-Blender half of tests/test_addon.py: runs in its own bpy process and prints one JSON line.

    BLENDER_USER_RESOURCES=DIR python tests/addon_scenario.py render --zip Z --work W --texture T --rgb R,G,B
    BLENDER_USER_RESOURCES=DIR python tests/addon_scenario.py cycle --zip Z --work W
    BLENDER_USER_RESOURCES=DIR python tests/addon_scenario.py frame --zip Z --work W --texture T
    BLENDER_USER_RESOURCES=DIR python tests/addon_scenario.py matrix --zip Z --work W --texture T
    BLENDER_USER_RESOURCES=DIR python tests/addon_scenario.py project --zip Z --work W
    BLENDER_USER_RESOURCES=DIR python tests/addon_scenario.py kinds --zip Z --work W

`python` is the Python of a stock Blender (tools.bpyenv: a venv with only PyPI's bpy). With
--client-bundle B, render clients run from the render-client bundle B (B/client/__main__.py) with
that same Python, as on a render node with that same stock Blender; without it, as `python -m client`
with the repository on their path.

It installs the built extension the way Blender's "Install from Disk" does, with no network, into
the user folder named by BLENDER_USER_RESOURCES (never the real one), and drives the add-on through
its operators. The repository is deliberately NOT on sys.path: `protocol` must come from the wheel
inside the zip. Under a bpy script, timers do not fire while the script runs, so it waits on the
server thread and calls the timer's drain function itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import socket
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ADDON = "bl_ext.user_default.microfarm"
WAIT_S = 120.0

if "BLENDER_USER_RESOURCES" not in os.environ:
    sys.exit("refusing to run without BLENDER_USER_RESOURCES: it would install into the real user folder")

import bpy  # noqa: E402


def log(*parts: Any) -> None:
    print("scenario:", *parts, file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(zip_path: Path, enable: bool) -> None:
    # Blender puts the folder it unpacks extensions' wheels into on sys.path at start-up only if it exists
    # then; make it now and put it first (ahead of a dev venv's own msgpack, zeroconf or aiohttp), so the
    # add-on runs on the zip's wheels as in Blender.
    python = "python{}.{}".format(*sys.version_info[:2])
    wheels = Path(bpy.utils.user_resource("EXTENSIONS")) / ".local" / "lib" / python / "site-packages"
    wheels.mkdir(parents=True, exist_ok=True)  # existing now, so that the import system watches it
    sys.path.insert(0, str(wheels))
    bpy.context.preferences.system.use_online_access = False  # no remote repository is synced
    for repo in bpy.context.preferences.extensions.repos:
        if repo.use_remote_url:
            repo.enabled = False
    result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default",
                                                      enable_on_install=enable)
    assert result == {"FINISHED"}, result


def addon_module(name: str) -> types.ModuleType:
    return sys.modules[f"{ADDON}.{name}"]


def configure(output: Path, discovery: bool = False, web: bool = False) -> None:
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.port = 0
    prefs.bind_address = "127.0.0.1"
    prefs.use_discovery = discovery
    prefs.use_web, prefs.web_host, prefs.web_port = web, "127.0.0.1", 0
    prefs.output_dir = str(output)
    prefs.farm_name = "addon-test"


def start_server() -> Any:
    runtime, session = addon_module("addon.runtime"), addon_module("addon.session")
    assert bpy.ops.microfarm.start_server() == {"FINISHED"}
    rt = runtime.get()
    assert rt.wait_for(session.State.RUNNING, 30), f"the server did not start: {rt.notice}"
    return rt


def stop_server(rt: Any, timings: dict[str, float] | None = None) -> int:
    session = addon_module("addon.session")
    port = rt.address[1]
    assert timed("stop_server", timings if timings is not None else {}, bpy.ops.microfarm.stop_server) == {"FINISHED"}
    assert rt.wait_for(session.State.STOPPED, 30), "the server did not stop"
    return port


def port_free(port: int) -> bool:
    """Whether a new server could listen on the port now (SO_REUSEADDR, as servers bind: connections the
    old server closed may linger in TIME_WAIT, but no listening socket may be left)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


PACKED_SCRIPT = """\
import json, sys
import bpy
bpy.ops.wm.open_mainfile(filepath=sys.argv[-1], load_ui=False, use_scripts=False)
print(json.dumps({i.name: (i.packed_file.size if i.packed_file else None) for i in bpy.data.images}))
"""


def packed_images(blend: Path) -> dict[str, int | None]:
    """{image name: packed size or None} of a .blend, read in another bpy process (this one is the artist's)."""
    import subprocess
    result = subprocess.run([sys.executable, "-c", PACKED_SCRIPT, str(blend)], capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_until(rt: Any, predicate: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Wait on the server's change events (on its own loop) until predicate(server) is truthy."""
    thread = rt.thread

    async def waiter() -> Any:
        server = thread.service
        async with asyncio.timeout(timeout):
            while True:
                version = server.feed.version
                result = predicate(server)
                if result:
                    return result
                await server.feed.wait_change(version, timeout=1.0)
    try:
        return thread.submit(waiter(), timeout=timeout + 5)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}: {thread.call(lambda s: s.snapshot())}") from None


def timed(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - started
    return result


class FakeLayout:
    """Stands in for UILayout (no UI under bpy scripts) and records what a panel draws."""

    def __init__(self) -> None:
        self.items: list[list[Any]] = []
        self.use_property_split = self.use_property_decorate = False

    def _sub(self, *_: Any, **__: Any) -> FakeLayout:
        return self

    row = column = box = split = _sub

    def label(self, text: str = "", **_: Any) -> None:
        self.items.append(["label", text])

    def prop(self, _data: Any, name: str, **_: Any) -> None:
        self.items.append(["prop", name])

    def operator(self, idname: str, **_: Any) -> types.SimpleNamespace:
        self.items.append(["operator", idname])
        return types.SimpleNamespace()

    def progress(self, factor: float = 0.0, text: str = "", **_: Any) -> None:
        self.items.append(["progress", round(factor, 3), text])


def draw_panels() -> list[list[Any]]:
    panel = addon_module("addon.panel")
    layout = FakeLayout()
    for cls in panel.classes:
        if not hasattr(cls, "poll") or cls.poll(bpy.context):
            cls.draw(types.SimpleNamespace(layout=layout), bpy.context)
    return layout.items


@contextlib.contextmanager
def env_without(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


#: The render-client bundle to start clients from (--client-bundle), or None: the repository's client.
CLIENT_BUNDLE: Path | None = None


def start_client(address: str, work: Path, name: str = "addon-client", bundle: Path | None = None,
                 *extra: str) -> Any:
    """A real render client process: from the render-client bundle, with this stock Blender's Python, as a
    render node runs it; else the way the other tests start theirs."""
    bundle = bundle or CLIENT_BUNDLE
    if bundle is not None:
        import subprocess
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BLENDER_USER_RESOURCES")}
        with open(work / f"{name}.log", "ab") as log_file:  # the client is another machine's Blender
            return subprocess.Popen(
                [sys.executable, str(bundle / "client" / "__main__.py"), "--", "--server", address,
                 "--name", name, "--cache-dir", str(work / f"{name}-cache"), *extra],
                cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    spec = importlib.util.spec_from_file_location("microfarm_localfarm", REPO / "tools" / "localfarm.py")
    assert spec is not None and spec.loader is not None
    localfarm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localfarm)  # by path: the repository itself stays off sys.path
    with env_without("BLENDER_USER_RESOURCES"):  # the client is another machine's Blender
        return localfarm.start_client(address, name, work / f"{name}-cache", work / f"{name}.log", *extra)


# --- the scene --------------------------------------------------------------------------------

def build_scene(texture: Path, frames: int, relative_to: Path | None, samples: int = 2) -> None:
    """A plane that fills an orthographic camera's view, lit by nothing but its own emission, showing
    the texture: with the Standard view transform the rendered pixels are the texture's colour."""
    bpy.ops.wm.read_homefile(use_empty=True)  # unlike read_factory_settings, keeps add-ons and preferences
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 64, 36, 100
    scene.render.image_settings.file_format = "PNG"
    scene.view_settings.view_transform = "Standard"
    scene.frame_start, scene.frame_end = 1, frames
    world = bpy.data.worlds.new("World")
    world.color = (0.0, 0.0, 0.0)
    scene.world = world

    mesh = bpy.data.meshes.new("Plane")
    mesh.from_pydata([(-4, -4, 0), (4, -4, 0), (4, 4, 0), (-4, 4, 0)], [], [(0, 1, 2, 3)])
    mesh.uv_layers.new(name="UVMap")
    plane = bpy.data.objects.new("Plane", mesh)
    scene.collection.objects.link(plane)
    material = bpy.data.materials.new("Textured")
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    nodes.clear()
    image_node = nodes.new("ShaderNodeTexImage")
    image_node.image = bpy.data.images.load(str(texture))
    emission = nodes.new("ShaderNodeEmission")
    output = nodes.new("ShaderNodeOutputMaterial")
    links.new(image_node.outputs["Color"], emission.inputs["Color"])
    links.new(emission.outputs["Emission"], output.inputs["Surface"])
    mesh.materials.append(material)

    camera_data = bpy.data.cameras.new("Camera")
    camera_data.type = "ORTHO"
    camera_data.ortho_scale = 4.0
    camera = bpy.data.objects.new("Camera", camera_data)
    camera.location = (0.0, 0.0, 5.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    if relative_to is not None:
        bpy.ops.wm.save_as_mainfile(filepath=str(relative_to))
        bpy.ops.file.make_paths_relative()  # the texture becomes //texture.png, next to the .blend
        bpy.ops.wm.save_mainfile()


def file_state(blend: Path | None) -> dict[str, Any]:
    """What "left exactly as it was" means for the artist's open file."""
    return {
        "filepath": bpy.data.filepath,
        "is_dirty": bpy.data.is_dirty,
        "packed": sorted(image.name for image in bpy.data.images if image.packed_file is not None),
        "image_paths": sorted(image.filepath for image in bpy.data.images if image.source == "FILE"),
        "sha256": sha256(blend) if blend is not None else None,
    }


# --- scenarios --------------------------------------------------------------------------------

def render(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    texture: Path = args.texture
    blend = work / "shot.blend"
    # Enough frames that the client is still streaming them while the operators below are timed.
    build_scene(texture, frames=24, relative_to=blend, samples=64)
    install(args.zip, enable=True)
    protocol = sys.modules.get("protocol")
    configure(work / "output")
    runtime = addon_module("addon.runtime")

    bpy.ops.wm.open_mainfile(filepath=str(blend))  # the artist opens the shot
    before = file_state(blend)
    rt = start_server()
    client = start_client(f"127.0.0.1:{rt.address[1]}", work)
    try:
        wait_until(rt, lambda s: any(c.connected for c in s.farm.clients.values()), "the client")
        settings = bpy.context.scene.microfarm
        settings.pack_textures = True
        settings.chunk = 2
        timings: dict[str, float] = {}
        assert timed("create_job", timings, bpy.ops.microfarm.create_job) == {"FINISHED"}
        job_a = wait_until(rt, lambda s: next(iter(s.farm.jobs), None), "job A on the server")

        # While the client streams job A's frames, every operator returns at once.
        wait_until(rt, lambda s: s.farm.jobs[job_a].frames_done >= 1, "job A's first frame")
        done_before = rt.thread.call(lambda s: s.farm.jobs[job_a].frames_done)
        timed("pause_job", timings, lambda: bpy.ops.microfarm.pause_job(job_id=job_a))
        timed("resume_job", timings, lambda: bpy.ops.microfarm.resume_job(job_id=job_a))
        settings.use_frame_range, settings.frame_start, settings.frame_end = True, 2, 3
        timed("create_job_2", timings, bpy.ops.microfarm.create_job)
        timed("drain", timings, runtime.drain_now)
        timed("draw", timings, draw_panels)
        done_after = rt.thread.call(lambda s: s.farm.jobs[job_a].frames_done)
        during = file_state(blend)

        job_b = wait_until(rt, lambda s: next((j for j in s.farm.jobs if j != job_a), None), "job B")
        wait_until(rt, lambda s: all(j.state.finished for j in s.farm.jobs.values()), "jobs A and B to end")
        sha = {j: rt.thread.call(lambda s, j=j: s.farm.jobs[j].blend_sha256) for j in (job_a, job_b)}
        stored = rt.thread.call(lambda s: s.files.path(sha[job_a]))
        after = file_state(blend)

        # The panel's state arrives through the queue that the timer drains.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            views = {job["id"]: dict(job) for job in rt.view.jobs}
            if all(views.get(j, {}).get("state") == "done" for j in (job_a, job_b)):
                break
            rt.wait_view(timeout=max(0.0, deadline - time.monotonic()))
        runtime.drain_now()
        panel = draw_panels()
        view = {"jobs": [dict(job) for job in rt.view.jobs], "clients": [dict(c) for c in rt.view.clients]}

        # An unsaved file works too: its copy is sent with the texture packed.
        build_scene(texture, frames=2, relative_to=None)
        bpy.context.scene.microfarm.pack_textures = True
        unsaved_before = file_state(None)
        assert bpy.ops.microfarm.create_job() == {"FINISHED"}
        job_c = wait_until(rt, lambda s: next((j for j in s.farm.jobs if j not in (job_a, job_b)), None), "job C")
        wait_until(rt, lambda s: s.farm.jobs[job_c].state.finished, "job C to end")
        stored_c = rt.thread.call(lambda s: s.files.path(s.farm.jobs[job_c].blend_sha256))
        unsaved = {"before": unsaved_before, "after": file_state(None),
                   "packed_images": packed_images(stored_c),
                   "name": rt.thread.call(lambda s: s.farm.jobs[job_c].name)}
        jobs = rt.thread.call(lambda s: {j: s.farm.jobs[j].view() for j in (job_a, job_b, job_c)})
        output = rt.thread.call(lambda s: str(s.outputs.root))
        leftovers = sorted(p.name for p in stored.parent.iterdir() if p.name.startswith("."))
        port = stop_server(rt, timings)  # with the client still connected
    finally:
        client.terminate()
        client.wait(timeout=30)
    return {
        "protocol_file": getattr(protocol, "__file__", None), "module_files": module_files(),
        "jobs": jobs, "order": [job_a, job_b, job_c], "output": output, "timings": timings,
        "frames_done_when_timed": [done_before, done_after], "packed_images": packed_images(stored),
        "texture_size": texture.stat().st_size, "store_leftovers": leftovers,
        "before": before, "during": during, "after": after, "unsaved": unsaved,
        "view": view, "panel": panel, "port_free_after_stop": port_free(port),
        "notice": rt.notice.text if rt.notice else None,
    }


def frame(args: argparse.Namespace) -> dict[str, Any]:
    """Render Current Frame, split across two clients and whole, with the result loaded into Blender."""
    work: Path = args.work
    blend = work / "shot.blend"
    build_scene(args.texture, frames=3, relative_to=blend, samples=4)
    install(args.zip, enable=True)
    configure(work / "output")
    runtime = addon_module("addon.runtime")
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    bpy.context.scene.frame_set(2)
    before = file_state(blend)
    rt = start_server()
    address = f"127.0.0.1:{rt.address[1]}"
    clients = [start_client(address, work, f"frame-client-{i}") for i in (1, 2)]
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    try:
        wait_until(rt, lambda s: sum(c.connected and c.ready for c in s.farm.clients.values()) == 2, "two clients")
        settings = bpy.context.scene.microfarm
        for label, split in (("split", 4), ("whole", None)):
            settings.use_split, settings.split_tiles = split is not None, split or 0
            known = set(rt.thread.call(lambda s: list(s.farm.jobs)))
            assert timed(label, timings, bpy.ops.microfarm.render_current_frame) == {"FINISHED"}
            job_id = wait_until(rt, lambda s, known=known: next((j for j in s.farm.jobs if j not in known), None),
                                f"the {label} job")
            wait_until(rt, lambda s, j=job_id: s.farm.jobs[j].state.finished, f"the {label} job to end")
            path = rt.thread.call(lambda s, j=job_id: str(s.outputs.frame_path(
                j, s.farm.jobs[j].settings.frames[0], s.farm.jobs[j].settings.ext)))
            # The frame reaches the main thread through the queue the timer drains (timers do not fire here).
            image = None
            deadline = time.monotonic() + 30
            while image is None and time.monotonic() < deadline:
                runtime.drain_now()
                image = next((i for i in bpy.data.images if bpy.path.abspath(i.filepath) == path), None)
                time.sleep(0.05)
            info = None
            if image is not None:
                width, height = image.size
                pixels = list(image.pixels)
                centre = [pixels[((height // 2) * width + width // 2) * 4 + c] for c in range(3)]
                info = {"name": image.name, "size": [width, height], "centre": centre, "channels": image.channels}
            results[label] = {"job": rt.thread.call(lambda s, j=job_id: s.farm.jobs[j].view()), "path": path,
                              "image": info, "tiles_left": sorted(p.name for p in Path(path).parent.rglob("tile_*"))}
        rendered_by = rt.thread.call(lambda s: sorted({f.rendered_by for j in s.farm.jobs.values()
                                                       if j.settings and j.settings.tiles for f in j.frames.values()}))
        after = file_state(blend)
        stop_server(rt)
    finally:
        for client in clients:
            client.terminate()
        for client in clients:
            client.wait(timeout=30)
    return {"results": results, "timings": timings, "rendered_by": rendered_by, "before": before, "after": after,
            "frame_current": bpy.context.scene.frame_current}


def animate(frames: int) -> None:
    """Move the plane sideways over the frames, so that frame 1 is all texture and the last half black."""
    plane = bpy.data.objects["Plane"]
    for frame_number, x in ((1, 0.0), (frames, 6.0)):
        plane.location.x = x
        plane.keyframe_insert("location", index=0, frame=frame_number)
    bpy.ops.wm.save_mainfile()


def save_client(rt: Any, work: Path) -> Path:
    """Save Render Client, unzipped as on a render node: the bundle the installed add-on builds from its files."""
    import zipfile
    runtime = addon_module("addon.runtime")
    folder = work / "saved-client"
    assert bpy.ops.microfarm.save_client(directory=str(folder)) == {"FINISHED"}
    deadline = time.monotonic() + 60
    while not (saved := sorted(folder.glob("microfarm-client-*.zip"))) and time.monotonic() < deadline:
        runtime.drain_now()  # a failure arrives as a notice
        assert not (rt.notice and rt.notice.level == "ERROR"), rt.notice.text
        time.sleep(0.05)
    assert saved, f"Save Render Client wrote nothing: {rt.notice.text if rt.notice else None}"
    node = work / "render-node"
    with zipfile.ZipFile(saved[0]) as zf:
        zf.extractall(node)
    return node / "microfarm-client"


def matrix(args: argparse.Namespace) -> dict[str, Any]:
    """The version matrix's path: install and enable the zip, Start Server, Save Render Client, Create Job
    on a saved file whose texture is packed on the way, every frame rendered by this same Blender running
    the saved client."""
    work: Path = args.work
    blend = work / "shot.blend"
    frames = 4
    build_scene(args.texture, frames=frames, relative_to=blend, samples=2)
    animate(frames)
    install(args.zip, enable=True)
    assert ADDON in bpy.context.preferences.addons, "the extension is not enabled"
    # The client package travels in the zip (for the render-client bundle); it imports without bpy work.
    import client
    import client.app
    client_modules = {"client": client.__file__, "render_imported": "client.render" in sys.modules}
    configure(work / "output")
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    before = file_state(blend)
    timings: dict[str, float] = {}
    rt = timed("start_server", timings, start_server)
    bundle = save_client(rt, work)
    proc = start_client(f"127.0.0.1:{rt.address[1]}", work, "matrix-client", bundle)
    try:
        wait_until(rt, lambda s: any(c.connected and c.ready for c in s.farm.clients.values()), "the client")
        bpy.context.scene.microfarm.pack_textures = True
        assert timed("create_job", timings, bpy.ops.microfarm.create_job) == {"FINISHED"}
        job_id = wait_until(rt, lambda s: next(iter(s.farm.jobs), None), "the job on the server")
        wait_until(rt, lambda s: s.farm.jobs[job_id].state.finished, "the job to end")
        job = rt.thread.call(lambda s: s.farm.jobs[job_id].view())
        paths = rt.thread.call(lambda s: [str(s.outputs.frame_path(job_id, n, s.farm.jobs[job_id].settings.ext))
                                          for n in s.farm.jobs[job_id].settings.frames])
        rendered_by = rt.thread.call(lambda s: sorted({f.rendered_by for f in s.farm.jobs[job_id].frames.values()}))
        stored = rt.thread.call(lambda s: s.files.path(s.farm.jobs[job_id].blend_sha256))
        clients = rt.thread.call(lambda s: s.farm.client_views())
        port = stop_server(rt, timings)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "blender": bpy.app.version_string, "python": "{}.{}".format(*sys.version_info[:2]),
        "module_files": module_files(), "client_modules": client_modules, "clients": clients, "bundle": str(bundle),
        "job": job, "frames": paths, "rendered_by": rendered_by, "packed_images": packed_images(stored),
        "before": before, "after": file_state(blend), "timings": timings, "port_free_after_stop": port_free(port),
        "notice": rt.notice.text if rt.notice else None, "notice_level": rt.notice.level if rt.notice else None,
    }


def repo_run(*argv: str, timeout: float = 300) -> str:
    """This stock Blender's Python running a repository tool in another process (this one is the artist's and
    keeps the repository off its path)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "BLENDER_USER_RESOURCES"}
    # A stock Blender has no msgpack: the render-client bundle's pure-Python one, as on a render node.
    vendor = [str(CLIENT_BUNDLE / "vendor")] if CLIENT_BUNDLE is not None else []
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *vendor])
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def drain_until(rt: Any, predicate: Callable[[list[Any]], Any], what: str, timeout: float = WAIT_S) -> list[Any]:
    """Drain the runtime's queues as the timer does (timers do not fire here) until predicate(notices so far)."""
    notices: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notices += rt.drain()[1]
        if predicate(notices):
            return notices
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {[n.text for n in notices]}")


def check_view(check: Any) -> dict[str, Any] | None:
    return None if check is None else {"filepath": check.filepath, "files": check.files, "size": check.size,
                                       "on_farm": check.on_farm, "to_send": check.to_send,
                                       "outside": list(check.outside), "missing": list(check.missing),
                                       "packed": check.packed, "job_id": check.job_id}


def project(args: argparse.Namespace) -> dict[str, Any]:
    """The open file as a project: a folder made by tools.projects (//textures/wood.png on the floor, a collection
    linked from //lib/props.blend with the library's own //tex/marble.png, and a texture at an absolute path outside
    the folder), Pack Textures off, the cube moved and not saved. Check Files, then Create Job; the folder (and the
    outside texture) are moved away before the render client starts, so the farm has only what the add-on sent.
    Then a texture missing: Create Job refuses; with Render With Missing Files the job renders with a warning."""
    work: Path = args.work
    folder, external = work / "project", work / "external"
    repo_run("-m", "tools.projects", str(folder), "--texture", "--library", "--external", str(external))
    blend = folder / "scene.blend"
    install(args.zip, enable=True)
    configure(work / "output")
    runtime = addon_module("addon.runtime")
    bpy.ops.wm.open_mainfile(filepath=str(blend))  # the artist opens the shot and moves the cube, unsaved
    cube = bpy.data.objects["Cube"]
    cube.animation_data_clear()
    cube.location = (0.4, -0.9, 1.4)
    before = file_state(blend)
    # What the farm must match: this same Blender rendering the file as it is in memory (a copy saved elsewhere,
    # its paths remapped to the project), before anything is moved away.
    reference = work / "reference" / "scene.blend"
    reference.parent.mkdir()
    bpy.ops.wm.save_as_mainfile(filepath=str(reference), copy=True, relative_remap=True, check_existing=False)
    local, saved = work / "local", work / "local-saved"
    repo_run("-m", "tools.render_local", str(reference), "1", "2", str(local))
    repo_run("-m", "tools.render_local", str(blend), "1", "2", str(saved))  # the file on disk: without the move
    rt = start_server()
    settings = bpy.context.scene.microfarm
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"before": before, "local": str(local), "local_saved": str(saved),
                              "pack_default": settings.pack_textures}
    clients = []
    try:
        assert timed("check_files", timings, bpy.ops.microfarm.check_files) == {"FINISHED"}
        drain_until(rt, lambda n: rt.check is not None, "Check Files")
        result["check"] = check_view(rt.check)
        result["check_panel"] = draw_panels()
        assert timed("create_job", timings, bpy.ops.microfarm.create_job) == {"FINISHED"}
        job_id = wait_until(rt, lambda s: next(iter(s.farm.jobs), None), "the job on the server")
        drain_until(rt, lambda n: rt.check is not None and rt.check.job_id == job_id, "the job's files")
        result["sent"] = check_view(rt.check)
        result["project"] = rt.thread.call(lambda s: s.farm.jobs[job_id].project.to_wire())
        during = file_state(blend)
        away = {folder: work / "project-away", external: work / "external-away"}
        for there, hidden in away.items():
            there.rename(hidden)  # no client has started yet: none can have read them

        address = f"127.0.0.1:{rt.address[1]}"
        clients.append(start_client(address, work, "project-client"))
        wait_until(rt, lambda s: s.farm.jobs[job_id].state.finished, "the job to end")
        result["job"] = rt.thread.call(lambda s: s.farm.jobs[job_id].view())
        result["frames"] = rt.thread.call(lambda s: [
            str(s.outputs.frame_path(job_id, n, s.farm.jobs[job_id].settings.ext))
            for n in s.farm.jobs[job_id].settings.frames])
        for there, hidden in away.items():
            hidden.rename(there)
        result["during"], result["after"] = during, file_state(blend)

        # The same project again, unchanged: the farm has every file but the new copy of the open file.
        bpy.ops.microfarm.check_files()
        drain_until(rt, lambda n: rt.check is not None and not rt.check.job_id, "the second check")
        result["recheck"] = check_view(rt.check)

        # A texture gone from this disk: refused, naming it, before anything is sent.
        wood = folder / "textures" / "wood.png"
        wood.rename(work / "wood-away.png")
        # What the store holds: its finished files (a copy being saved or traced is written in as ".incoming-…"
        # and removed at the end of its operation, a moment after the panel shows the check).
        def store_files() -> list[str]:
            return rt.thread.call(lambda s: sorted(p.name for p in s.files.root.iterdir()
                                                   if not p.name.startswith(".incoming-")))
        stored = store_files()
        settings.allow_missing = False
        assert timed("create_job_refused", timings, bpy.ops.microfarm.create_job) == {"FINISHED"}
        notices = drain_until(rt, lambda n: any(x.level == "ERROR" for x in n), "the refusal")
        result["refusal"] = [x.text for x in notices if x.level == "ERROR"]
        result["refused_check"] = check_view(rt.check)
        result["refused_panel"] = draw_panels()
        result["jobs_after_refusal"] = rt.thread.call(lambda s: list(s.farm.jobs))
        result["store_unchanged"] = stored == store_files()

        settings.allow_missing = True
        assert timed("create_job_allowed", timings, bpy.ops.microfarm.create_job) == {"FINISHED"}
        allowed = wait_until(rt, lambda s: next((j for j in s.farm.jobs if j != job_id), None), "the allowed job")
        notices = drain_until(rt, lambda n: any(allowed in x.text for x in n), "the allowed job's notice")
        result["allowed_notices"] = [[x.level, x.text] for x in notices]
        wait_until(rt, lambda s: s.farm.jobs[allowed].state.finished, "the allowed job to end")
        result["allowed_job"] = rt.thread.call(lambda s: s.farm.jobs[allowed].view())
        result["allowed_frames"] = rt.thread.call(lambda s: [
            str(s.outputs.frame_path(allowed, n, s.farm.jobs[allowed].settings.ext))
            for n in s.farm.jobs[allowed].settings.frames])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the panel's view arrives through the queue the timer drains
            runtime.drain_now()
            if any(j.get("id") == allowed and j.get("state") == "done" for j in rt.view.jobs):
                break
            rt.wait_view(timeout=max(0.0, deadline - time.monotonic()))
        result["allowed_panel"] = draw_panels()
        (work / "wood-away.png").rename(wood)
        result["final"] = file_state(blend)
        result["timings"] = timings
        stop_server(rt)
    finally:
        for client in clients:
            client.terminate()
            client.wait(timeout=30)
    return result


#: Every kind of file a scene resolves by path (tests/test_project_kinds.py), each in view of the camera.
EVERY_KIND = ("--texture", "--library", "--deep", "--font", "--sequence", "--udim", "--particles", "--script-driver")


def kinds(args: argparse.Namespace) -> dict[str, Any]:
    """The all-kinds project of tools.projects (and a texture at an absolute path outside it) opened as the
    artist's file, Create Job with Needs Scripts on; the folder and the outside texture are moved away before
    a client started with --allow-scripts runs, so the farm has only what the add-on sent."""
    work: Path = args.work
    folder, external = work / "project", work / "external"
    repo_run("-m", "tools.projects", str(folder), *EVERY_KIND, "--external", str(external))
    blend = folder / "scene.blend"
    local = work / "local"
    repo_run("-m", "tools.render_local", str(blend), "1", "2", str(local), "--allow-scripts")
    install(args.zip, enable=True)
    configure(work / "output")
    bpy.ops.wm.open_mainfile(filepath=str(blend))  # the artist opens the shot
    before = file_state(blend)
    rt = start_server()
    settings = bpy.context.scene.microfarm
    settings.needs_scripts = True
    result: dict[str, Any] = {"local": str(local), "before": before}
    client = None
    try:
        assert bpy.ops.microfarm.create_job() == {"FINISHED"}
        notices = drain_until(rt, lambda n: any(x.level in ("ERROR", "WARNING") or "sent to the farm as" in x.text
                                                or "sent to the farm." in x.text for x in n), "the job to be sent")
        result["notices"] = [[x.level, x.text] for x in notices]
        job_id = wait_until(rt, lambda s: next(iter(s.farm.jobs), None), "the job on the server", timeout=10)
        drain_until(rt, lambda n: rt.check is not None and rt.check.job_id == job_id, "the job's files")
        result["sent"] = check_view(rt.check)
        result["project"] = rt.thread.call(lambda s: s.farm.jobs[job_id].project.to_wire())
        result["needs_scripts"] = rt.thread.call(lambda s: s.farm.jobs[job_id].request.needs_scripts)
        away = {folder: work / "project-away", external: work / "external-away"}
        for there, hidden in away.items():
            there.rename(hidden)  # no client has started yet: none can have read them
        client = start_client(f"127.0.0.1:{rt.address[1]}", work, "kinds-client", None, "--allow-scripts")
        wait_until(rt, lambda s: s.farm.jobs[job_id].state.finished, "the job to end")
        result["job"] = rt.thread.call(lambda s: s.farm.jobs[job_id].view())
        result["frames"] = rt.thread.call(lambda s: [
            str(s.outputs.frame_path(job_id, n, s.farm.jobs[job_id].settings.ext))
            for n in s.farm.jobs[job_id].settings.frames])
        for there, hidden in away.items():
            hidden.rename(there)
        result["after"] = file_state(blend)
        result["client_log"] = (work / "kinds-client.log").read_text(errors="replace")
        stop_server(rt)
    finally:
        if client is not None:
            client.terminate()
            client.wait(timeout=30)
    return result


def fetch(url: str) -> str:
    """The first bytes of a page, fetched on a worker thread of this script (as a browser would)."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as response:
        return f"{response.status} {response.read(200).decode(errors='replace')}"


def module_files() -> dict[str, str | None]:
    """Where the add-on's imports came from: the wheels Blender unpacked from the zip, or elsewhere."""
    names = ("protocol", "msgpack", "zeroconf", "ifaddr", "aiohttp", "multidict", "yarl")
    return {name: getattr(sys.modules[name], "__file__", None) for name in names if name in sys.modules}


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def cycle(args: argparse.Namespace) -> dict[str, Any]:
    """enable -> start -> disable, twice (the second time with discovery on 127.0.0.1 and the web
    interface), then enable again: no thread and no port left behind."""
    install(args.zip, enable=False)
    baseline = thread_names()
    rounds = []
    for discovery in (False, True):  # with discovery: zeroconf on 127.0.0.1 only (the bind address)
        bpy.ops.preferences.addon_enable(module=ADDON)
        configure(args.work / "output", discovery=discovery, web=discovery)
        rt = start_server()
        port = rt.address[1]
        web_url = rt.web_url
        web_page = fetch(web_url) if web_url else None
        advertised = False
        deadline = time.monotonic() + 10
        while discovery and not advertised and time.monotonic() < deadline:
            advertised = rt.thread.advertiser is not None  # set by the server loop once it advertises
            time.sleep(0.05)
        running = thread_names()
        runtime = addon_module("addon.runtime")
        bpy.ops.preferences.addon_disable(module=ADDON)
        web_port = int(web_url.rstrip("/").rsplit(":", 1)[1]) if web_url else None
        rounds.append({"discovery": discovery, "advertised": advertised, "running_threads": running,
                       "web_page": web_page, "web_port_free": port_free(web_port) if web_port else None,
                       "threads_after": thread_names(),
                       "port_free": port_free(port), "timer_left": bpy.app.timers.is_registered(runtime._drain_timer),
                       "operator_left": hasattr(bpy.types, "MICROFARM_OT_start_server")})
    bpy.ops.preferences.addon_enable(module=ADDON)
    configure(args.work / "output")
    rt = start_server()
    port = stop_server(rt)
    final = {"port_free_after_stop": port_free(port), "threads_after_stop": thread_names()}
    bpy.ops.preferences.addon_disable(module=ADDON)
    final["threads_after_disable"] = thread_names()
    return {"baseline": baseline, "rounds": rounds, "final": final, "module_files": module_files()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["render", "cycle", "frame", "matrix", "project", "kinds"])
    parser.add_argument("--zip", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--texture", type=Path)
    parser.add_argument("--client-bundle", type=Path, help="start render clients from this render-client bundle")
    args = parser.parse_args()
    global CLIENT_BUNDLE
    CLIENT_BUNDLE = args.client_bundle
    result = {"render": render, "cycle": cycle, "frame": frame, "matrix": matrix,
              "project": project, "kinds": kinds}[args.scenario](args)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    # The add-on's own copy of the client (installed from the zip): bpy 4.x cannot end by itself once the open
    # file had Python drivers (the kinds scenario's does).
    code = main()
    try:
        from client.finish import exit_process  # from the zip, while the add-on is enabled
    except ImportError:
        sys.exit(code)
    exit_process(code)
