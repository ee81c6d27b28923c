"""The web page in real headless Chromium (Debian's, driven by Playwright), with real render clients."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Clients, Farm, connected, repo_env
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from web_support import Http, launch_chromium, start_web_on, stop_web

from server_addon.web import WebServer

pytestmark = pytest.mark.e2e

SECRET = "open sesame"
#: Long enough for the page to show a few steps of progress, short enough for the suite (about 3 s).
WATCHED_SCENE = ("web12", "--frames", "12", "--size", "64x36", "--samples", "64")
#: The slow scene of test_job_control (generated once per session): still rendering when cancelled.
SLOW_SCENE = ("anim24", "--frames", "24", "--size", "64x36", "--samples", "48")
RENDER_TIMEOUT_MS = 120_000

#: Notes every value a job card's progress bar takes, with the list the card is in and its meta line.
WATCH_PROGRESS = """() => {
  window.progressSeen = {};
  const observer = new MutationObserver((records) => {
    for (const record of records) {
      const card = record.target.closest("article.job");
      if (!card || !record.target.classList.contains("bar")) continue;
      (window.progressSeen[card.dataset.jobId] ||= []).push([
        card.parentElement.id, Number(record.target.getAttribute("aria-valuenow")),
        card.querySelector(".meta").textContent]);
    }
  });
  observer.observe(document.querySelector(".jobs"), { subtree: true, attributes: true,
                                                     attributeFilter: ["aria-valuenow"] });
}"""

#: A DataTransfer holding one file, as a drag from the desktop brings it.
DATA_TRANSFER = """([name, data]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type: "application/octet-stream" }));
  return transfer;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1360, "height": 960})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    # Failed loads (the 401 of a wrong secret) are checked where they matter; anything else is a problem.
    page.on("console", lambda message: problems.append(f"console: {message.text}")
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    yield page
    context.close()
    assert not problems, problems  # script errors and Content-Security-Policy violations fail the test


@pytest.fixture
def web(farm: Farm) -> Iterator[WebServer]:
    server = start_web_on(farm)
    yield server
    stop_web(farm, server)


def open_page(page: Page, web: WebServer) -> None:
    page.goto(web.url)
    expect(page.locator("#connection")).to_have_text("live")


def card_in(page: Page, group: str, job_id: str) -> Any:
    return page.locator(f'#jobs-{group} article.job[data-job-id="{job_id}"]')


@pytest.mark.ffmpeg
def test_upload_watch_render_and_download(farm: Farm, clients: Clients, scenes: Callable[..., Path], page: Page,
                                          web: WebServer, tmp_path: Path) -> None:
    blend = scenes(*WATCHED_SCENE)
    clients.start("alpha", farm.address)
    clients.start("beta", farm.address)
    open_page(page, web)
    farm.wait_until(connected(2), what="two clients")
    expect(page.locator("#clients-table tbody tr")).to_have_count(2)
    page.evaluate(WATCH_PROGRESS)

    page.set_input_files("#blend-file", str(blend))
    expect(page.locator("#file-name")).to_contain_text("web12.blend")
    page.fill("input[name=chunk]", "1")
    page.select_option("select[name=video]", "h264")
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("created", timeout=30_000)
    expect(page.locator("#upload-progress .bar")).to_have_attribute("aria-valuenow", "100")
    job_id = re.search(r"Job (\S+) created", page.inner_text("#upload-status")).group(1)

    page.wait_for_function("id => (window.progressSeen[id] || []).some(([, value]) => value > 0)", arg=job_id,
                           timeout=RENDER_TIMEOUT_MS)
    page.screenshot(path=tmp_path / "page-rendering.png", full_page=True)
    done = card_in(page, "completed", job_id)
    expect(done).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(done.locator(".bar")).to_have_attribute("aria-valuenow", "100")
    expect(done.locator(".frames")).to_have_text("12 / 12 frames")
    expect(done.locator(".badge")).to_have_text("done")

    seen = page.evaluate("id => window.progressSeen[id]", job_id)
    values = [value for _, value, _ in seen]
    assert values == sorted(values) and values[-1] == 100, seen
    live = {value for group, value, _ in seen if group == "jobs-active" and 0 < value < 100}
    assert live, f"the active list never showed the job part-way: {seen}"
    assert any("ETA" in meta for group, _, meta in seen if group == "jobs-active"), seen

    # The thumbnail is the last frame, loaded.
    thumbnail = done.locator("img.thumb-img")
    expect(thumbnail).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    assert thumbnail.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 36]
    assert thumbnail.get_attribute("src").endswith("frame=12")

    # The MP4 asked for at upload plays in the page.
    video = done.locator("video.player")
    expect(video).to_be_visible(timeout=60_000)
    page.wait_for_function("v => v.readyState >= 1 && v.duration > 0", arg=video.element_handle(), timeout=30_000)
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [64, 36]
    assert abs(video.evaluate("v => v.duration") - 12 / 24) < 0.05
    video.evaluate("v => { v.muted = true; return v.play(); }")
    page.wait_for_function("v => v.ended", arg=video.element_handle(), timeout=30_000)  # decoded to the end

    # Files: one frame and the whole job, downloaded through the page.
    job_dir = farm.output / job_id
    on_disk = sorted(p.name for p in job_dir.iterdir())
    assert on_disk == [f"frame_{n:04d}.png" for n in range(1, 13)] + [f"{job_id}.mp4"]
    done.locator("button[data-action=files]").click()
    expect(page.locator("#files-table tbody tr")).to_have_count(13)
    expect(page.locator("#files-summary")).to_contain_text("13 files")
    with page.expect_download() as download:
        page.locator('#files-table tr[data-name="frame_0012.png"] a.button').click()
    assert download.value.suggested_filename == "frame_0012.png"
    frame = tmp_path / "downloaded-frame.png"
    download.value.save_as(frame)
    assert frame.read_bytes() == (job_dir / "frame_0012.png").read_bytes()
    with Image.open(frame) as image:
        assert image.format == "PNG" and image.size == (64, 36)

    with page.expect_download() as download:
        page.click("#files-zip")
    assert download.value.suggested_filename == f"{job_id}.zip"
    archive_path = tmp_path / "downloaded.zip"
    download.value.save_as(archive_path)
    with zipfile.ZipFile(archive_path) as archive:
        assert archive.testzip() is None
        assert sorted(Path(name).name for name in archive.namelist()) == on_disk
        assert all(name.startswith(f"{job_id}/") for name in archive.namelist())
        for name in on_disk:
            assert archive.read(f"{job_id}/{name}") == (job_dir / name).read_bytes(), name
    page.screenshot(path=tmp_path / "page-done.png", full_page=True)


def test_drop_a_blend_on_the_page(farm: Farm, animation: Path, page: Page, web: WebServer) -> None:
    open_page(page, web)
    data = base64.b64encode(animation.read_bytes()).decode()
    transfer = page.evaluate_handle(DATA_TRANSFER, ["dropped.blend", data])
    page.dispatch_event("#drop-zone", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#drop-zone")).to_have_class(re.compile(r"\bdragging\b"))
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#file-name")).to_contain_text("dropped.blend")
    page.check("input[name=start][value='0']")  # queue it
    page.fill("input[name=priority]", "3")
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("created")
    job_id = re.search(r"Job (\S+) created", page.inner_text("#upload-status")).group(1)
    queued = card_in(page, "queued", job_id)
    expect(queued.locator(".job-name")).to_have_text("dropped.blend")
    expect(queued.locator("button[data-action=resume]")).to_have_text("Start")
    job = farm.job(job_id)
    assert job["state"] == "queued" and job["priority"] == 3
    sha = farm.call(lambda s: s.farm.jobs[job_id].blend_sha256)
    assert sha == hashlib.sha256(animation.read_bytes()).hexdigest()


def test_cancelled_job_leaves_the_active_list_live(farm: Farm, clients: Clients, scenes: Callable[..., Path],
                                                   page: Page, web: WebServer) -> None:
    blend = scenes(*SLOW_SCENE)
    clients.start("worker", farm.address)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    open_page(page, web)
    reply = Http(web.port).upload(blend.read_bytes(), filename="slow.blend", chunk="1")
    assert reply.status == 201, reply.body
    job_id = reply.json()["id"]
    active = card_in(page, "active", job_id)
    expect(active).to_be_visible()
    page.wait_for_function(
        "id => Number(document.querySelector(`#jobs-active [data-job-id='${id}'] .bar`)"
        "?.getAttribute('aria-valuenow')) > 0", arg=job_id, timeout=RENDER_TIMEOUT_MS)
    page.evaluate("window.notReloaded = true")

    active.locator("button[data-action=cancel]").click()
    expect(active).to_have_count(0)
    finished = card_in(page, "completed", job_id)
    expect(finished.locator(".badge")).to_have_text("cancelled")
    expect(page.locator("#notice")).to_have_text(f"job {job_id} cancelled")
    expect(page.locator("#count-active")).to_have_text("0")
    assert page.evaluate("window.notReloaded") is True  # the same page, changed in place
    assert farm.job(job_id)["state"] == "cancelled"
    # Pushed by events, not polled: one event stream and no status requests.
    assert sum("/api/events" in url for url in requests) == 1, requests
    assert not [url for url in requests if "/api/status" in url], requests


def test_login_with_the_farm_secret(tmp_path: Path, page: Page) -> None:
    farm = Farm(tmp_path / "output", secret=SECRET)
    server = start_web_on(farm, secret=SECRET)
    try:
        page.goto(server.url)
        expect(page).to_have_url(re.compile(r"/login$"))
        page.fill("#secret", "wrong")
        page.click("button[type=submit]")
        expect(page.locator("#login-error")).to_have_text("that is not the farm's secret")
        page.fill("#secret", SECRET)
        page.click("button[type=submit]")
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#farm-name")).to_have_text("test-farm")
        expect(page.locator("#logout")).to_be_visible()
        page.click("#logout")
        expect(page).to_have_url(re.compile(r"/login$"))
        assert page.context.cookies() == []
    finally:
        stop_web(farm, server)
        farm.stop()


def test_missing_files_warning_on_the_job_card(farm: Farm, clients: Clients, page: Page, web: WebServer,
                                               tmp_path: Path) -> None:
    """A single .blend uploaded whose texture stays behind: allowed in the form, the card says what is missing."""
    subprocess.run([sys.executable, "-m", "tools.projects", str(tmp_path / "project"), "--texture"], cwd=REPO,
                   env=repo_env(), check=True, capture_output=True, timeout=120)
    clients.start("worker", farm.address)
    open_page(page, web)
    farm.wait_until(connected(1), what="a client")
    page.set_input_files("#blend-file", str(tmp_path / "project" / "scene.blend"))
    page.check("input[name=allow_missing]")
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("created", timeout=30_000)
    job_id = re.search(r"Job (\S+) created", page.inner_text("#upload-status")).group(1)
    done = card_in(page, "completed", job_id)
    expect(done.locator(".badge")).to_have_text("done", timeout=RENDER_TIMEOUT_MS)
    expect(done.locator(".warnings")).to_contain_text('Warning: missing files: //textures/wood.png (image "wood")')
    assert farm.job(job_id)["allow_missing"]


def test_a_project_folder_and_a_zip_through_the_page(farm: Farm, clients: Clients, page: Page, web: WebServer,
                                                    tmp_path: Path) -> None:
    """A folder picked in the page (its files sent by their relative paths), then the same project dropped as a
    .zip: the page shows what travels and what the farm had already; the folder's job renders."""
    project = tmp_path / "shot"
    subprocess.run([sys.executable, "-m", "tools.projects", str(project), "--texture", "--library"], cwd=REPO,
                   env=repo_env(), check=True, capture_output=True, timeout=120)
    for leftover in project.rglob("*.blend1"):
        leftover.unlink()
    clients.start("worker", farm.address)
    open_page(page, web)
    farm.wait_until(connected(1), what="a client")

    page.set_input_files("#project-folder", str(project))
    expect(page.locator("#file-name")).to_contain_text("shot/ (4 files")
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("created", timeout=30_000)
    job_id = re.search(r"Job (\S+) created", page.inner_text("#upload-status")).group(1)
    summary = page.locator("#upload-summary")
    expect(summary).to_contain_text("Travels: 4 files")
    expect(summary).to_contain_text("(main: shot/scene.blend)")
    expect(summary).to_contain_text("Already on the farm: 0")
    manifest = farm.call(lambda s: s.farm.jobs[job_id].manifest)
    assert sorted(f.relpath for f in manifest.files) == ["shot/lib/props.blend", "shot/lib/tex/marble.png",
                                                          "shot/scene.blend", "shot/textures/wood.png"]
    done = card_in(page, "completed", job_id)
    expect(done.locator(".badge")).to_have_text("done", timeout=RENDER_TIMEOUT_MS)
    expect(done.locator(".warnings")).to_be_hidden()
    assert sorted(p.name for p in (farm.output / job_id).glob("frame_*.png")) == ["frame_0001.png", "frame_0002.png"]

    archive = tmp_path / "shot.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(project.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(tmp_path).as_posix())
    transfer = page.evaluate_handle(DATA_TRANSFER, ["shot.zip", base64.b64encode(archive.read_bytes()).decode()])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#file-name")).to_contain_text("shot.zip")
    page.check("input[name=start][value='0']")
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("created", timeout=30_000)
    expect(summary).to_contain_text("Already on the farm: 4")
    expect(summary).to_contain_text("stored now: 0 (0 bytes)")
