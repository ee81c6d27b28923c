"""The client's main loop: take a task from the link, render it in this (warm) Blender, report."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.manifest import Manifest
from protocol.names import printable
from protocol.settings import validate_assignment

from .cache import CacheError
from .layout import JobFolders, LayoutError
from .link import Link, LinkLost
from .render import Renderer, RenderError
from .supervisor import RenderAbandoned, RenderProcess

log = logging.getLogger(__name__)

#: How often the idle main loop wakes to check for a fatal link error or a stop request.
POLL_S = 0.5
#: How long a stopping client waits for its last frames and messages to go out after its work ended.
FLUSH_TIMEOUT_S = 4.0
#: A job folder left unused this long is removed (its job has most likely ended; the client is not told).
JOB_FOLDER_IDLE_S = 120.0


class Worker:
    def __init__(self, link: Link, renderer: Renderer | RenderProcess) -> None:
        self.link = link
        self.renderer = renderer
        self.scratch = Path(tempfile.mkdtemp(prefix="microfarm-frames-"))
        self.folders = JobFolders(link.cache)
        self._idle_since = time.monotonic()

    def run(self) -> int:
        """Work until told to stop (Link.drain); returns the process exit code."""
        try:
            while not self.link.draining:
                if self.link.fatal:
                    return 2
                task = self.link.next_task(POLL_S)
                if task is None:
                    self._idle()
                    continue
                try:
                    if isinstance(task.message, m.Probe):
                        self._probe(task.epoch, task.message)
                    else:
                        self._render(task.epoch, task.message)
                except LinkLost as exc:
                    log.warning("task abandoned: %s", printable(exc))
                finally:
                    self.link.set_state("idle")
                    self._idle_since = time.monotonic()
            if not self.link.flush(FLUSH_TIMEOUT_S):
                log.warning("stopping: what was left to send did not go out within %.0f s", FLUSH_TIMEOUT_S)
            return 0
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.folders.close()

    def _idle(self) -> None:
        if self.renderer.current_sha is not None and time.monotonic() - self._idle_since > JOB_FOLDER_IDLE_S:
            log.info("no work for %.0f s: removing the job folder", JOB_FOLDER_IDLE_S)
            self.folders.remove_others(keep=None)
            self.link.cache.pin(())
            self.renderer.current_sha = None  # laid out and opened afresh if its job sends more work

    def _open(self, epoch: int, job_id: str, manifest: Manifest) -> None:
        """Fetch the job's files this client lacks, lay them out in the job's folder, open its .blend there."""
        key = f"{job_id}/{manifest.main_file.sha256}"  # a job folder per job: the same .blend may need other files
        if self.renderer.current_sha == key:
            damaged = self._damaged(job_id, manifest)
            if not damaged:
                return
            # Something removed or changed a file of the open job (a cleaner, a full disk, a user): never
            # rendered around; fetched again where needed, laid out and opened afresh.
            log.warning("job %s: %s gone or changed on this client: fetching and opening again", job_id,
                        ", ".join(f"//{relpath}" for relpath in damaged[:10]))
            self.renderer.current_sha = None
        self.link.set_state("downloading", job_id, epoch=epoch)
        cache = self.link.cache
        files = manifest.by_sha().values()
        try:
            # Room first, for all that is not stored yet (a stat each): evicting while fetching could take
            # a file this very job was about to use.
            cache.make_room(sum(e.size for e in files if not cache.path(e.sha256).exists()), keep=manifest.shas())
            for entry in files:
                self.link.fetch_blend(epoch, entry.sha256, entry.size, name=entry.relpath)
        except CacheError as exc:
            raise RenderError(str(exc)) from None
        try:
            path = self.folders.lay_out(job_id, manifest)
        except (LayoutError, OSError) as exc:
            raise RenderError(f"the job's files cannot be laid out: {exc}") from None
        self.link.set_state("opening", job_id, epoch=epoch)
        self.renderer.open(path, key)
        cache.pin(manifest.shas())
        self.folders.remove_others(keep=job_id)

    def _damaged(self, job_id: str, manifest: Manifest) -> list[str]:
        """The files of the open job missing from its folder or the store, or no longer as they were sent (a
        stat each; a file is hashed again only if it changed)."""
        folder = self.folders.job_dir(job_id)
        damaged = []
        for entry in manifest.files:
            try:
                info = (folder / entry.relpath).stat()
                intact = info.st_size == entry.size
                if intact and self.folders.linked:  # the very file the store checks, not one put in its place
                    stored = self.link.cache.path(entry.sha256).stat()
                    intact = (info.st_ino, info.st_dev) == (stored.st_ino, stored.st_dev)
            except OSError:
                intact = False
            if not intact or self.link.cache.lookup(entry.sha256, entry.size, entry.relpath) is None:
                damaged.append(entry.relpath)
        return damaged

    def _probe(self, epoch: int, probe: m.Probe) -> None:
        try:
            self._open(epoch, probe.job_id, probe.manifest())
            info = self.renderer.scene_info()
        except RenderError as exc:
            self.link.send(epoch, m.ProbeResult(lease_id=probe.lease_id, ok=False, error=m.clip(str(exc))))
            return
        log.info("job %s: scene %r, frames %d-%d, %dx%d", probe.job_id, info.scene, info.frame_start,
                 info.frame_end, info.resolution_x, info.resolution_y)
        self.link.send(epoch, m.ProbeResult(lease_id=probe.lease_id, ok=True, scene=info.to_wire()))

    def _render(self, epoch: int, assign: m.Assign) -> None:
        lease = assign.lease_id
        try:
            job = validate_assignment(assign.settings)
        except ProtocolError as exc:
            for frame in assign.frames:
                self.link.send(epoch, m.FrameFailed(lease_id=lease, job_id=assign.job_id, frame=frame, error=str(exc)))
            self.link.send(epoch, m.LeaseDone(lease_id=lease))
            return
        if not self.link.wanted(epoch, lease):
            self.link.send(epoch, m.LeaseDone(lease_id=lease))  # taken back before it began
            return
        try:
            self._open(epoch, assign.job_id, assign.manifest())
            self.renderer.apply(job)
            missing = self.renderer.missing_sentence
            if missing and not job.allow_missing:
                # Files the probing client had may be missing here (a mount that is not there): say which.
                raise RenderError(f"{missing} (on this client)")
        except RenderError as exc:
            for frame in assign.frames:
                self.link.send(epoch, m.FrameFailed(lease_id=lease, job_id=assign.job_id, frame=frame,
                                                    error=m.clip(str(exc))))
            self.link.send(epoch, m.LeaseDone(lease_id=lease))
            return
        for frame in assign.frames:
            if not self.link.wanted(epoch, lease, frame):
                continue
            self.link.set_state("rendering", assign.job_id, frame, epoch=epoch, lease_id=lease)
            started = time.monotonic()

            def abandon(frame: int = frame) -> bool:
                # This very frame was taken back (declared hung, or delivered by another client): its render is
                # stopped. A whole lease taken back (a pause) and a lost connection are no reason: the frame is
                # finished and sent, and kept if the server still wants it.
                return self.link.frame_revoked(lease, frame)
            try:
                path = self.renderer.render_frame(frame, self.scratch, progress=self.link.progress, abandon=abandon)
            except RenderAbandoned:
                log.info("job %s: frame %d was taken back; its render was stopped", assign.job_id, frame)
                continue
            except RenderError as exc:
                log.warning("job %s: frame %d failed: %s", assign.job_id, frame, printable(exc))
                self.link.send(epoch, m.FrameFailed(lease_id=lease, job_id=assign.job_id, frame=frame,
                                                    error=m.clip(str(exc)), log=m.clip(exc.render_log)))
                continue
            elapsed = time.monotonic() - started
            self.link.device = self.renderer.device.backend
            split = self.renderer.split
            what = f"tile {frame} of {split.tiles} of frame {split.frame}" if split else f"frame {frame}"
            log.info("job %s: %s rendered in %.2f s", assign.job_id, what, elapsed)
            if self.renderer.frame_warnings and not job.allow_missing:
                # Blender could not find files while rendering (gone since the file was opened): not a frame.
                error = f"files missing while rendering (on this client): {'; '.join(self.renderer.frame_warnings)}"
                log.warning("job %s: %s failed: %s", assign.job_id, what, printable(error))
                path.unlink(missing_ok=True)
                self.link.send(epoch, m.FrameFailed(lease_id=lease, job_id=assign.job_id, frame=frame,
                                                    error=m.clip(error)))
                continue
            warnings = ([missing] if missing else []) + self.renderer.frame_warnings
            if warnings:
                log.warning("job %s: %s rendered with files missing: %s", assign.job_id, what,
                            printable("; ".join(warnings)))
            begin = m.FrameBegin(lease_id=lease, job_id=assign.job_id, frame=frame, ext=path.suffix.lstrip("."),
                                 size=path.stat().st_size, render_s=elapsed, warnings=warnings)
            # Uploads are queued: the next frame renders while this one travels.
            self.link.upload(epoch, begin, path)
        self.link.send(epoch, m.LeaseDone(lease_id=lease))
