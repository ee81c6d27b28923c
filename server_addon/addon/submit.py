"""Turning the saved copy of the open file into a job's .blend, off Blender's UI thread: pack its external
files if asked (in a separate Blender process). Tracing, hashing and storing the project: project.py.

The operator has already saved the copy (bpy work, on the main thread) inside the store's folder,
so the final move is a rename on one filesystem. No bpy here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from protocol.settings import JobRequest

from .errors import Cancelled, FarmError, sentence

log = logging.getLogger(__name__)

#: Packing a big production file can take a while; past this it is given up.
PACK_TIMEOUT_S = 900.0
HASH_BLOCK_BYTES = 1 << 20
PACKED_MARK = "MICROFARM-PACKED"

# Opens the copy in a separate Blender, packs every external file into it and saves it over itself.
# It finds the copy's path after "--" (Blender's binary and `python -c` both keep it in sys.argv), then the
# folder its `//` paths are relative to (the open file's: the copy keeps the artist's paths, which do not
# resolve from where it lies): those are made absolute for packing, and images get their `//` path back.
PACK_SCRIPT = f"""\
import sys
import bpy
path, base = (sys.argv[sys.argv.index("--") + 1:] + [""])[:2]
bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
bpy.context.preferences.filepaths.save_version = 0
written = []
for data in (bpy.data.images, bpy.data.fonts, bpy.data.sounds, bpy.data.volumes):
    for block in data:
        raw = getattr(block, "filepath", "")
        if base and block.library is None and block.packed_file is None and raw.startswith("//"):
            absolute = bpy.path.abspath(raw, start=base)
            if hasattr(block, "filepath_raw"):
                block.filepath_raw = absolute
                written.append((block, raw))
            else:
                block.filepath = absolute
bpy.ops.file.pack_all()
for block, raw in written:
    block.filepath_raw = raw
bpy.ops.wm.save_mainfile(filepath=path, relative_remap=False)
print({PACKED_MARK!r}, flush=True)
"""


@dataclass(frozen=True)
class JobSubmission:
    """A job to create from a saved copy of the open file."""

    blend: Path  # the copy, inside the server's .blend store folder, its `//` paths as the artist wrote them
    name: str
    request: JobRequest
    location: Path | None = None  # the open file, whose folder is the project (None: never saved)
    pack: bool = True
    priority: int = 0
    video: dict[str, str] | None = None
    show_result: bool = False  # load the (one) frame into Blender's Image Editor when it is done
    check_only: bool = False  # Check Files: find what would travel, send nothing


@dataclass
class Work:
    """What shutdown must be able to stop: a flag the workers check, and their child processes."""

    cancel: threading.Event = field(default_factory=threading.Event)
    procs: set[subprocess.Popen[bytes]] = field(default_factory=set)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("MicroFarm is shutting down")

    def kill(self) -> None:
        self.cancel.set()
        for proc in list(self.procs):
            try:
                proc.kill()
            except OSError:
                pass


def pack_command(blend: Path, blender: str = "", python: str = sys.executable, base: Path | None = None) -> list[str]:
    """The process that packs external files into `blend` (whose `//` paths are relative to `base`): Blender's
    own binary when there is one, else (PyPI's bpy, where bpy.app.binary_path is empty) this Python, which
    has bpy."""
    where = [str(blend)] + ([str(base)] if base is not None else [])
    if blender:
        return [blender, "--background", "--factory-startup", "--disable-autoexec", "--python-exit-code", "1",
                "--python-expr", PACK_SCRIPT, "--", *where]
    return [python, "-c", PACK_SCRIPT, "--", *where]


def error_line(output: str) -> str:
    """The line of a failed Blender run worth showing: its last error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        _, sep, tail = line.rpartition("Error:")  # "RuntimeError: Error: ..." -> the text after the last
        if sep and tail.strip():
            return sentence(tail)
    return sentence(lines[-1]) if lines else "it printed nothing."


def pack(blend: Path, work: Work, blender: str = "", base: Path | None = None) -> None:
    """Pack the external files of `blend` into it, in a separate process. Raises FarmError."""
    proc = subprocess.Popen(pack_command(blend, blender, base=base), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    work.procs.add(proc)
    try:
        try:
            output, _ = proc.communicate(timeout=PACK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise FarmError(f"Packing the textures took longer than {PACK_TIMEOUT_S:.0f} s; "
                            "the job was not created.") from None
    finally:
        work.procs.discard(proc)
    work.check()
    text = output.decode(errors="replace")
    if proc.returncode != 0 or PACKED_MARK not in text:
        log.error("MicroFarm: packing %s failed (exit status %s):\n%s", blend.name, proc.returncode, text)
        raise FarmError(f"Could not pack the textures into the copy for the farm: {error_line(text)}")


def discard(job: JobSubmission) -> None:
    """Remove the copy (and a backup a save may have left next to it), whatever happened."""
    for leftover in (job.blend, job.blend.with_name(job.blend.name + "1")):
        try:
            leftover.unlink()
        except OSError:
            pass
