"""A small OpenEXR scanline reader and writer in pure Python, for stitching split frames.

Reads single-part scanline files without compression (the tiles of a split frame travel that way)
and writes them with no compression, ZIPS or ZIP, keeping every channel and header attribute.
Pixel data is copied byte for byte: half floats stay half floats, floats stay floats.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\x76\x2f\x31\x01"
_TILED, _LONG_NAMES, _DEEP, _MULTIPART = 0x200, 0x400, 0x800, 0x1000
#: Bytes per sample of the pixel types UINT, HALF and FLOAT.
SAMPLE_BYTES = {0: 4, 1: 2, 2: 4}
#: Compressions this module writes, and the scanlines per block of each.
NONE, ZIPS, ZIP = 0, 2, 3
LINES_PER_BLOCK = {NONE: 1, ZIPS: 1, ZIP: 16}
#: Blender's codec names -> what a stitched file is written with (lossless; others become ZIP).
CODECS = {"NONE": NONE, "ZIPS": ZIPS, "ZIP": ZIP}


class ExrError(ValueError):
    """The file is not an EXR this module understands; the message says why."""


@dataclass
class ExrImage:
    version: int
    attributes: list[tuple[str, str, bytes]]  # name, type, value: as in the file
    width: int
    height: int
    line_bytes: int
    lines: list[bytes]  # per scanline, top to bottom: each channel's samples, channels in file order

    def attribute(self, name: str) -> bytes | None:
        return next((value for n, _, value in self.attributes if n == name), None)


def _cstring(blob: bytes, pos: int) -> tuple[str, int]:
    end = blob.index(b"\0", pos)
    return blob[pos:end].decode("latin-1"), end + 1


def _channels(value: bytes) -> list[tuple[str, int, int, int]]:
    channels, pos = [], 0
    while pos < len(value) and value[pos] != 0:
        name, pos = _cstring(value, pos)
        pixel_type, _, x_sampling, y_sampling = struct.unpack("<iiii", value[pos:pos + 16])
        pos += 16
        channels.append((name, pixel_type, x_sampling, y_sampling))
    return channels


def read_header(path: Path) -> dict[str, bytes]:
    """The attributes of an EXR's header, whatever its compression: {name: raw value}."""
    with open(path, "rb") as handle:
        blob = handle.read(1 << 20)
    if blob[:4] != MAGIC:
        raise ExrError("it does not start with the OpenEXR magic number")
    pos, values = 8, {}
    while blob[pos] != 0:
        name, pos = _cstring(blob, pos)
        _, pos = _cstring(blob, pos)
        (size,) = struct.unpack("<i", blob[pos:pos + 4])
        values[name] = blob[pos + 4:pos + 4 + size]
        pos += 4 + size
    return values


def read(path: Path) -> ExrImage:
    blob = path.read_bytes()
    try:
        return _parse(blob)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, ExrError):
            raise
        raise ExrError(f"it is truncated or corrupt ({exc})") from None


def _parse(blob: bytes) -> ExrImage:
    if blob[:4] != MAGIC:
        raise ExrError("it does not start with the OpenEXR magic number")
    (version,) = struct.unpack("<I", blob[4:8])
    if version & (_TILED | _DEEP | _MULTIPART):
        raise ExrError("tiled, deep and multi-part EXR files are not supported")
    pos, attributes = 8, []
    while blob[pos] != 0:
        name, pos = _cstring(blob, pos)
        kind, pos = _cstring(blob, pos)
        (size,) = struct.unpack("<i", blob[pos:pos + 4])
        attributes.append((name, kind, blob[pos + 4:pos + 4 + size]))
        pos += 4 + size
    pos += 1
    values = {name: value for name, _, value in attributes}
    for required in ("channels", "compression", "dataWindow", "lineOrder"):
        if required not in values:
            raise ExrError(f"its header has no {required}")
    if values["compression"][0] != NONE:
        raise ExrError(f"its compression ({values['compression'][0]}) is not NONE")
    if values["lineOrder"][0] != 0:
        raise ExrError("its scanlines are not stored top to bottom")
    channels = _channels(values["channels"])
    if not channels or any(c[1] not in SAMPLE_BYTES or c[2] != 1 or c[3] != 1 for c in channels):
        raise ExrError("it has no channels, or channels with an unknown type or subsampling")
    x_min, y_min, x_max, y_max = struct.unpack("<iiii", values["dataWindow"])
    width, height = x_max - x_min + 1, y_max - y_min + 1
    if width < 1 or height < 1:
        raise ExrError("its data window is empty")
    line_bytes = width * sum(SAMPLE_BYTES[c[1]] for c in channels)
    offsets = struct.unpack(f"<{height}Q", blob[pos:pos + 8 * height])
    lines = []
    for number, offset in enumerate(offsets):
        y, size = struct.unpack("<ii", blob[offset:offset + 8])
        if y != y_min + number or size != line_bytes or offset + 8 + size > len(blob):
            raise ExrError(f"scanline {number} is not where or as long as its header says")
        lines.append(blob[offset + 8:offset + 8 + size])
    return ExrImage(version, attributes, width, height, line_bytes, lines)


def _box(width: int, height: int) -> bytes:
    return struct.pack("<iiii", 0, 0, width - 1, height - 1)


def _delta(data: bytes) -> bytes:
    """OpenEXR's ZIP predictor: every byte minus the one before it, plus 128 (modulo 256), at C speed."""
    if len(data) < 2:
        return data
    x, y = data[1:], data[:-1]
    n = len(x)
    high = int.from_bytes(b"\x80" * n, "big")
    a, b = int.from_bytes(x, "big"), int.from_bytes(y, "big")
    low = int.from_bytes(b"\x7f" * n, "big")
    diff = ((a | high) - (b & low)) ^ ((a ^ b ^ high) & high)
    return data[:1] + (diff ^ high).to_bytes(n, "big")


def _zip_block(raw: bytes) -> bytes:
    packed = zlib.compress(_delta(raw[0::2] + raw[1::2]), 6)
    return packed if len(packed) < len(raw) else raw  # OpenEXR stores a block raw when that is smaller


def write(path: Path, template: ExrImage, lines: Sequence[bytes], compression: int = ZIP) -> None:
    """Write scanlines as an EXR with `template`'s channels and attributes, the size of `lines`."""
    if compression not in LINES_PER_BLOCK:
        raise ExrError(f"compression {compression} cannot be written")
    height = len(lines)
    if any(len(line) != template.line_bytes for line in lines):
        raise ExrError("a scanline has the wrong length")
    header = bytearray(MAGIC + struct.pack("<I", template.version & ~(_TILED | _DEEP | _MULTIPART)))
    replaced = {"compression": bytes([compression]), "dataWindow": _box(template.width, height),
                "displayWindow": _box(template.width, height)}
    for name, kind, value in template.attributes:
        value = replaced.get(name, value)
        header += name.encode("latin-1") + b"\0" + kind.encode("latin-1") + b"\0" + struct.pack("<i", len(value))
        header += value
    header += b"\0"
    per_block = LINES_PER_BLOCK[compression]
    blocks = []
    for first in range(0, height, per_block):
        raw = b"".join(lines[first:first + per_block])
        data = raw if compression == NONE else _zip_block(raw)
        blocks.append(struct.pack("<ii", first, len(data)) + data)
    offsets, position = [], len(header) + 8 * len(blocks)
    for block in blocks:
        offsets.append(position)
        position += len(block)
    with open(path, "wb") as out:
        out.write(header)
        out.write(struct.pack(f"<{len(offsets)}Q", *offsets))
        for block in blocks:
            out.write(block)
