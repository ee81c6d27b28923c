"""Sending the saved copy of the open file to the farm as a job, on a worker thread. No bpy.

Pack (if asked, in a separate Blender: submit.py), trace what the file needs as if the copy lay where the
open file lies, hash it, put what the server lacks into its store (project.py), then create the job on the
server's loop (bridge.py). Each step reports to the Outbox; nothing here waits on the UI thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from protocol.manifest import safe_blend_name
from protocol.names import clean_name

from ..core.trace import TraceError, traced
from . import project, submit
from .bridge import CALL_TIMEOUT_S, ServerLink
from .errors import Cancelled, FarmError, sentence
from .outbox import Outbox
from .submit import JobSubmission


class Sender:
    """Sends submissions to the server that `link()` returns (it raises FarmError when none runs)."""

    def __init__(self, outbox: Outbox, link: Callable[[], ServerLink], blender_binary: str = "") -> None:
        self._outbox = outbox
        self._link = link
        self.blender_binary = blender_binary
        self._work = submit.Work()
        self._hashes = project.Hashes()

    def kill(self) -> None:
        """Stop the packing and hashing under way, and refuse more (the add-on is going away)."""
        self._work.kill()

    def run(self, job: JobSubmission) -> None:
        """Send one submission; every outcome, good or bad, becomes a Notice."""
        error = ""
        try:
            self._send(job)
        except Cancelled:
            pass
        except FarmError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"The farm server did not answer within {CALL_TIMEOUT_S:.0f} s; the render job was not created."
        except (OSError, ValueError, RuntimeError) as exc:
            error = f"Could not create the render job: {exc}"
        finally:
            # The copy goes before the user hears of a refusal: nothing of it is left in the store by then.
            submit.discard(job)
        if error:
            self._outbox.post("ERROR", error)

    def _send(self, job: JobSubmission) -> None:
        """The open file as a project: its folder is the job's, the copy stands where the open file lies."""
        base = job.location.parent if job.location is not None else None
        if job.pack:
            submit.pack(job.blend, self._work, self.blender_binary, base)
        self._work.check()
        store = self._link().files
        location = job.location or project.UNSAVED_LOCATION.with_name(safe_blend_name(job.name))
        filepath = str(job.location) if job.location is not None else ""
        with contextlib.ExitStack() as pins:
            try:
                with traced(job.blend, location=location) as trace:
                    entries = project.survey(trace, job.blend, store, self._hashes, self._work)
                    check = project.check_of(filepath, trace, entries, job.pack)
                    self._outbox.put_check(check)
                    if job.check_only:
                        missing = f"; missing on this disk: {project.listed(check.missing)}" if check.missing else ""
                        self._outbox.post("WARNING" if check.missing else "INFO", sentence(check.summary() + missing))
                        return
                    if check.missing and not job.request.allow_missing:
                        raise FarmError(check.refusal())
                    manifest = project.manifest(entries, trace.main)
                    # Held until the job exists: a job deleted meanwhile must not take the files send() reuses.
                    pins.enter_context(store.pinned(manifest.shas()))
                    project.send(entries, job.blend, store, self._work)
            except TraceError as exc:
                raise FarmError(sentence(f"Could not find the files the scene needs: {exc}")) from None
            name = clean_name(job.name) or "untitled.blend"
            job_id = self._link().create_job(job, name, manifest)
        self._outbox.put_check(project.sent(check, job_id))
        if job.show_result:
            self._outbox.post("INFO", f"Frame {job.request.frame_start} sent to the farm as job {job_id}.")
        elif check.missing:
            self._outbox.post("WARNING", f"Render job {job_id} sent to the farm without "
                                         f"{project.listed(check.missing)} (missing on this disk).")
        else:
            self._outbox.post("INFO", f"Render job {job_id} sent to the farm.")
