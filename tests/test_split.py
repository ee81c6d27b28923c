"""Split-frame rendering: the band rule, the scheduler's tiles, the lossless stitch, and real renders."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import REPO, Clients, Farm, connected, repo_env, submit
from PIL import Image, ImageChops, ImageStat

from protocol.errors import ProtocolError
from protocol.settings import JobRequest, SceneInfo, SettingsError, resolve, validate_assignment
from protocol.tiles import TileSpec
from server_addon.core import exrfile, pngfile
from server_addon.core.database import Database
from server_addon.core.jobs import FrameRecord, FrameState, Job, JobState
from server_addon.core.recovery import load_jobs
from server_addon.core.scheduler import Farm as Scheduler
from server_addon.core.stitch import StitchError, _ffmpeg_jpeg, stitch
from server_addon.core.storage import OutputStore, UnsafeName, tile_name

pytestmark = pytest.mark.unit

SCENE = SceneInfo(scene="S", engine="CYCLES", frame_start=1, frame_end=10, frame_step=1, fps=24.0,
                  resolution_x=64, resolution_y=36, percentage=100, file_format="PNG")


def _f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


# --- the band rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("height", [2, 3, 7, 36, 37, 99, 360, 1080, 1081, 2160, 4321])
@pytest.mark.parametrize("tiles", [2, 3, 4, 7, 16])
def test_bands_cover_every_row_once_and_borders_truncate_to_them(height: int, tiles: int) -> None:
    if tiles > height:
        return
    for margin in (0, 2, 32):
        spec = TileSpec(frame=1, tiles=tiles, height=height, margin=margin)
        rows = [row for i in range(tiles) for row in range(*spec.band(i))]
        assert rows == list(range(height)), "no gap, no overlap, top to bottom"
        for i in range(tiles):
            top, bottom = spec.render_rows(i)
            low, high = spec.border(i)
            # What Blender does with the border: float32 fraction times the height, truncated.
            first = int(_f32(_f32(low) * height))
            last = int(_f32(_f32(high) * height))
            assert (height - last, height - first) == (top, bottom), (height, tiles, margin, i)
            assert top <= spec.band(i)[0] and spec.band(i)[1] <= bottom


def test_the_naive_border_would_lose_a_row() -> None:
    # Why TileSpec.border sets the border half a row out: 24/37 in float32 times 37 truncates to 23.
    assert int(_f32(_f32(24 / 37) * 37)) == 23


def test_split_requests_resolve_to_tiles_of_one_frame() -> None:
    request = JobRequest.from_wire({"frame_start": 5, "frame_end": 5, "split": 4})
    settings = resolve(request, SCENE)
    assert settings.frames == (5,) and settings.items == (0, 1, 2, 3) and settings.chunk == 1
    assert settings.split == TileSpec(frame=5, tiles=4, height=36, margin=0)
    assert settings.tile_ext == "png" and settings.ext == "png"
    auto = resolve(JobRequest(frame_start=5, frame_end=5, split=0), SCENE, auto_tiles=3)
    assert auto.tiles == 3
    assert resolve(JobRequest(frame_start=5, frame_end=5, split=500), SCENE).tiles == 36, "at most one per row"
    exr = resolve(JobRequest(frame_start=5, frame_end=5, split=2, file_format="OPEN_EXR"),
                  dataclasses.replace(SCENE, split_margin=32))
    assert exr.tile_ext == "exr" and exr.margin == 32
    wire = validate_assignment(exr.to_assignment())
    assert wire.split == TileSpec(frame=5, tiles=2, height=36, margin=32)
    with pytest.raises(SettingsError, match="one frame"):
        resolve(JobRequest(frame_start=1, frame_end=3, split=2), SCENE)
    with pytest.raises(SettingsError, match="stitched into"):
        resolve(JobRequest(frame_start=1, frame_end=1, split=2, file_format="TIFF"), SCENE)
    with pytest.raises(SettingsError):
        JobRequest.from_wire({"split": 1})
    with pytest.raises(SettingsError):
        JobRequest.from_wire({"split": -1})
    with pytest.raises(ProtocolError):
        validate_assignment({"file_format": "PNG", "split": {"frame": 1, "tiles": 40, "height": 36, "margin": 0}})
    with pytest.raises(ProtocolError):
        validate_assignment({"file_format": "TIFF", "split": {"frame": 1, "tiles": 2, "height": 36, "margin": 0}})


# --- the scheduler -----------------------------------------------------------------------------------

def _farm_with_clients(*names: str) -> Scheduler:
    farm = Scheduler(clock=lambda: 0.0)
    for name in names:
        farm.connect_client(name, name, "host")
        farm.clients[name].ready = True
    return farm


def _split_job(farm: Scheduler, split: int, job_id: str = "j") -> Job:
    job = Job(id=job_id, name="j.blend", blend_sha256="0" * 64, blend_size=1,
              request=JobRequest(frame_start=3, frame_end=3, split=split), created=0.0)
    farm.add_job(job)
    lease = farm.next_work(next(iter(farm.clients)))
    farm.probe_succeeded(lease.id, lease.client_id, SCENE)
    return job


def _render_all(farm: Scheduler, job_id: str, client: str) -> None:
    """The client renders every tile it is leased of the job (a tile counts only from a client leased it)."""
    while (lease := farm.next_work(client)) is not None:
        for tile in lease.frames:
            assert farm.frame_stored(job_id, tile, client, 1.0, lease.id)
        farm.lease_done(lease.id, client)


def test_tiles_are_leased_like_frames_and_the_job_waits_for_its_stitch() -> None:
    farm = _farm_with_clients("a", "b")
    job = _split_job(farm, 4)
    assert job.request.split == 4 and list(job.frames) == [0, 1, 2, 3]
    first, second = farm.next_work("a"), farm.next_work("b")
    assert (first.frames, second.frames) == ([0], [1]), "one tile per lease, each to another client"
    farm.disconnect_client("b")  # a lost tile goes back to the pool
    assert job.frames[1].state is FrameState.PENDING
    assert farm.frame_stored("j", 0, "a", 1.0, first.id)
    farm.lease_done(first.id, "a")
    _render_all(farm, "j", "a")
    assert job.frames_done == 4
    assert job.state is JobState.RENDERING and job.stitch_due, "not done before the frame is stitched"
    farm.stitch_done("j")
    assert job.state is JobState.DONE and job.stitched and not job.stitch_due

    failing = _split_job(farm, 2, "k")
    _render_all(farm, "k", "a")
    farm.stitch_failed("k", "tile 1 is not a usable PNG")
    assert failing.state is JobState.FAILED and "could not be stitched into frame 3" in failing.error


def test_auto_tiles_follow_clients_and_their_speed() -> None:
    assert _split_job(_farm_with_clients("a", "b"), 0).settings.tiles == 2, "two equal clients: two tiles"
    assert _split_job(_farm_with_clients("solo"), 0).settings.tiles == 2, "never fewer than two tiles"
    farm = _farm_with_clients("a", "b")
    # On another job b delivered its frames three times as fast as a: it counts three times.
    measured = Job(id="m", name="m", blend_sha256="0" * 64, blend_size=1, request=JobRequest(), created=0.0)
    measured.settings = resolve(JobRequest(frame_start=1, frame_end=4), SCENE)
    measured.frames = {n: FrameRecord(n, state=FrameState.DONE, rendered_by="a" if n < 3 else "b",
                                      render_s=3.0 if n < 3 else 1.0) for n in range(1, 5)}
    measured.state = JobState.DONE
    farm.jobs["m"] = measured
    speeds = farm.client_speeds()
    assert speeds["b"] == pytest.approx(3 * speeds["a"])
    assert _split_job(farm, 0).settings.tiles == 4
    farm.connect_client("c", "c", "host")  # unmeasured: counts at the median speed of the others
    farm.clients["c"].ready = True
    median = (speeds["a"] + speeds["b"]) / 2
    assert farm.auto_tiles(measured) == round((speeds["a"] + speeds["b"] + median) / speeds["a"])
    farm.clients["c"].connected = False  # gone: not counted
    assert farm.auto_tiles(measured) == 4
    for i in range(10):  # at most four tiles per client
        farm.connect_client(f"slow{i}", f"slow{i}", "host")
        farm.clients[f"slow{i}"].ready = True
        measured.frames[100 + i] = FrameRecord(100 + i, state=FrameState.DONE, rendered_by=f"slow{i}", render_s=300.0)
    assert farm.auto_tiles(measured) == 4 * 12


def test_a_restart_rebuilds_the_tiles_from_disk(tmp_path: Path) -> None:
    outputs = OutputStore(tmp_path / "out")
    db = Database(tmp_path / "jobs.sqlite3")
    farm = Scheduler(store=db)
    for name in "abc":
        farm.connect_client(name, name, "h")
        farm.clients[name].ready = True
    job = _split_job(farm, 0)  # auto: the count it resolved to (three clients: 3) is what is stored
    tiles = job.settings.tiles
    assert tiles == 3
    lease = farm.next_work("a")
    assert lease.frames == [0] and farm.frame_stored("j", 0, "a", 1.0, lease.id)
    tile = outputs.tile_path("j", 3, 0, "png")
    tile.parent.mkdir(parents=True)
    tile.write_bytes(b"x")
    (outputs.tiles_dir("j") / tile_name(3, 1, "png")).write_bytes(b"x")  # stored, the server died before saving
    db.close()

    (restored,) = load_jobs(Database(tmp_path / "jobs.sqlite3"), outputs)
    assert restored.request.split == tiles and restored.settings.tiles == tiles
    assert [f.state for f in restored.frames.values()][:3] == [FrameState.DONE, FrameState.DONE, FrameState.PENDING]
    assert not restored.stitched
    outputs.frame_path("j", 3, "png").write_bytes(b"x")
    (again,) = load_jobs(Database(tmp_path / "jobs.sqlite3"), outputs)
    assert again.stitched
    with pytest.raises(UnsafeName):
        tile_name(1, 0, "py")


# --- the codecs and the stitch -------------------------------------------------------------------------

def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16"])
def test_png_codec_reads_every_filter_and_writes_losslessly(tmp_path: Path, mode: str) -> None:
    size = (37, 23)
    source = Image.frombytes("RGBA", size, os.urandom(size[0] * size[1] * 4)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        source = Image.frombytes("I;16", size, os.urandom(size[0] * size[1] * 2))
    path = tmp_path / "in.png"
    path.write_bytes(_png_bytes(source))
    image = pngfile.read(path)
    if mode == "RGBA":  # noise makes Pillow's encoder use several filters
        assert len({image.data[y * (image.stride + 1)] for y in range(image.height)}) >= 2
    rows = image.rows(0, image.height)
    assert b"".join(image.rows(5, 9)) == b"".join(rows[5:9])
    pngfile.write(tmp_path / "out.png", image, rows, image.height)
    again = Image.open(tmp_path / "out.png")
    assert again.mode == source.mode
    assert again.tobytes() == source.tobytes()


def _png16(path: Path, width: int, rows: list[list[int]], channels: int = 4) -> None:
    """A 16-bit PNG (Pillow cannot write RGBA16), each row filtered with None."""
    raw = b"".join(b"\x00" + struct.pack(f">{width * channels}H", *row) for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, len(rows), 16, 6 if channels == 4 else 2, 0, 0, 0)
    idat = zlib.compress(raw)
    path.write_bytes(pngfile.SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_stitch_keeps_only_each_band_from_canvas_or_cropped_tiles(tmp_path: Path) -> None:
    spec = TileSpec(frame=1, tiles=3, height=10, margin=2)
    width = 3
    full = [[(y * 1000 + x) % 65536 for x in range(width * 4)] for y in range(10)]
    paths = []
    for i in range(3):
        first, last = spec.render_rows(i)
        if i == 1:  # a cropped tile: only the rows it rendered
            rows = full[first:last]
        else:  # the whole canvas, garbage outside what was rendered
            rows = [full[y] if first <= y < last else [7] * (width * 4) for y in range(10)]
        paths.append(tmp_path / f"t{i}.png")
        _png16(paths[-1], width, rows)
    stitch(spec, paths, tmp_path / "frame.png", "PNG")
    image = pngfile.read(tmp_path / "frame.png")
    assert (image.width, image.height, image.depth, image.color_type) == (3, 10, 16, 6)
    assert [list(struct.unpack(">12H", row)) for row in image.rows(0, 10)] == full
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no partial file left"

    _png16(paths[2], width, full[:5])  # a tile of the wrong height
    with pytest.raises(StitchError, match="tile 2"):
        stitch(spec, paths, tmp_path / "frame.png", "PNG")
    paths[0].write_bytes(b"not a png")
    with pytest.raises(StitchError, match="tile 0 .* not a usable PNG"):
        stitch(spec, paths, tmp_path / "frame.png", "PNG")


@pytest.mark.integration
@pytest.mark.ffmpeg
def test_jpeg_without_pillow_is_encoded_by_ffmpeg(tmp_path: Path) -> None:
    pixels = bytes(range(256)) * (48 * 32 * 3 // 256)
    _ffmpeg_jpeg(tmp_path / "f.jpg", 48, 32, "RGB", pixels, 90)
    with Image.open(tmp_path / "f.jpg") as image:
        assert image.format == "JPEG" and image.size == (48, 32)


# --- real renders ------------------------------------------------------------------------------------

def render_reference(blend: Path, frame: int, out: Path, file_format: str) -> Path:
    """The same frame rendered whole in one plain bpy process."""
    result = subprocess.run([sys.executable, "-m", "tools.render_local", str(blend), str(frame), str(frame), str(out),
                             "--format", file_format], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob(f"frame_{frame:04d}.*")
    return path


def floats(path: Path) -> list[float]:
    """An EXR's pixels as 32-bit floats (G, B, R, A planes), decoded by ffmpeg."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "gbrapf32le", "-"],
                         capture_output=True, check=True, timeout=60).stdout
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def assert_same_image(got: Path, want: Path, spec: TileSpec, tolerance: int, seam_tolerance: int | None = None) -> None:
    """Same size and mode; every pixel within `tolerance` levels, and the rows at each seam within
    `seam_tolerance` (default: the same)."""
    a, b = Image.open(got), Image.open(want)
    assert (a.format, a.mode, a.size) == (b.format, b.mode, b.size)
    diff = ImageChops.difference(a.convert("RGBA"), b.convert("RGBA"))
    assert max(hi for _, hi in diff.getextrema()) <= tolerance, diff.getextrema()
    for i in range(1, spec.tiles):
        seam = spec.band(i)[0]
        rows = diff.crop((0, seam - 1, a.size[0], seam + 1))
        limit = tolerance if seam_tolerance is None else seam_tolerance
        assert max(hi for _, hi in rows.getextrema()) <= limit, f"seam at row {seam}: {rows.getextrema()}"
    assert ImageStat.Stat(diff).mean[0] <= max(0.5, tolerance / 4)


@pytest.mark.ffmpeg
def test_split_frame_matches_a_single_machine_render(farm: Farm, clients: Clients, scenes, tmp_path: Path) -> None:
    blend = scenes("split-alpha", "--frames", "6", "--size", "96x54", "--samples", "16", "--film-transparent")
    clients.start("left", farm.address)
    clients.start("right", farm.address)
    farm.wait_until(connected(2), what="two clients")
    spec = TileSpec(frame=4, tiles=4, height=54, margin=2)  # margin 2: Cycles' adaptive sampling is on
    for file_format in ("PNG", "OPEN_EXR", "JPEG"):
        result = submit(farm, blend, "--frame", "4", "--split", "4", "--format", file_format)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip()
        job = farm.job(job_id)
        assert (job["state"], job["tiles"], job["frames_done"], job["frame_range"]) == ("done", 4, 4, [4, 4])
        job_dir = farm.output / job_id
        ext = {"PNG": "png", "OPEN_EXR": "exr", "JPEG": "jpg"}[file_format]
        assert sorted(p.name for p in job_dir.iterdir()) == [f"frame_0004.{ext}"], "one frame; the tiles are gone"
        rendered_by = farm.call(lambda s, j=job_id: {f.rendered_by for f in s.farm.jobs[j].frames.values()})
        assert rendered_by == {"left", "right"}, "both clients rendered tiles"
        reference = render_reference(blend, 4, tmp_path / f"ref-{ext}", file_format)
        stitched = job_dir / f"frame_0004.{ext}"
        if file_format == "PNG":
            assert Image.open(stitched).mode == "RGBA"
            alpha = Image.open(stitched).getchannel("A").getextrema()
            assert alpha[0] == 0 and alpha[1] == 255, "transparent background, opaque cube and floor"
            assert_same_image(stitched, reference, spec, tolerance=2)
        elif file_format == "JPEG":  # encoded once from the stitched pixels: only the encoders differ
            assert_same_image(stitched, reference, spec, tolerance=12)
        else:
            got, want = floats(stitched), floats(reference)
            assert len(got) == len(want) == 96 * 54 * 4
            assert max(abs(x - y) for x, y in zip(got, want, strict=True)) <= 1e-3
            ours, theirs = exrfile.read_header(stitched), exrfile.read_header(reference)
            assert ours["channels"] == theirs["channels"], "the same channels, half or float as rendered"
            assert ours["compression"] == theirs["compression"], "the scene's codec (ZIP)"


def test_a_denoised_frame_is_split_with_a_margin(farm: Farm, clients: Clients, scenes, tmp_path: Path) -> None:
    blend = scenes("split-denoise", "--frames", "2", "--size", "96x80", "--samples", "8", "--denoise")
    clients.start("one", farm.address)
    clients.start("two", farm.address)
    farm.wait_until(connected(2), what="two clients")
    result = submit(farm, blend, "--frame", "1", "--split", "4")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    spec = farm.call(lambda s: s.farm.jobs[job_id].settings.split)
    assert spec == TileSpec(frame=1, tiles=4, height=80, margin=32), "the client asked for the denoiser's margin"
    reference = render_reference(blend, 1, tmp_path / "ref", "PNG")
    # Each band was denoised with 32 rows of its neighbours around it: no seam (the rows at each band edge
    # within 3 levels of 255). The denoiser sees a smaller image than in a full render, so pixels far from
    # any seam (at the image's own top edge, say) may move by a few levels too.
    assert_same_image(farm.output / job_id / "frame_0001.png", reference, spec, tolerance=10, seam_tolerance=3)


def test_frame_option_renders_exactly_that_frame(farm: Farm, clients: Clients, animation: Path) -> None:
    clients.start("solo", farm.address)
    farm.wait_until(connected(1), what="a client")
    result = submit(farm, animation, "--frame", "5")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert sorted(p.name for p in (farm.output / job_id).iterdir()) == ["frame_0005.png"]
    job = farm.job(job_id)
    assert job["frame_range"] == [5, 5] and job["frames_total"] == 1 and job["tiles"] == 0
    bad = submit(farm, animation, "--frames", "1-3", "--split", "2", wait=False)
    assert bad.returncode != 0 and "--frame N" in bad.stderr


def test_a_client_killed_mid_tile_still_gives_the_whole_frame(farm: Farm, clients: Clients, scenes,
                                                              tmp_path: Path) -> None:
    import signal
    # Every sample rendered (no adaptive sampling): a tile takes seconds, so the kill lands while it renders.
    blend = scenes("split-slow", "--frames", "2", "--size", "96x54", "--samples", "1500", "--no-adaptive-sampling")
    clients.start("victim", farm.address)
    farm.wait_until(connected(1), what="the victim")
    clients.start("survivor", farm.address)
    farm.wait_until(connected(2), what="two clients")
    result = submit(farm, blend, "--frame", "1", "--split", "4", wait=False)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()

    def victim_rendering(s):  # the victim reported that it is rendering a tile it holds
        victim = next(c for c in s.farm.clients.values() if c.name == "victim")
        lease = s.farm.leases.get(victim.lease_id) if victim.lease_id else None
        job = s.farm.jobs.get(job_id)
        if lease is None or victim.frame is None or job is None or not job.settings:
            return None
        return victim.frame if job.frames[victim.frame].state is FrameState.LEASED else None

    tile = farm.wait_until(victim_rendering, timeout=120, what="the victim rendering a tile")
    clients.kill("victim", signal.SIGKILL)
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.finished, timeout=240, what="the job to end")
    job = farm.job(job_id)
    assert job["state"] == "done", job
    rendered_by = farm.call(lambda s: {n: f.rendered_by for n, f in s.farm.jobs[job_id].frames.items()})
    assert rendered_by[tile] == "survivor", "the victim's tile was rendered again elsewhere"
    assert f"tile {tile} of 4 of frame 1 rendered" not in clients.log("victim"), "the kill came mid-render"
    assert farm.call(lambda s: s.stats.duplicate_frames) == 0
    stitched = farm.output / job_id / "frame_0001.png"
    reference = render_reference(blend, 1, tmp_path / "ref", "PNG")
    assert_same_image(stitched, reference, TileSpec(frame=1, tiles=4, height=54, margin=0), tolerance=2)
