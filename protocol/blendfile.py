"""Blender versions: the one that saved a .blend (read from its header) and the ones clients run.

A .blend starts with a header naming the Blender that wrote it, before any compression is undone:

    BLENDER-v405             up to 4.x: pointer size "_"/"-", endianness "v"/"V", version 3 digits
    BLENDER17-01v0500        5.0 on: header size, "-", format version, "v", version 4 digits

Blender 3.0 and newer may compress the whole file with zstd, older ones with gzip; the header is
then the first bytes of the decompressed stream. Only major.minor is in the header.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: How a .blend starts: its header (plain), or the magic of the compression Blender saved it with.
PLAIN_MAGIC = b"BLENDER"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLEND_MAGICS = (PLAIN_MAGIC, ZSTD_MAGIC, GZIP_MAGIC)
#: Bytes of a file's start that looks_like_blend needs.
MAGIC_BYTES = max(len(magic) for magic in BLEND_MAGICS)
#: Enough of the (decompressed) file for either header form.
HEADER_BYTES = 32
#: Compressed bytes read at most to find the header (Blender's first zstd frame is a few KiB).
MAX_COMPRESSED_HEAD = 1 << 20
_HEADER = re.compile(rb"BLENDER(?:[_-][vV](\d{3})|\d{2}-\d{2}[vV](\d{4}))")
_VERSION = re.compile(r"^\s*(\d{1,3})\.(\d{1,3})(?:\.(\d{1,4}))?(?![\d.])")


class BlendHeaderError(ValueError):
    """A file that is not a .blend, or one whose header cannot be read here."""


class HeaderUnreadable(BlendHeaderError):
    """The file is compressed in a way this Python cannot undo (no zstandard module): its version is unknown."""


@dataclass(frozen=True, order=True)
class BlenderVersion:
    major: int
    minor: int
    patch: int | None = None  # a file's header has no patch number; a client's version has one

    @classmethod
    def parse(cls, text: str) -> BlenderVersion | None:
        """'4.2.23 LTS', '5.0.1', '5.3' -> a version; None for anything else."""
        match = _VERSION.match(text or "")
        if match is None:
            return None
        major, minor, patch = match.groups()
        return cls(int(major), int(minor), int(patch) if patch is not None else None)

    @property
    def line(self) -> tuple[int, int]:
        return self.major, self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch is not None else "")


def looks_like_blend(head: bytes) -> bool:
    """Whether a file's first MAGIC_BYTES bytes are those of a .blend: plain, zstd- or gzip-compressed. A quick
    check of what a file claims to be (read_version reads the header itself)."""
    return head.startswith(BLEND_MAGICS)


def parse_header(data: bytes) -> BlenderVersion:
    """The version in the first bytes of a decompressed .blend."""
    match = _HEADER.match(data)
    if match is None:
        raise BlendHeaderError("not a .blend file (no BLENDER header)")
    digits = match.group(1) or match.group(2)
    number = int(digits)
    return BlenderVersion(number // 100, number % 100)


def _zstd_head(raw: BinaryIO) -> bytes:
    try:
        import zstandard  # Blender's Python bundles it; the headless server installs it
    except ImportError:
        raise HeaderUnreadable("the file is zstd-compressed and this Python has no zstandard module "
                               "to read its header") from None
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as reader:
            return reader.read(HEADER_BYTES)
    except zstandard.ZstdError as exc:
        raise BlendHeaderError(f"the zstd-compressed file is damaged: {exc}") from None


def read_version(source: Path | BinaryIO) -> BlenderVersion:
    """The Blender version that saved a .blend: plain, gzip- or zstd-compressed."""
    if isinstance(source, Path):
        with open(source, "rb") as raw:
            return read_version(raw)
    head = source.read(HEADER_BYTES)
    if head.startswith(PLAIN_MAGIC):
        return parse_header(head)
    rest = io.BytesIO(head + source.read(MAX_COMPRESSED_HEAD))
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.GzipFile(fileobj=rest) as reader:
                return parse_header(reader.read(HEADER_BYTES))
        except (OSError, EOFError) as exc:
            raise BlendHeaderError(f"the gzip-compressed file is damaged: {exc}") from None
    if head.startswith(ZSTD_MAGIC):
        return parse_header(_zstd_head(rest))
    raise BlendHeaderError("not a .blend file (no BLENDER header, and neither gzip nor zstd)")
