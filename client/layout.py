"""Job folders: a job's files laid out as on the artist's machine, so that `//` paths resolve.

<cache>/jobs/<host>-<pid>-<token>/<job-id>/ holds the main .blend under its own name and every other file
at its relative place, as hard links to the content store (copies where links cannot be made). Each client
process has its own folder of job folders, named so that no other process anywhere picks the same name
(clients may share a cache: on one machine, in containers on one volume where each is pid 1, or on
NFS), and holds an exclusive lock on its <folder>/.lock for as long as it runs. A process removes its
job folders when it moves to another job and when it stops, and at start-up those whose lock it can take:
their process is gone, wherever it ran. Process ids are never compared: they mean nothing across pid
namespaces and hosts.

Every relative path is checked again here (protocol.manifest.check_relpath), and every place is
re-checked once resolved: nothing lands outside the job folder, and a symlink in the way is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import BinaryIO

from protocol.manifest import Manifest, ManifestError, check_relpath

from .cache import BlendCache

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class LayoutError(Exception):
    """A job's files cannot be laid out safely (a hostile path, a symlink in the way, a full disk)."""


#: A folder of job folders without a .lock (an older client's, or one whose process is just making it) is
#: left alone for this long after its last change.
UNLOCKED_GRACE_S = 600.0
LOCK_NAME = ".lock"
#: os.link failures that mean "no hard links here" (another filesystem, one without links, a policy).
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}
#: The same on Windows: ERROR_INVALID_FUNCTION, ERROR_NOT_SAME_DEVICE, ERROR_NOT_SUPPORTED (FAT, network shares).
_NO_LINKS_WINDOWS = {1, 17, 50}
#: This one file has as many links as its filesystem allows (and ERROR_TOO_MANY_LINKS on Windows).
_TOO_MANY_LINKS, _TOO_MANY_LINKS_WINDOWS = {errno.EMLINK}, {1142}


#: What a lock that another process holds answers (msvcrt says EACCES or EDEADLOCK).
_HELD = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def _try_lock(handle: BinaryIO) -> bool:
    """Take the exclusive lock of an open .lock file without waiting; False when another process holds it.
    Raises OSError where there are no locks (some network filesystems say ENOLCK)."""
    try:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD:
            return False
        raise
    return True


def _own_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:40].strip("_") or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(6)}"


def _errno_in(exc: OSError, codes: set[int], windows: set[int]) -> bool:
    return exc.errno in codes or getattr(exc, "winerror", None) in windows


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
        self._linked = True  # hard links work here (until the filesystem says it has none: then copies)
        self.clean_stale()
        self.root, self._lock = self._claim()

    def _claim(self) -> tuple[Path, BinaryIO]:
        """Make this process's folder and lock it; the .lock appears only once it is locked (POSIX), so that
        no other process ever sees it free while this one is starting."""
        root = self.top / _own_name()
        root.mkdir(parents=True)
        # Windows cannot rename an open file: the .lock is made in place there (a start-up race of
        # microseconds, in which another client could take the lock of this brand-new, empty folder).
        staging = root / (LOCK_NAME if sys.platform == "win32" else f"{LOCK_NAME}.new")
        handle = open(staging, "a+b")  # noqa: SIM115 - held for the life of the process
        try:
            if not _try_lock(handle):  # a fresh name: no one else can hold it
                raise LayoutError(f"cannot lock {staging}: another process holds it")
        except OSError as exc:
            # No locks on this filesystem: no one can take this folder's, so no one removes it (nor any
            # other): safe, but a client that stops without cleaning up leaves its folder behind.
            log.warning("cannot lock %s (%s); stale job folders in %s will not be cleaned up", staging, exc, self.top)
        if staging.name != LOCK_NAME:
            os.replace(staging, root / LOCK_NAME)
        return root, handle

    def clean_stale(self) -> None:
        """Remove the folders of client processes that are gone: those whose lock can be taken."""
        if not self.top.is_dir():
            return
        for entry in self.top.iterdir():
            if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
                continue
            try:
                handle = open(entry / LOCK_NAME, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                # No lock (a client of an older version, or one making its folder right now): by age only.
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > UNLOCKED_GRACE_S:
                        log.info("removing the unlocked job folders %s", entry.name)
                        _remove_tree(entry)
                continue
            except OSError as exc:
                log.debug("cannot open the lock of %s: %s", entry.name, exc)
                continue
            try:
                try:
                    if not _try_lock(handle):
                        continue  # a running client's, here or on another machine or in another container
                except OSError as exc:  # no locks here: whose it is cannot be known, so it stays
                    log.debug("cannot lock %s: %s", entry.name, exc)
                    continue
                log.info("removing the job folders of stopped client process %s", entry.name)
                if sys.platform != "win32":
                    _remove_tree(entry)  # under the lock: no one else removes it at the same time
            finally:
                handle.close()
            if sys.platform == "win32":
                _remove_tree(entry)  # an open file cannot be removed there

    @property
    def linked(self) -> bool:
        """Job folders hold hard links to the store's files (else copies)."""
        return self._linked

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise LayoutError(f"the server named a job badly: {job_id!r}")
        return self.root / job_id

    def remove_others(self, keep: str | None = None) -> None:
        """Remove this process's job folders except the one of job `keep`."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name != keep and _JOB_ID.fullmatch(entry.name):  # never the .lock
                _remove_tree(entry)

    def close(self) -> None:
        if self._lock.closed:
            return
        if self.root.is_dir():
            if sys.platform == "win32":
                self._lock.close()  # an open file cannot be removed there
            _remove_tree(self.root)
        self._lock.close()

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
            except OSError as exc:
                if _errno_in(exc, _NO_LINKS, _NO_LINKS_WINDOWS):
                    # Another filesystem, or one without hard links: copies from now on.
                    log.info("cannot hard-link job files (%s); copying them", exc)
                    self._linked = False
                elif _errno_in(exc, _TOO_MANY_LINKS, _TOO_MANY_LINKS_WINDOWS):
                    log.info("%s: the stored file has all the links it may have; copying this one", relpath)
                else:
                    raise  # a vanished store file, a full disk, no permission: not a reason to copy
        shutil.copyfile(source, target, follow_symlinks=False)
