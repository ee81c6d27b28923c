"""Never a silent wrong frame (issue 10, item 4): files a scene uses that are not there, and scripts.

The pure parts (what a probe reports, how it is checked, what the scheduler makes of it) are tested
directly; the rest with real bpy clients and project folders made by tools.projects, submitted with
--blend-only: only the .blend travels, so the texture, the library and the font are missing on the
clients by construction.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Clients, connected, repo_env, status_json, submit, watch_until
from conftest import Farm as LiveFarm
from test_mixed_versions import StockClients, stock_python

from protocol.assets import (
    MAX_MISSING_FILES,
    MissingFile,
    log_warnings,
    missing_sentence,
    scripts_sentence,
    sequence_pattern,
    udim_path,
)
from protocol.errors import ProtocolError
from protocol.settings import JobRequest, SceneInfo, SettingsError, resolve, validate_assignment
from server_addon.core.database import Database
from server_addon.core.jobs import Job, JobState, LeaseKind
from server_addon.core.recovery import load_jobs
from server_addon.core.scheduler import Farm
from server_addon.core.storage import OutputStore
from server_addon.web.errors import WebError
from server_addon.web.upload import parse_options
from tools.client_bundle import build_bundle
from tools.projects import FONTS

pytestmark = pytest.mark.unit

SHA = "ab" * 32
#: Only the .blend travels (as to a farm whose clients should see the project on shared storage): the files
#: it uses are missing on the clients by construction, and each client finds and names them.
BLEND_ONLY = "--blend-only"
WOOD = MissingFile("//textures/wood.png", "image", "wood")
PROPS = MissingFile("//lib/props.blend", "library")
#: The font tools.projects puts in a project: a free .ttf of this machine, else Blender's own .woff2.
FONT = "//fonts/title" + next((Path(f).suffix for f in FONTS if Path(f).is_file()), ".woff2")


def scene(**overrides) -> SceneInfo:
    values = dict(scene="Scene", engine="CYCLES", frame_start=1, frame_end=2, frame_step=1, fps=24.0,
                  resolution_x=64, resolution_y=36, percentage=100, file_format="PNG", has_camera=True)
    values.update(overrides)
    return SceneInfo(**values)


# --- what a probe reports -------------------------------------------------------------------

def test_missing_files_are_named_as_the_artist_wrote_them():
    assert WOOD.describe() == '//textures/wood.png (image "wood")'
    assert PROPS.describe() == "//lib/props.blend (library)"
    linked = MissingFile("//tex/metal.png", "image", "metal", library="//lib/props.blend")
    assert linked.describe() == '//tex/metal.png (image "metal" of //lib/props.blend)'
    assert missing_sentence([WOOD, PROPS]) == \
        'missing files: //textures/wood.png (image "wood"), //lib/props.blend (library)'
    assert missing_sentence([WOOD], total=3).endswith("and 2 more")


def test_scene_info_carries_missing_files_and_scripts_and_reads_old_probes():
    info = scene(missing=(WOOD, PROPS), missing_total=2, python_drivers=2, registered_texts=1)
    again = SceneInfo.from_wire(info.to_wire())
    assert again == info
    old = {k: v for k, v in info.to_wire().items()
           if k not in ("missing", "missing_total", "python_drivers", "registered_texts")}
    assert SceneInfo.from_wire(old).missing == ()  # an older client reports nothing missing


@pytest.mark.parametrize("bad", [
    [{"path": "//a.png", "kind": "spell"}],  # an unknown kind
    [{"path": "", "kind": "image"}],  # no path
    [{"path": "//a\nb.png", "kind": "image"}],  # a control character
    [{"path": "//" + "a" * 2000, "kind": "image"}],  # overlong
    [{"path": "//a.png", "kind": "image", "name": 7}],  # not text
    [WOOD.to_wire()] * (MAX_MISSING_FILES + 1),  # too many
    "//a.png",  # not a list
])
def test_a_bad_missing_list_is_refused(bad):
    wire = scene().to_wire()
    wire["missing"] = bad
    with pytest.raises(ProtocolError):
        SceneInfo.from_wire(wire)


def test_request_options_are_true_or_false():
    request = JobRequest.from_wire({"allow_missing": True, "needs_scripts": True})
    assert request.allow_missing and request.needs_scripts
    assert JobRequest.from_wire(request.to_wire()) == request
    assert not JobRequest.from_wire({}).allow_missing
    with pytest.raises(SettingsError, match="allow_missing"):
        JobRequest.from_wire({"allow_missing": "yes"})
    # The assignment tells a client whether it may render where files are missing.
    settings = resolve(request, scene())
    assert validate_assignment(settings.to_assignment()).allow_missing
    assert not validate_assignment({"file_format": "PNG"}).allow_missing
    with pytest.raises(ProtocolError):
        validate_assignment({"file_format": "PNG", "allow_missing": 1})


def test_web_form_fields():
    assert parse_options({"allow_missing": "on", "needs_scripts": "1"}).request.needs_scripts
    assert parse_options({"allow_missing": "on"}).request.allow_missing
    assert not parse_options({}).request.allow_missing
    with pytest.raises(WebError):
        parse_options({"allow_missing": "maybe"})


def test_blender_log_lines_about_missing_files():
    blend_dir = "/home/r/.cache/microfarm/blends"
    text = (f"00:00.337  cycles           | ERROR Image file '{blend_dir}/textures/wood.png' does not exist.\n"
            "Fra:1 Mem:12M | Synchronizing object | Cube\n"
            "00:00.332  geom.vfont       | WARNING Font file doesn't exist: //fonts/title.woff2\n"
            f"00:00.338  cycles           | ERROR Image file '{blend_dir}/textures/wood.png' does not exist.\n"
            "Warning: 1 libraries and 1 linked data-blocks are missing (including 0 ObjectData)\n")
    assert log_warnings(text, blend_dir) == [
        "Image file '//textures/wood.png' does not exist.",
        "Font file doesn't exist: //fonts/title.woff2",
        "Warning: 1 libraries and 1 linked data-blocks are missing (including 0 ObjectData)"]
    assert log_warnings("Fra:1 Mem:12M | Rendered 4/4 Tiles\nSaved: '/tmp/x.png'\n") == []
    # What Cycles says of every UDIM image, its tiles there or not (each tile is checked on its own).
    assert log_warnings(f"ERROR Image file '{blend_dir}/udim/tiles.<UDIM>.png' does not exist.") == []


def test_tiles_sequences_and_script_sentences():
    assert udim_path("//udim/wood.<UDIM>.png", 1002) == "//udim/wood.1002.png"
    assert udim_path("//udim/wood.<UVTILE>.png", 1012) == "//udim/wood.u2_v2.png"
    assert udim_path("//udim/wood.1001.png", 1003) == "//udim/wood.1003.png"  # older files store tile 1001
    pattern = sequence_pattern("flip_0001.png")
    assert pattern is not None and pattern.fullmatch("flip_0107.png") and not pattern.fullmatch("flip_a.png")
    assert scripts_sentence(0, 0) == ""
    assert scripts_sentence(2, 1).startswith(
        "the scene has 2 drivers with Python expressions and a registered text block; clients run with scripts "
        "off: they render without them")
    assert scripts_sentence(1, 2).startswith("the scene has a driver with a Python expression and 2 registered")


def test_status_shows_warnings_in_full():
    from tools.status import render_text
    job = {"id": "shot-1", "name": "shot.blend", "state": "done", "frames_done": 2, "frames_total": 2,
           "warnings": ['missing files: //textures/wood.png (image "wood")', "frame 1: Image file ... does not exist."]}
    text = render_text([job], [])
    assert 'warning: missing files: //textures/wood.png (image "wood") (+1 more)' in text  # the NOTE column
    assert "warning: shot-1: frame 1: Image file ... does not exist." in text


# --- what the scheduler makes of it ---------------------------------------------------------

def probed(request: JobRequest, info: SceneInfo, *clients: tuple[str, bool]) -> tuple[Farm, Job]:
    farm = Farm()
    job = Job(id="shot-1", name="shot.blend", blend_sha256=SHA, blend_size=10, request=request, created=0.0)
    farm.add_job(job)
    for name, scripts in clients or (("a", False),):
        farm.connect_client(name, name, "host", allow_scripts=scripts)
        farm.client_reported(name, "idle", None, None)
    lease = farm.next_work((clients or (("a", False),))[0][0])
    assert lease is not None and lease.kind is LeaseKind.PROBE
    farm.probe_succeeded(lease.id, lease.client_id, info)
    return farm, job


def test_a_job_with_missing_files_fails_naming_them():
    cache = MissingFile(f"//blendcache_{SHA}/", "point_cache", "Smoke")
    farm, job = probed(JobRequest(), scene(missing=(WOOD, PROPS, cache), missing_total=3))
    assert job.state is JobState.FAILED
    assert job.error.startswith('missing files: //textures/wood.png (image "wood"), //lib/props.blend (library), '
                                '//blendcache_shot/ (point cache "Smoke")')  # the cache by the file's own name
    assert "--allow-missing" in job.error


def test_allow_missing_renders_and_carries_the_warning_to_the_end():
    farm, job = probed(JobRequest(allow_missing=True), scene(missing=(WOOD,), missing_total=1))
    assert job.state is JobState.RENDERING
    assert job.warnings == ['missing files: //textures/wood.png (image "wood")']
    lease = farm.next_work("a")
    log_line = "Image file '//textures/wood.png' does not exist."
    farm.frame_stored(job.id, 1, "a", 0.1, lease.id, [job.warnings[0], log_line])
    farm.frame_stored(job.id, 2, "a", 0.1, lease.id, [log_line])  # a line once, at the first frame showing it
    assert job.state is JobState.DONE
    assert job.warnings == ['missing files: //textures/wood.png (image "wood")', f"frame 1: {log_line}"]
    assert job.view()["warnings"] == job.warnings


def test_a_scene_that_needs_scripts_says_so():
    farm, job = probed(JobRequest(), scene(python_drivers=2, registered_texts=1))
    assert job.state is JobState.RENDERING
    assert job.warnings == [scripts_sentence(2, 1)]
    # Asked to, the job goes only to a client that runs scripts: no warning, and a reason while it waits.
    farm = Farm()
    job = Job(id="s-1", name="s.blend", blend_sha256=SHA, blend_size=10, request=JobRequest(needs_scripts=True),
              created=0.0)
    farm.add_job(job)
    farm.connect_client("a", "plain", "host")
    farm.client_reported("a", "idle", None, None)
    assert farm.next_work("a") is None
    farm.note_waiting()
    assert job.waiting == ("waiting for a client started with --allow-scripts (the job needs the scene's scripts); "
                           "connected clients run with scripts off: plain")
    farm.connect_client("b", "scripted", "host", allow_scripts=True)
    farm.client_reported("b", "idle", None, None)
    farm.note_waiting()
    assert job.waiting == ""
    lease = farm.next_work("b")
    assert lease is not None and lease.kind is LeaseKind.PROBE
    farm.probe_succeeded(lease.id, lease.client_id, scene(python_drivers=2, registered_texts=1))
    assert job.warnings == [] and farm.next_work("a") is None and farm.next_work("b") is not None


def test_warnings_and_missing_files_survive_a_restart(tmp_path: Path):
    db = Database(tmp_path / "jobs.sqlite3")
    farm = Farm(store=db)
    farm.connect_client("a", "a", "host")
    farm.client_reported("a", "idle", None, None)
    job = Job(id="w-1", name="w.blend", blend_sha256=SHA, blend_size=1, request=JobRequest(allow_missing=True),
              created=0.0)
    farm.add_job(job)
    farm.probe_succeeded(farm.next_work("a").id, "a", scene(missing=(WOOD,), missing_total=1, python_drivers=1))
    db.close()
    (again,) = load_jobs(Database(tmp_path / "jobs.sqlite3"), OutputStore(tmp_path / "out"))
    assert again.warnings == job.warnings and len(again.warnings) == 2
    assert again.scene.missing == (WOOD,) and again.request.allow_missing


# --- real clients, real files -----------------------------------------------------------------

@pytest.fixture(scope="session")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """projects(*flags) -> the .blend of a project folder made by tools.projects with those flags."""
    root = tmp_path_factory.mktemp("projects")
    made: dict[tuple[str, ...], Path] = {}

    def get(*flags: str) -> Path:
        if flags not in made:
            out = root / f"p{len(made)}"
            done = subprocess.run([sys.executable, "-m", "tools.projects", str(out), *flags], cwd=REPO,
                                  env=repo_env(), capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            made[flags] = out / "scene.blend"
        return made[flags]
    return get


def test_missing_texture_library_and_font_fail_the_job_unless_allowed(
        farm: LiveFarm, clients: Clients, projects: Callable[..., Path], tmp_path: Path):
    blend = projects("--texture", "--library", "--font", "--sequence", "--udim")
    clients.start("c1", farm.address)
    farm.wait_until(connected(1), timeout=60)
    refused = submit(farm, blend, BLEND_ONLY, timeout=90)
    assert refused.returncode == 1, refused.stderr
    assert "missing files: " in refused.stderr
    for name in ('//textures/wood.png (image "wood")', "//lib/props.blend (library)", f"{FONT} (font",
                 '//seq/flip_0001.png (image sequence "flip")', '//textures/tiles.1001.png (UDIM image "tiles")',
                 '//textures/tiles.1002.png (UDIM image "tiles")'):
        assert name in refused.stderr
    assert "blends/" not in refused.stderr  # never by the client's cache path

    allowed = submit(farm, blend, BLEND_ONLY, "--allow-missing", timeout=90)
    assert allowed.returncode == 0, allowed.stderr
    job_id = allowed.stdout.split()[0]
    assert (farm.output / job_id / "frame_0001.png").is_file() and (farm.output / job_id / "frame_0002.png").is_file()
    (job,) = [j for j in status_json(farm.address)["jobs"] if j["id"] == job_id]
    assert job["state"] == "done" and job["allow_missing"]
    assert job["warnings"][0].startswith("missing files: ")
    assert '//textures/wood.png (image "wood")' in job["warnings"][0]
    # Blender's own words while it rendered count too, with the client's folder shown as the artist's '//'.
    assert "frame 1: Image file '//textures/wood.png' does not exist." in job["warnings"]
    assert f"warning: job {job_id}: missing files: " in allowed.stderr


def test_a_packed_texture_raises_no_alarm(farm: LiveFarm, clients: Clients, projects: Callable[..., Path]):
    blend = projects("--texture", "--pack")
    clients.start("c1", farm.address)
    farm.wait_until(connected(1), timeout=60)
    done = submit(farm, blend, BLEND_ONLY, timeout=90)
    assert done.returncode == 0, done.stderr
    job = farm.job(done.stdout.split()[0])
    assert job["state"] == "done" and job["warnings"] == [] and "warning" not in done.stderr


def test_scripts_warning_and_needs_scripts(farm: LiveFarm, clients: Clients, projects: Callable[..., Path]):
    blend = projects("--drivers", "2", "--text")
    clients.start("plain", farm.address)
    farm.wait_until(connected(1), timeout=60)
    done = submit(farm, blend, "--frame", "1", timeout=90)
    assert done.returncode == 0, done.stderr
    warnings = farm.job(done.stdout.split()[0])["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith(
        "the scene has 2 drivers with Python expressions and a registered text block; clients run with scripts off")

    queued = submit(farm, blend, "--frame", "1", "--needs-scripts", wait=False, timeout=60)
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.split()[0]
    farm.wait_until(lambda s: "--allow-scripts" in s.farm.jobs[job_id].waiting, timeout=30, what="the waiting reason")
    job = farm.job(job_id)
    assert job["state"] == "probing" and job["frames_done"] == 0
    assert "connected clients run with scripts off: plain" in job["waiting"]

    clients.start("scripted", farm.address, "--allow-scripts")
    job = watch_until(farm.address, job_id, lambda j: j["state"] in ("done", "failed"), timeout=60)
    assert job["state"] == "done" and job["warnings"] == [], job
    assert farm.call(lambda s: [f.rendered_by for f in s.farm.jobs[job_id].frames.values()]) == ["scripted"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.mark.e2e
@pytest.mark.bpy
@pytest.mark.matrix
@pytest.mark.parametrize("line", ["4.2", "5.3"])
def test_stock_clients_name_missing_files(line: str, farm: LiveFarm, bundle: Path, tmp_path: Path):
    """The oldest and the newest Blender the farm supports find the same files missing, from the bundle."""
    python = stock_python(line)
    env = {**repo_env(), "PYTHONPATH": str(REPO)}  # tools.projects needs only bpy and the standard library
    made = subprocess.run([str(python), "-m", "tools.projects", str(tmp_path / "project"), "--texture", "--library",
                           "--font", "--drivers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    blend = tmp_path / "project" / "scene.blend"
    assert blend.is_file(), made.stderr
    stock = StockClients(tmp_path, bundle)
    try:
        stock.start(line, f"stock-{line}", farm.address)
        farm.wait_until(connected(1), timeout=60)
        refused = submit(farm, blend, BLEND_ONLY, timeout=90)
        assert refused.returncode == 1, refused.stderr
        for name in ('//textures/wood.png (image "wood")', "//lib/props.blend (library)", f"{FONT} (font"):
            assert name in refused.stderr
        allowed = submit(farm, blend, BLEND_ONLY, "--frame", "1", "--allow-missing", timeout=90)
        assert allowed.returncode == 0, allowed.stderr
        warnings = farm.job(allowed.stdout.split()[0])["warnings"]
        assert warnings[0].startswith("missing files: ")
        assert any(w.startswith("the scene has a driver with a Python expression") for w in warnings)
    finally:
        stock.stop()
