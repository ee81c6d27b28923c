"""Job folders: a job's files laid out as on the artist's machine, so that `//` paths resolve.

<cache>/jobs/<pid>/<job-id>/ holds the main .blend under its own name and every other file at its
relative place, as hard links to the content store (copies where links cannot be made). Each client
process has its own folder of job folders (clients on one machine may share a cache); a process removes
its job folders when it moves to another job and when it stops, and at start-up those of processes
that are gone.

Every relative path is checked again here (protocol.manifest.check_relpath), and every place is
re-checked once resolved: nothing lands outside the job folder, and a symlink in the way is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import sys
from pathlib import Path

from protocol.manifest import Manifest, ManifestError, check_relpath

from .cache import BlendCache

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class LayoutError(Exception):
    """A job's files cannot be laid out safely (a hostile path, a symlink in the way, a full disk)."""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would end the process there
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def _remove_tree(path: Path) -> None:
    def writable(func, name, _exc):  # type: ignore[no-untyped-def]
        # Read-only links from the store (Windows will not delete a read-only file).
        with contextlib.suppress(OSError):
            os.chmod(name, stat.S_IWRITE)
            func(name)
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable)
    else:
        shutil.rmtree(path, onerror=writable)


class JobFolders:
    def __init__(self, cache: BlendCache) -> None:
        self.cache = cache
        self.top = cache.base / "jobs"
        self.root = self.top / str(os.getpid())
        self._linked = True  # hard links work here (until one fails: then copies)
        self.clean_stale()

    def clean_stale(self) -> None:
        """Remove the job folders of client processes that are gone (and a leftover of this pid's)."""
        if not self.top.is_dir():
            return
        for entry in self.top.iterdir():
            if entry.name.isdigit() and (int(entry.name) == os.getpid() or not _alive(int(entry.name))):
                log.info("removing the job folders of stopped client process %s", entry.name)
                _remove_tree(entry)

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise LayoutError(f"the server named a job badly: {job_id!r}")
        return self.root / job_id

    def remove_others(self, keep: str | None = None) -> None:
        """Remove this process's job folders except the one of job `keep`."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name != keep:
                _remove_tree(entry)

    def close(self) -> None:
        if self.root.is_dir():
            _remove_tree(self.root)

    def lay_out(self, job_id: str, manifest: Manifest) -> Path:
        """Place every file of the job (all in the store, verified) in its folder; returns the .blend's path."""
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        base = folder.resolve()
        for entry in manifest.files:
            self._place(base, entry.relpath, self.cache.path(entry.sha256))
        return base / manifest.main

    def _place(self, base: Path, relpath: str, source: Path) -> None:
        try:
            check_relpath(relpath)
        except ManifestError as exc:
            raise LayoutError(str(exc)) from None
        parts = relpath.split("/")
        here = base
        for part in parts[:-1]:  # each folder on the way: made here, never a link to elsewhere
            here = here / part
            if here.is_symlink():
                raise LayoutError(f"{relpath}: {part!r} in the job folder is a symlink; refusing to follow it")
            if here.exists() and not here.is_dir():
                raise LayoutError(f"{relpath}: {part!r} in the job folder is a file, not a folder")
            here.mkdir(exist_ok=True)
        target = here / parts[-1]
        resolved = target.parent.resolve() / target.name
        if resolved.parent != base and base not in resolved.parents:
            raise LayoutError(f"{relpath} would land outside the job folder")
        if target.is_symlink():
            raise LayoutError(f"{relpath} in the job folder is a symlink; refusing to write through it")
        if target.exists():
            if target.is_dir():
                raise LayoutError(f"{relpath} in the job folder is a folder, not a file")
            if self._linked and os.path.samefile(target, source):
                return  # already this very file
            target.unlink()
        if self._linked:
            try:
                os.link(source, target)
                return
            except OSError as exc:  # another filesystem, or one without hard links: copies from now on
                log.info("cannot hard-link job files (%s); copying them", exc)
                self._linked = False
        shutil.copyfile(source, target, follow_symlinks=False)
