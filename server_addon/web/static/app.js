// MicroFarm's page: jobs, clients and files, kept live by Server-Sent Events from /api/events.
// Every piece of data reaches the page through textContent or element properties, never as HTML.
"use strict";

const PAGE_HEADERS = { "X-Requested-With": "MicroFarm" };
const GROUPS = {
  probing: "active", rendering: "active",
  queued: "queued", paused: "queued",
  done: "completed", failed: "completed", cancelled: "completed",
};
const NOTICE_MS = 6000;
const CODEC_NAMES = { h264: "H.264", h265: "H.265", prores: "ProRes" };

const cards = new Map(); // job id -> card (its elements)
let latest = null; // the last status from the server
let optionsFilled = false;
let chosenFile = null;
let filesJob = null; // the job whose files are shown
let filesKey = "";
let noticeTimer = 0;

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function formatBytes(count) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let size = count;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${size} bytes` : `${size.toFixed(1)} ${units[unit]}`;
}

function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h} h ${String(m).padStart(2, "0")} min` : `${m}:${rest}`;
}

function notice(text, kind = "info") {
  const box = $("notice");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.hidden = true; }, NOTICE_MS);
}

async function api(method, url, body) {
  const options = { method, headers: { ...PAGE_HEADERS }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("log in first");
  }
  if (!response.ok) {
    throw new Error(data && data.error ? data.error : `${response.status} ${response.statusText}`);
  }
  return data;
}

// --- live updates ----------------------------------------------------------------------------

function setConnection(state, text) {
  const badge = $("connection");
  badge.dataset.state = state;
  badge.textContent = text;
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("status", (event) => {
    setConnection("live", "live");
    render(JSON.parse(event.data));
  });
  source.addEventListener("open", () => setConnection("live", "live"));
  source.addEventListener("error", async () => {
    setConnection("down", "reconnecting…");
    try {
      const response = await fetch("/api/status", { headers: PAGE_HEADERS });
      if (response.status === 401) {
        source.close();
        window.location.assign("/login");
      }
    } catch {
      // The server is away; EventSource keeps trying by itself.
    }
  });
}

function render(status) {
  latest = status;
  $("farm-name").textContent = status.farm;
  document.title = `MicroFarm · ${status.farm}`;
  $("logout").hidden = !status.web.auth;
  if (!optionsFilled) fillOptions(status.web);
  renderJobs(status.jobs);
  renderClients(status.clients);
  refreshFilesIfChanged(status.jobs);
}

function fillOptions(web) {
  const form = $("upload-form");
  for (const format of web.formats) form.elements.file_format.append(el("option", { value: format, text: format }));
  const containers = { h264: "MP4", h265: "MP4", prores: "MOV" };
  for (const codec of web.video.codecs) {
    const text = `${CODEC_NAMES[codec] || codec} ${containers[codec] || ""}`.trim();
    form.elements.video.append(el("option", { value: codec, text }));
  }
  for (const quality of web.video.qualities) form.elements.video_quality.append(el("option", { value: quality, text: quality }));
  for (const location of web.video.locations) {
    form.elements.video_location.append(el("option", { value: location, text: location }));
  }
  optionsFilled = true;
}

// --- jobs ------------------------------------------------------------------------------------

function renderJobs(jobs) {
  const lists = { active: $("jobs-active"), queued: $("jobs-queued"), completed: $("jobs-completed") };
  const counts = { active: 0, queued: 0, completed: 0 };
  const seen = new Set();
  for (const job of jobs) {
    seen.add(job.id);
    let card = cards.get(job.id);
    if (!card) {
      card = createCard(job.id);
      cards.set(job.id, card);
    }
    updateCard(card, job);
    const group = GROUPS[job.state] || "active";
    counts[group] += 1;
    lists[group].append(card.root); // moves the card; the server's order is kept
  }
  for (const [id, card] of cards) {
    if (!seen.has(id)) {
      card.root.remove();
      cards.delete(id);
    }
  }
  for (const [group, count] of Object.entries(counts)) $(`count-${group}`).textContent = String(count);
}

function button(text, action, extra = {}) {
  return el("button", { type: "button", text, className: extra.className || "", data: { action } });
}

function createCard(jobId) {
  const card = { id: jobId, job: null, videoUrl: "", videoBuild: 0 };
  card.img = el("img", { className: "thumb-img", alt: "last frame", hidden: true });
  card.noPreview = el("span", { className: "no-preview", text: "no frames yet" });
  card.img.addEventListener("load", () => {
    card.img.hidden = false;
    card.noPreview.hidden = true;
  });
  card.img.addEventListener("error", () => {
    card.img.hidden = true;
    card.noPreview.hidden = false;
    card.noPreview.textContent = "no preview";
  });
  card.name = el("strong", { className: "job-name" });
  card.badge = el("span", { className: "badge" });
  card.jobId = el("code", { className: "job-id", text: jobId });
  card.fill = el("div", { className: "fill" });
  card.bar = el("div", { className: "bar" }, card.fill);
  card.bar.setAttribute("role", "progressbar");
  card.bar.setAttribute("aria-valuemin", "0");
  card.bar.setAttribute("aria-valuemax", "100");
  card.percent = el("span", { className: "percent" });
  card.frames = el("span", { className: "frames" });
  card.meta = el("div", { className: "meta" });
  card.error = el("div", { className: "error", hidden: true });
  card.waiting = el("div", { className: "waiting", hidden: true });
  card.warnings = el("div", { className: "warnings", hidden: true });
  card.videoBox = el("div", { className: "video", hidden: true });
  card.videoNote = el("div", { className: "video-note", hidden: true });

  card.buttons = {
    pause: button("Pause", "pause"),
    resume: button("Resume", "resume"),
    cancel: button("Cancel", "cancel", { className: "danger" }),
    force: button("Force complete", "force_complete"),
    files: button("Files", "files"),
    delete: button("Delete", "delete", { className: "danger" }),
    deleteFiles: button("Delete with files", "delete_files", { className: "danger" }),
  };
  card.priority = el("input", { type: "number", className: "priority-input", title: "priority" });
  card.prioritySet = button("Set priority", "priority", { className: "small" });
  card.priorityBox = el("span", { className: "priority" }, "Priority ", card.priority, card.prioritySet);
  card.codec = el("select", { className: "codec", title: "video codec" });
  card.quality = el("select", { className: "quality", title: "video quality" });
  const web = latest ? latest.web : { video: { codecs: ["h264"], qualities: ["high"] } };
  for (const codec of web.video.codecs) {
    card.codec.append(el("option", { value: codec, text: CODEC_NAMES[codec] || codec }));
  }
  for (const quality of web.video.qualities) card.quality.append(el("option", { value: quality, text: quality }));
  card.mp4 = button("Create MP4", "video");
  card.mp4Box = el("span", { className: "mp4" }, card.codec, card.quality, card.mp4);

  const actions = el("div", { className: "actions" }, ...Object.values(card.buttons), card.priorityBox, card.mp4Box);
  actions.addEventListener("click", (event) => {
    const target = event.target.closest("button[data-action]");
    if (target) onAction(card, target.dataset.action);
  });

  card.root = el("article", { className: "job", data: { jobId } },
    el("div", { className: "thumb" }, card.img, card.noPreview),
    el("div", { className: "body" },
      el("div", { className: "title" }, card.name, card.badge, card.jobId),
      el("div", { className: "progress" }, card.bar, card.percent),
      el("div", { className: "line" }, card.frames, card.meta),
      card.error, card.warnings, card.waiting, card.videoNote, card.videoBox, actions));
  return card;
}

function updateCard(card, job) {
  const previous = card.job;
  card.job = job;
  const total = job.frames_total;
  const percent = total ? Math.floor((100 * job.frames_done) / total) : 0;
  card.name.textContent = job.name;
  card.badge.textContent = job.state === "done" && job.forced ? "done (forced)" : job.state;
  card.badge.dataset.state = job.state;
  card.root.dataset.state = job.state;
  card.fill.style.width = `${percent}%`;
  card.bar.setAttribute("aria-valuenow", String(percent));
  card.percent.textContent = `${percent}%`;
  if (total) card.frames.textContent = `${job.frames_done} / ${total} frames`;
  else card.frames.textContent = job.state === "probing" ? "reading the scene…" : "frames not known yet";
  card.meta.textContent = metaText(job);
  card.error.textContent = job.error;
  card.error.hidden = !job.error;
  card.waiting.textContent = job.waiting || "";
  card.waiting.hidden = !job.waiting || Boolean(job.error);
  // Files missing (the submitter allowed it, or Blender said so while rendering), scripts not run: kept to the end.
  const warnings = job.warnings || [];
  card.warnings.textContent = warnings.map((w) => `Warning: ${w}`).join("\n");
  card.warnings.hidden = warnings.length === 0;

  if (job.thumbnail_url) {
    if (card.img.dataset.src !== job.thumbnail_url) {
      card.img.dataset.src = job.thumbnail_url;
      card.img.src = job.thumbnail_url;
    }
  } else {
    card.img.hidden = true;
    card.noPreview.hidden = false;
    card.noPreview.textContent = GROUPS[job.state] === "completed" ? "no preview" : "no frames yet";
  }
  updateVideo(card, job, previous);
  updateActions(card, job, previous);
}

// The Blender a job renders with, or what it asks for until a client took it.
function jobBlender(job) {
  if (job.blender) return `Blender ${job.blender}`;
  if (job.blender_request === "file") return job.blender_file ? `Blender ${job.blender_file} (the file's)` : "";
  if (job.blender_request) return `Blender ${job.blender_request}`;
  return job.blender_file ? `saved by Blender ${job.blender_file}` : "";
}

function metaText(job) {
  const parts = [];
  if (job.frames_failed) parts.push(`${job.frames_failed} failed`);
  if (job.eta_s != null) parts.push(`ETA ${formatDuration(job.eta_s)}`);
  if (job.clients_working) parts.push(`${job.clients_working} client${job.clients_working === 1 ? "" : "s"}`);
  if (job.mean_frame_s) parts.push(`${job.mean_frame_s.toFixed(1)} s/frame`);
  const blender = jobBlender(job);
  if (blender) parts.push(blender);
  if (job.file_format) parts.push(job.file_format);
  if (job.resolution) parts.push(`${job.resolution[0]}×${job.resolution[1]}`);
  if (job.priority) parts.push(`priority ${job.priority}`);
  return parts.join(" · ");
}

function updateVideo(card, job, previous) {
  const state = job.video_state;
  if (state === "done" && job.video_url) {
    if (previous && previous.video_state !== "done") card.videoBuild += 1;
    const url = `${job.video_url}?build=${card.videoBuild}`;
    if (card.videoUrl !== url) {
      card.videoUrl = url;
      const player = el("video", { controls: true, preload: "metadata", className: "player" });
      if (job.thumbnail_url) player.poster = job.thumbnail_url;
      player.src = url;
      card.videoBox.replaceChildren(player);
    }
    card.videoBox.hidden = false;
    card.videoNote.hidden = true;
    return;
  }
  card.videoUrl = "";
  card.videoBox.replaceChildren();
  card.videoBox.hidden = true;
  const notes = { building: "Building the video…", failed: `No video: ${job.video_error}` };
  const codec = job.video ? CODEC_NAMES[job.video.codec] || job.video.codec : "";
  const waiting = job.video && state === "" && job.state !== "done" ? `The ${codec} video is made when the job is done.` : "";
  card.videoNote.textContent = notes[state] || waiting;
  card.videoNote.hidden = !card.videoNote.textContent;
  card.videoNote.dataset.state = state;
}

function updateActions(card, job, previous) {
  const s = job.state;
  const running = s === "probing" || s === "rendering";
  const finished = GROUPS[s] === "completed";
  const b = card.buttons;
  b.pause.hidden = !running;
  b.resume.hidden = !(s === "paused" || s === "queued" || s === "failed" || s === "cancelled");
  b.resume.textContent = s === "queued" ? "Start" : s === "paused" ? "Resume" : "Retry";
  b.cancel.hidden = finished;
  b.force.hidden = !(s === "rendering" || s === "paused");
  b.delete.hidden = running;
  b.deleteFiles.hidden = !finished;
  card.priorityBox.hidden = finished;
  card.mp4Box.hidden = s !== "done";
  card.mp4.disabled = job.video_state === "building";
  if (!previous || (previous.priority !== job.priority && document.activeElement !== card.priority)) {
    card.priority.value = String(job.priority);
  }
}

async function onAction(card, action) {
  const id = encodeURIComponent(card.id);
  try {
    let result;
    if (action === "files") {
      await showFiles(card.id);
      return;
    } else if (action === "delete") {
      result = await api("DELETE", `/api/jobs/${id}`);
    } else if (action === "delete_files") {
      if (!window.confirm(`Delete job ${card.id} and all of its files?`)) return;
      result = await api("DELETE", `/api/jobs/${id}?files=1`);
    } else if (action === "priority") {
      const priority = Number.parseInt(card.priority.value, 10);
      if (!Number.isInteger(priority)) throw new Error("the priority must be a whole number");
      result = await api("POST", `/api/jobs/${id}/priority`, { priority });
    } else if (action === "video") {
      result = await api("POST", `/api/jobs/${id}/video`, { codec: card.codec.value, quality: card.quality.value });
    } else {
      result = await api("POST", `/api/jobs/${id}/${action}`);
    }
    notice(result.message);
    if (action.startsWith("delete") && filesJob === card.id) closeFiles();
  } catch (error) {
    notice(error.message, "error");
  }
}

// --- clients ---------------------------------------------------------------------------------

function renderClients(clients) {
  const rows = clients.map((c) => el("tr", { data: { clientId: c.id, state: c.state } },
    el("td", { text: c.name }),
    el("td", { text: c.host }),
    el("td", { text: c.blender || "?" }),
    el("td", {}, el("span", { className: "badge", text: c.state, data: { state: c.state } })),
    el("td", { text: c.job_id || "" }),
    el("td", { text: c.frame == null ? "" : String(c.frame) }),
    el("td", { className: "num", text: String(c.frames_rendered) }),
    el("td", { className: "num", text: String(c.failures) })));
  $("clients-table").tBodies[0].replaceChildren(...rows);
  $("clients-table").hidden = clients.length === 0;
  $("no-clients").hidden = clients.length > 0;
  $("count-clients").textContent = String(clients.filter((c) => c.state !== "lost").length);
}

// --- files -----------------------------------------------------------------------------------

async function showFiles(jobId) {
  filesJob = jobId;
  filesKey = "";
  $("files").hidden = false;
  $("files-job").textContent = jobId;
  await loadFiles();
  $("files").scrollIntoView({ behavior: "smooth", block: "start" });
}

function closeFiles() {
  filesJob = null;
  $("files").hidden = true;
}

async function loadFiles() {
  const jobId = filesJob;
  if (!jobId) return;
  let data;
  try {
    data = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/files`);
  } catch (error) {
    notice(error.message, "error");
    return;
  }
  if (filesJob !== jobId) return;
  const rows = data.files.map((f) => el("tr", { data: { name: f.name } },
    el("td", {}, el("a", { href: f.url, target: "_blank", rel: "noopener", text: f.name })),
    el("td", { text: f.kind }),
    el("td", { className: "num", text: formatBytes(f.size) }),
    el("td", {}, el("a", { href: f.download_url, download: f.name, className: "button small", text: "Download" }))));
  $("files-table").tBodies[0].replaceChildren(...rows);
  $("files-empty").hidden = rows.length > 0;
  $("files-table").hidden = rows.length === 0;
  $("files-summary").textContent = `${data.files.length} files, ${formatBytes(data.total_bytes)}`;
  const zip = $("files-zip");
  zip.href = data.zip_url;
  zip.download = `${jobId}.zip`;
  zip.hidden = rows.length === 0;
}

function refreshFilesIfChanged(jobs) {
  if (!filesJob) return;
  const job = jobs.find((j) => j.id === filesJob);
  if (!job) {
    closeFiles();
    return;
  }
  const key = `${job.frames_done}/${job.video_state}`;
  if (filesKey && key !== filesKey) loadFiles();
  filesKey = key;
}

// --- upload ----------------------------------------------------------------------------------

// What is chosen: { name, size, file } for a .blend or a .zip, { name, size, items: [{ file, path }] } for a folder.
function chooseFile(file) {
  choose(file ? { name: file.name, size: file.size, file } : null);
}

function chooseFolder(items) {
  if (!items.length) {
    choose(null);
    return;
  }
  const name = items[0].path.split("/")[0];
  const size = items.reduce((sum, item) => sum + item.file.size, 0);
  choose({ name, size, items });
}

function choose(chosen) {
  chosenFile = chosen;
  const what = !chosen ? "" : chosen.items
    ? `${chosen.name}/ (${chosen.items.length} files, ${formatBytes(chosen.size)})`
    : `${chosen.name} (${formatBytes(chosen.size)})`;
  $("file-name").textContent = what;
  $("drop-zone").classList.toggle("chosen", Boolean(chosen));
  $("upload-status").textContent = "";
  $("upload-summary").hidden = true;
}

// A folder dropped on the page: its files, each with its path below the folder's parent (as the picker gives).
async function droppedFolder(entries) {
  const items = [];
  const read = (reader) => new Promise((resolve, reject) => reader.readEntries(resolve, reject));
  const walk = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      items.push({ file, path: entry.fullPath.replace(/^\/+/, "") });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (let batch = await read(reader); batch.length; batch = await read(reader)) {
        for (const child of batch) await walk(child);
      }
    }
  };
  for (const entry of entries) await walk(entry);
  return items;
}

function showSummary(project) {
  const list = $("upload-summary");
  const line = (text, kind = "") => el("li", { text, data: { kind } });
  const names = (count, shown) => shown.join(", ") + (count > shown.length ? ` and ${count - shown.length} more` : "");
  const lines = [
    line(`Travels: ${project.files} file${project.files === 1 ? "" : "s"}, ${formatBytes(project.bytes)}` +
         (project.files > 1 ? ` (main: ${project.main})` : "")),
    line(`Already on the farm: ${project.reused_files} (${formatBytes(project.reused_bytes)}); ` +
         `stored now: ${project.stored_files} (${formatBytes(project.stored_bytes)})`),
  ];
  if (project.missing_count) {
    lines.push(line(`Missing: ${names(project.missing_count, project.missing)}`, "warning"));
  }
  if (project.outside_count) {
    lines.push(line(`Outside the upload (not sent): ${names(project.outside_count, project.outside)}`, "warning"));
  }
  if (project.unused_count) {
    lines.push(line(`Not needed by the scene, not part of the job: ${names(project.unused_count, project.unused)}`));
  }
  if (!project.traced) lines.push(line(`Not traced: ${project.trace_error}`, "warning"));
  list.replaceChildren(...lines);
  list.hidden = false;
}

function setUploadProgress(fraction) {
  const percent = Math.floor(fraction * 100);
  $("upload-progress").hidden = false;
  $("upload-bar").style.width = `${percent}%`;
  $("upload-bar").parentElement.setAttribute("aria-valuenow", String(percent));
  $("upload-percent").textContent = `${percent}%`;
}

function uploadStatus(text, kind) {
  const line = $("upload-status");
  line.textContent = text;
  line.dataset.kind = kind;
}

function submitUpload(event) {
  event.preventDefault();
  if (!chosenFile) {
    uploadStatus("Choose or drop a .blend, a .zip or a folder first.", "error");
    return;
  }
  const limit = latest ? latest.web.max_upload_bytes : Infinity;
  if (chosenFile.size > limit) {
    uploadStatus(`The upload is larger than the ${formatBytes(limit)} this farm accepts.`, "error");
    return;
  }
  const form = $("upload-form");
  const data = new FormData();
  for (const control of form.elements) {
    if (!control.name || control.type === "file" || control.value === "") continue;
    if ((control.type === "radio" || control.type === "checkbox") && !control.checked) continue;
    data.append(control.name, control.value);
  }
  // Last: the settings are checked before the bytes are stored. A folder's files go by their relative paths.
  if (chosenFile.items) {
    for (const item of chosenFile.items) data.append("files", item.file, item.path);
  } else {
    data.append("file", chosenFile.file, chosenFile.name);
  }
  const request = new XMLHttpRequest();
  request.open("POST", "/api/jobs");
  for (const [name, value] of Object.entries(PAGE_HEADERS)) request.setRequestHeader(name, value);
  request.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) setUploadProgress(e.loaded / e.total);
  });
  request.addEventListener("load", () => {
    let reply = null;
    try {
      reply = JSON.parse(request.responseText);
    } catch {
      reply = null;
    }
    $("upload-button").disabled = false;
    if (request.status === 201 && reply) {
      setUploadProgress(1);
      $("blend-file").value = "";
      $("project-folder").value = "";
      chooseFile(null);
      uploadStatus(`Job ${reply.id} created.`, "ok");
      if (reply.project) showSummary(reply.project);
    } else if (request.status === 401) {
      window.location.assign("/login");
    } else {
      uploadStatus(reply && reply.error ? reply.error : `Upload failed (${request.status}).`, "error");
    }
  });
  request.addEventListener("error", () => {
    $("upload-button").disabled = false;
    uploadStatus("The upload failed: the connection to the server was lost.", "error");
  });
  $("upload-button").disabled = true;
  setUploadProgress(0);
  uploadStatus(`Uploading ${chosenFile.name}…`, "busy");
  request.send(data);
}

function setUpUpload() {
  const zone = $("drop-zone");
  $("blend-file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  $("project-folder").addEventListener("change", (e) => chooseFolder(
    Array.from(e.target.files, (file) => ({ file, path: file.webkitRelativePath || file.name }))));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (!e.dataTransfer) return;
    // Entries are read now, while the drop lasts; a folder's files are listed after.
    const entries = Array.from(e.dataTransfer.items || [], (item) => item.webkitGetAsEntry && item.webkitGetAsEntry())
      .filter(Boolean);
    if (entries.some((entry) => entry.isDirectory)) {
      droppedFolder(entries).then(chooseFolder, (error) => uploadStatus(`Cannot read the folder: ${error}`, "error"));
    } else if (e.dataTransfer.files.length) {
      chooseFile(e.dataTransfer.files[0]);
    }
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  $("upload-form").addEventListener("submit", submitUpload);
}

function start() {
  setUpUpload();
  $("clear-completed").addEventListener("click", async () => {
    try {
      notice((await api("POST", "/api/jobs/clear_completed")).message);
    } catch (error) {
      notice(error.message, "error");
    }
  });
  $("files-close").addEventListener("click", closeFiles);
  $("logout").addEventListener("click", async () => {
    await api("POST", "/logout").catch(() => null);
    window.location.assign("/login");
  });
  connect();
}

document.addEventListener("DOMContentLoaded", start);
