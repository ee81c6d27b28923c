"""What an uploaded project's job needs: its main .blend chosen, traced in the staging folder, the manifest built.

The trace (server_addon.core.trace, BAT) runs on the staging folder as the project, confined: the files came
from a browser, so the server's own disk is not the artist's. A path that leads outside the upload (an
absolute path, or `//../` above it) is never globbed, stat'ed, opened or walked (core.confine): it is named in
`outside` as the .blend wrote it, and like a file that is not in the upload (`missing`) it refuses the job
unless the submitter allowed missing files. Sequences and UDIM tiles are expanded from the upload's list of
files; a compressed .blend is decompressed into the staging folder first, capped by the upload's limit; the
trace has a time limit (WEB_TRACE_SECONDS). A compressed .blend travels as it was uploaded (the bytes the
artist saved, the sha256 that tools.submit and the add-on send for the same file, and smaller); its
decompressed copy is only read by the trace and goes with the staging folder. Needed files are renamed from
the staging folder into the ContentStore; what the upload held and the scene does not need is left to be
deleted with the folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.limits import MAX_BLEND_BYTES
from protocol.manifest import Manifest, ManifestError, ProjectFile

from ..core.confine import Confinement, TooLarge, TraceLimit
from ..core.storage import ContentStore
from ..core.trace import OUTSIDE_DIR, TraceError, bat_available, traced
from .errors import WebError
from .staging import StagedFile, Staging

log = logging.getLogger(__name__)

#: Names listed in a reply or an error, at most (the counts are always complete).
MAX_NAMES_SHOWN = 50
#: Seconds a web upload's trace may take, decompression included (waiting for another upload's trace too).
WEB_TRACE_SECONDS = 120.0
#: Where the decompressed copies of compressed .blend files go: in the staging folder, beside the project.
PLAIN_DIR = "decompressed"


@dataclass
class ProjectPlan:
    main: StagedFile
    manifest: Manifest | None  # None: the .blend alone, as it always was (it could not be traced)
    missing: list[str] = field(default_factory=list)  # as the artist wrote them: //textures/wood.png
    outside: list[str] = field(default_factory=list)  # named outside the upload: never read on the server
    unused: list[str] = field(default_factory=list)
    trace_error: str = ""

    @property
    def files(self) -> list[ProjectFile]:
        if self.manifest is None:
            return [ProjectFile(self.main.relpath, self.main.sha256, self.main.size)]
        return list(self.manifest.files)

    def warnings(self) -> list[str]:
        found = []
        if self.missing:
            found.append(f"missing from the upload: {_names(self.missing)}")
        if self.outside:
            found.append(f"outside the upload (not read from the server's disk): {_names(self.outside)}")
        return found


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def choose_main(staging: Staging, wanted: str | None) -> StagedFile:
    """The `main` field, else the only .blend at the top level (the root, or the one folder everything is in)."""
    blends = sorted(relpath for relpath in staging.files if relpath.lower().endswith(".blend"))
    if wanted:
        if wanted not in staging.files:
            raise WebError(400, f"the main file {wanted[:200]!r} is not in the upload; its .blend files: "
                                f"{_names(blends) or 'none'}")
        if wanted not in blends:
            raise WebError(400, f"the main file {wanted[:200]!r} is not a .blend")
        return staging.files[wanted]
    if not blends:
        raise WebError(400, "the upload holds no .blend file")
    tops = {relpath.split("/")[0] for relpath in staging.files}
    top = f"{next(iter(tops))}/" if len(tops) == 1 and "/" in next(iter(staging.files)) else ""
    candidates = [b for b in blends if b.startswith(top) and "/" not in b[len(top):]]
    if len(candidates) == 1:
        return staging.files[candidates[0]]
    where = f"in {top.rstrip('/')!r}" if top else "at the top level"
    if not candidates:
        raise WebError(400, f"the upload has no .blend {where}; name the one to render in the field 'main' "
                            f"(its .blend files: {_names(blends)})", {"candidates": blends[:MAX_NAMES_SHOWN]})
    raise WebError(400, f"the upload has {len(candidates)} .blend files {where} ({_names(candidates)}); name the "
                        "one to render in the field 'main'", {"candidates": candidates[:MAX_NAMES_SHOWN]})


def plan_project(staging: Staging, main: StagedFile, *, single: bool, hidden: Path,
                 limit: int = MAX_BLEND_BYTES) -> ProjectPlan:
    """Trace `main` in the staging folder (blocking: run it on a thread). `hidden`: a folder of the server's
    (its data dir), never named in a reply. `limit`: the decompressed bytes of compressed .blend files, all
    together (the upload's own limit)."""
    why = bat_available()
    if why:
        if single:
            return ProjectPlan(main, None, trace_error=why)
        raise WebError(400, f"this server cannot trace a project: {why}")
    main_dir = staging.path(main.relpath).parent
    confine = Confinement(staging.project, staging.files, staging.dir / PLAIN_DIR, limit, WEB_TRACE_SECONDS)
    try:
        confine.prepare(r for r in staging.files if r.lower().endswith(".blend"))  # before the trace's lock
        with traced(staging.path(main.relpath), staging.project, confine=confine) as trace:
            needed: list[ProjectFile] = []
            outside: list[str] = []
            for entry in trace.files:
                if entry.relpath.startswith(OUTSIDE_DIR + "/"):
                    outside.append(_shown(entry.original, main_dir, staging, hidden)[0])
                    continue
                staged = staging.files.get(entry.relpath)
                if staged is None:  # only what was uploaded can be in the job
                    log.warning("web upload: the trace found %r, which the upload did not hold", entry.relpath)
                    continue
                needed.append(ProjectFile(staged.relpath, staged.sha256, staged.size))
            outside.extend(trace.unread)  # as the .blend wrote them: the server's disk was never looked at
            missing: list[str] = []
            for text in trace.missing:
                shown, inside = _shown(Path(text), main_dir, staging, hidden) if not text.startswith("//") else (
                    text, True)
                (missing if inside else outside).append(shown)
    except WebError:
        raise
    except TraceLimit as exc:  # not a file BAT cannot read: one that must not travel either
        log.warning("web upload of %s: refused: %s", main.relpath, exc)
        raise WebError(413 if isinstance(exc, TooLarge) else 400, _hide(str(exc), staging, main_dir)) from None
    except Exception as exc:  # noqa: BLE001 - BAT reads a file from a stranger: whatever it raises, it cannot trace
        if not isinstance(exc, TraceError):
            log.info("web upload of %s: BAT failed on it", main.relpath, exc_info=True)
            exc = TraceError(f"cannot trace {main.relpath}: {type(exc).__name__}: {exc}")
        if single:  # a file BAT cannot read still renders where Blender can: it travels alone, as before
            log.warning("web upload of %s: not traced: %s", main.relpath, exc)
            return ProjectPlan(main, None, trace_error=_hide(str(exc), staging, main_dir))
        raise WebError(400, _hide(str(exc), staging, main_dir)) from None
    try:
        manifest = Manifest.build(needed, main.relpath)
    except ManifestError as exc:
        raise WebError(400, f"refused: {exc}") from None
    used = {f.relpath for f in manifest.files}
    return ProjectPlan(main, manifest, sorted(set(missing)), sorted(set(outside)),
                       sorted(r for r in staging.files if r not in used))


def _shown(path: Path, main_dir: Path, staging: Staging, hidden: Path) -> tuple[str, bool]:
    """How the artist wrote a path (relative to the main .blend where it lies in the server's folders), and
    whether it lies inside the upload."""
    path = Path(os.path.abspath(path))
    inside = path.is_relative_to(staging.project)
    if inside or path.is_relative_to(hidden):
        return "//" + Path(os.path.relpath(path, main_dir)).as_posix(), inside
    return str(path), False


def _hide(text: str, staging: Staging, main_dir: Path) -> str:
    """A sentence with the staging folder's place on the server taken out."""
    return text.replace(str(main_dir) + os.sep, "").replace(str(staging.project) + os.sep, "")


def commit(staging: Staging, plan: ProjectPlan, store: ContentStore) -> tuple[int, int, int, int]:
    """Move the job's files the store lacks into it (blocking); (new files, new bytes, reused, reused bytes),
    counted by distinct content."""
    new_files = new_bytes = reused = reused_bytes = 0
    distinct = {f.sha256: f for f in reversed(plan.files)}
    for sha, f in distinct.items():
        if store.has(sha, f.size):
            reused += 1
            reused_bytes += f.size
            continue
        store.move_in(staging.path(f.relpath), sha)
        new_files += 1
        new_bytes += f.size
    return new_files, new_bytes, reused, reused_bytes


def summary(plan: ProjectPlan, counts: tuple[int, int, int, int], uploaded: int, uploaded_bytes: int
            ) -> dict[str, Any]:
    """What travels, for the reply: the page shows it after the upload."""
    files = plan.files
    new_files, new_bytes, reused, reused_bytes = counts
    return {
        "main": plan.main.relpath,
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "uploaded_files": uploaded,
        "uploaded_bytes": uploaded_bytes,
        "stored_files": new_files,
        "stored_bytes": new_bytes,
        "reused_files": reused,
        "reused_bytes": reused_bytes,
        "missing": plan.missing[:MAX_NAMES_SHOWN],
        "missing_count": len(plan.missing),
        "outside": plan.outside[:MAX_NAMES_SHOWN],
        "outside_count": len(plan.outside),
        "unused": plan.unused[:MAX_NAMES_SHOWN],
        "unused_count": len(plan.unused),
        "traced": plan.manifest is not None,
        "trace_error": plan.trace_error or None,
    }


def refuse_missing(plan: ProjectPlan) -> None:
    """400 naming what the scene needs and the upload lacks."""
    count = len(plan.missing) + len(plan.outside)
    parts = []
    if plan.missing:
        parts.append(f"not in the upload: {_names(plan.missing)}")
    if plan.outside:
        parts.append(f"outside the upload (the server does not read its own disk for them): {_names(plan.outside)}")
    raise WebError(400, f"{count} file(s) the scene needs are missing: {'; '.join(parts)} (add them to the zip or "
                        "folder, or allow missing files to render without them)",
                   {"missing": plan.missing[:MAX_NAMES_SHOWN], "outside": plan.outside[:MAX_NAMES_SHOWN]})
