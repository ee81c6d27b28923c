"""What a .blend needs, found without Blender: blender-asset-tracer (BAT 1.23) followed through linked libraries.

No bpy: tools.submit, the web upload and the add-on (on a worker thread) trace with it; `python -m
tools.trace FILE.blend [--project DIR]` prints a trace.

A project is a folder (by default the .blend's own); inside it every file keeps its relative place.
A file the scene reaches by an absolute path, or outside the project, is placed under `_outside_project/`
in the job and the .blend files that name it are rewritten (BAT's Packer rewrites the path fields in
copies; the originals are never touched). Nothing is copied: BAT's transfer step is replaced by a plan of
(relative path in the job, file to read), so a 2 GB project costs no temporary disk beyond rewritten .blends.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .confine import Confinement, TraceError, TraceLimit

log = logging.getLogger(__name__)

#: Where BAT puts what lies outside the project, inside the job folder.
OUTSIDE_DIR = "_outside_project"
_TRACING = threading.Lock()


@dataclass(frozen=True)
class TracedFile:
    relpath: str  # its place in the job folder (posix, relative to the project root)
    source: Path  # the file to send: the original, or a rewritten copy of a .blend
    original: Path  # where it lies on this disk
    rewritten: bool = False


@dataclass
class Trace:
    main: str
    files: list[TracedFile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # as the artist wrote them where that is known
    outside: list[TracedFile] = field(default_factory=list)  # absolute or outside the project: moved in
    unread: list[str] = field(default_factory=list)  # confined: outside its folder, as written, never looked at

    def pairs(self) -> list[tuple[str, Path]]:
        return [(f.relpath, f.source) for f in self.files]


def bat_available() -> str:
    """'' if BAT can trace here, else the sentence why not."""
    try:
        import blender_asset_tracer  # noqa: F401
        from blender_asset_tracer import pack  # noqa: F401
    except ImportError as exc:
        return (f"blender-asset-tracer is not installed ({exc}); pip install "
                "'blender-asset-tracer==1.23'")
    return ""


def _patch_bat() -> None:
    """BAT 1.23 reads the node tree of every ID from `compositing_node_group` in Blender 5.0 files, where only
    scenes moved theirs: the images of a *linked* material (a library's textures) were never found. Scenes
    keep BAT's lookup; materials, worlds, lights and textures read their own `nodetree` again."""
    from blender_asset_tracer.trace import expanders

    if getattr(expanders, "_microfarm_nodetree_fix", False):
        return

    def nodetree_id(block):  # type: ignore[no-untyped-def]
        field = b"nodetree"
        if block.code == b"SC" and block.bfile.header.version >= 500 and block.bfile.file_subversion >= 4:
            field = b"compositing_node_group"
        try:
            tree = block.get_pointer(field, None)
        except KeyError:
            tree = None
        if tree is not None:
            yield from expanders._expand_generic_nodetree(tree)

    expanders._expand_generic_nodetree_id = nodetree_id
    expanders._microfarm_nodetree_fix = True


def _shown(path: Path, blend_dir: Path) -> str:
    """'//textures/wood.png' for a file below the .blend's folder, else the path itself."""
    try:
        return "//" + path.relative_to(blend_dir).as_posix()
    except ValueError:
        return str(path)


def _stand_in(blend: Path, location: Path) -> None:
    """Open `blend` for BAT as if it lay at `location`: its `//` paths resolve from there, and its place in
    the job is there (the add-on traces a copy of the open file, saved elsewhere with its paths as the
    artist wrote them). Only `blend` is ever read; a rewrite copies `blend`, never the file at `location`."""
    from blender_asset_tracer import blendfile

    class StandIn(blendfile.BlendFile):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(blend)
            self.filepath = location  # BlendFile.abspath resolves `//` against filepath's folder

        def copy_and_rebind(self, path: Path, mode: str = "rb") -> None:
            self.close()
            blendfile._uncache(location)
            shutil.copyfile(blend, path)
            self.fileobj = self._open_file(path, mode=mode)  # filepath becomes the rewritten copy
            blendfile._cache(path, self)

    blendfile._cache(location, StandIn())


@contextlib.contextmanager
def traced(blend: Path, project: Path | None = None, location: Path | None = None, *,
           confine: Confinement | None = None) -> Iterator[Trace]:
    """Trace `blend` inside `project` (default: the folder of its location). Rewritten .blend copies live until
    the block ends. With `location`, `blend` is read as if it lay there (see _stand_in): `//` paths resolve
    from there, the job places it there, and `location` itself is never read. With `confine` (a web upload),
    nothing outside its root is looked at, nothing is rewritten, and its limits hold (see confine.py). One
    trace at a time in a process: BAT's open files are one module-wide cache."""
    if not _TRACING.acquire(timeout=confine.remaining() if confine is not None else -1):
        raise TraceLimit("the server is busy tracing other uploads: try again in a minute")
    try:
        with contextlib.ExitStack() as stack:
            if confine is not None:
                stack.enter_context(confine.active())
            with _traced(blend, project, location, confine) as trace:
                yield trace
    finally:
        _TRACING.release()


@contextlib.contextmanager
def _traced(blend: Path, project: Path | None, location: Path | None, confine: Confinement | None
            ) -> Iterator[Trace]:
    why = bat_available()
    if why:
        raise TraceError(why)
    from blender_asset_tracer import blendfile, bpathlib
    from blender_asset_tracer.blendfile.exceptions import BlendFileError
    from blender_asset_tracer.pack import Packer

    _patch_bat()

    class Planner(Packer):  # type: ignore[misc]
        """BAT's pack, with the copying replaced by a list of what goes where."""

        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self.plan: list[tuple[Path, PurePath, bool]] = []

        def _start_file_transferrer(self) -> None:
            pass

        def _perform_file_transfer(self) -> None:
            for asset_path, action in self._actions.items():
                self._copy_asset_and_deps(asset_path, action)

        def _send_to_target(self, asset_path: Path, target: PurePath, may_move: bool = False) -> None:
            self.plan.append((Path(asset_path), target, may_move))

        # Confined: a path outside is named as written before BAT stats or globs it (confine.py).
        def _visit_asset(self, asset_path, usage) -> None:  # type: ignore[no-untyped-def]
            if confine is None or confine.admits(asset_path, usage.asset_path, _named_in(usage)):
                super()._visit_asset(asset_path, usage)

        def _visit_sequence(self, asset_path, usage) -> None:  # type: ignore[no-untyped-def]
            if confine is None or confine.admits(asset_path, usage.asset_path, _named_in(usage)):
                super()._visit_sequence(asset_path, usage)

        def _rewrite_paths(self) -> None:
            if confine is None:  # a web upload's job is the upload's own files: no rewritten copies
                super()._rewrite_paths()

    def _named_in(usage) -> Path | None:  # type: ignore[no-untyped-def]
        named_in = bpathlib.make_absolute(usage.block.bfile.filepath)
        return None if named_in == place else named_in

    blend = blend.absolute()
    place = bpathlib.make_absolute(location) if location is not None else blend
    root = (project or place.parent).absolute()
    if confine is not None and root != confine.root:
        raise TraceError(f"{blend} is traced confined to {confine.root}, not to {root}")
    try:
        main = place.relative_to(root).as_posix()
    except ValueError:
        raise TraceError(f"{place} is not inside the project folder {root}") from None
    # Never written to: the target only gives the job folder's paths a place to be relative to.
    target = Path(tempfile.gettempdir()) / "microfarm-trace-target"
    with Planner(place, root, str(target)) as packer:
        try:
            if location is not None:
                _stand_in(blend, place)
            packer.strategise()
            packer.execute()
            trace = _trace(packer, place, main, target, blend)
            trace.unread = list(dict.fromkeys(confine.unread)) if confine is not None else []
        except TraceError:
            blendfile.close_all_cached()
            raise
        except OSError as exc:
            blendfile.close_all_cached()
            raise TraceError(f"cannot trace {blend}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, AssertionError, BlendFileError) as exc:
            blendfile.close_all_cached()
            raise TraceError(f"cannot trace {blend}: {exc}") from None
        try:
            yield trace
        finally:
            blendfile.close_all_cached()


def _trace(packer, blend: Path, main: str, target: Path, read: Path) -> Trace:  # type: ignore[no-untyped-def]
    """`blend` is where the main .blend lies (or stands in), `read` the file that holds its bytes."""
    trace = Trace(main=main)
    seen: set[str] = set()
    read_from = {action.read_from: path for path, action in packer._actions.items() if action.read_from}
    for planned, placed, _moved in packer.plan:
        relpath = PurePath(placed).relative_to(target).as_posix()
        if relpath in seen:
            continue
        seen.add(relpath)
        source = read if planned == blend else planned
        original = read_from.get(planned, planned)
        entry = TracedFile(relpath, source, original, rewritten=source in read_from)
        trace.files.append(entry)
        if relpath.startswith(OUTSIDE_DIR + "/"):
            trace.outside.append(entry)
    trace.missing = sorted(_shown(Path(p), blend.parent) for p in packer.missing_files)
    if main not in seen:  # BAT lists the main file as its own first action; be sure of it anyway
        trace.files.insert(0, TracedFile(main, read, blend))
    return trace
