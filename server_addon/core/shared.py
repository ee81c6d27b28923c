"""A farm on shared storage: only the .blend travels, and the clients read everything else where it lies.

The .blend is laid out in a job folder on each client, where its `//` paths would point at nothing: a copy is
sent whose own relative paths (images, fonts, libraries, sounds, caches files...) are made absolute, as they
resolve on the submitting machine. Absolute paths stay as they are; a client reaches them through its
`--path-map FROM=TO` prefixes (client.pathmap). The libraries' own paths are not touched: each is read where it
lies, so its `//` paths resolve there. No bpy: BAT rewrites the path fields of the copy.

Baked point caches (//blendcache_<name>/) are found by the .blend's folder, not by a path field: they are
named, not rewritten (see `unreachable`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .trace import TraceError, bat_available


@dataclass
class SharedCopy:
    path: Path  # the copy to send
    rewritten: list[tuple[str, str]] = field(default_factory=list)  # (as written, absolute)
    unreachable: list[str] = field(default_factory=list)  # relative to the .blend's folder, and no field to say so


@contextlib.contextmanager
def absolute_copy(blend: Path) -> Iterator[SharedCopy]:
    """A temporary copy of `blend` whose own `//` paths are absolute (removed when the block ends)."""
    why = bat_available()
    if why:
        raise TraceError(why)
    from blender_asset_tracer import blendfile, trace
    from blender_asset_tracer.blendfile.exceptions import BlendFileError

    blend = blend.absolute()
    folder = os.fsencode(blend.parent)
    with tempfile.TemporaryDirectory(prefix="microfarm-shared-") as scratch:
        result = SharedCopy(Path(scratch) / blend.name)
        try:
            usages = [u for u in trace.deps(blend) if u.block.bfile.filepath == blend]
            bfile = blendfile.open_cached(blend, assert_cached=True)
            bfile.copy_and_rebind(result.path, mode="rb+")
            try:
                for usage in usages:
                    written = bytes(usage.asset_path)
                    if not written.startswith(b"//"):
                        continue  # absolute: the client maps its prefix
                    if usage.block.dna_type_name == "PointCache":
                        result.unreachable.append(written.decode(errors="replace"))
                        continue
                    absolute = folder + b"/" + written[2:]
                    block = bfile.dereference_pointer(usage.block.addr_old)
                    if usage.path_full_field is not None:
                        block.set(usage.path_full_field.name.name_only, absolute)
                    else:  # a directory field (sequencer strips): the folder alone
                        assert usage.path_dir_field is not None
                        block.set(usage.path_dir_field.name.name_only, absolute.rsplit(b"/", 1)[0] + b"/")
                    result.rewritten.append((written.decode(errors="replace"), absolute.decode(errors="replace")))
            finally:
                bfile.close()
        except OSError as exc:
            raise TraceError(f"cannot read {blend}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, AssertionError, BlendFileError) as exc:
            raise TraceError(f"cannot rewrite the paths of {blend}: {exc}") from None
        finally:
            blendfile.close_all_cached()
        yield result
