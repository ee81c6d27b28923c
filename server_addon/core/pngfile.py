"""A small PNG reader and writer in pure Python, for stitching split frames (no bpy, no Pillow).

Reads non-interlaced PNGs of any bit depth and colour type but palette, row by row; writes them
back with the "Up" filter and zlib. Lossless both ways: the stitched frame has exactly the pixel
values Blender wrote into the tiles. Rows that use no filter or "Up" decode at C speed (whole rows
as big integers); "Sub", "Average" and "Paeth" rows take a Python loop per byte.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Samples per pixel of each colour type (palette images are not supported).
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
#: Size of the IDAT chunks written.
IDAT_BYTES = 1 << 20
#: Ancillary chunks that describe the pixels' geometry: not copied into a stitched image.
_GEOMETRY_CHUNKS = {b"oFFs", b"sPLT", b"hIST"}


class PngError(ValueError):
    """The file is not a PNG this reader understands; the message says why."""


@dataclass
class PngImage:
    width: int
    height: int
    depth: int
    color_type: int
    ancillary: list[tuple[bytes, bytes]] = field(default_factory=list)  # chunks before the pixels
    data: bytes = b""  # the zlib-decompressed IDAT stream: one filter byte, then the row, per row

    @property
    def bytes_per_pixel(self) -> int:
        return max(1, CHANNELS[self.color_type] * self.depth // 8)

    @property
    def stride(self) -> int:
        return (self.width * CHANNELS[self.color_type] * self.depth + 7) // 8

    def rows(self, first: int, last: int) -> list[bytes]:
        """The unfiltered rows [first, last). Decoding starts at the nearest row at or above `first`
        that does not depend on the row before it, so rows far above are never touched."""
        if not 0 <= first <= last <= self.height:
            raise PngError(f"rows {first}-{last} are outside an image {self.height} rows high")
        stride, data = self.stride, self.data
        start = first
        while start > 0 and data[start * (stride + 1)] not in (0, 1):
            start -= 1
        previous = bytes(stride)
        out: list[bytes] = []
        for y in range(start, last):
            offset = y * (stride + 1)
            row = _unfilter(data[offset], data[offset + 1:offset + 1 + stride], previous, self.bytes_per_pixel)
            if y >= first:
                out.append(row)
            previous = row
        return out


def read_chunks(blob: bytes) -> Iterator[tuple[bytes, bytes]]:
    if not blob.startswith(SIGNATURE):
        raise PngError("it does not start with the PNG signature")
    pos = len(SIGNATURE)
    while pos + 12 <= len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        kind = blob[pos + 4:pos + 8]
        body = blob[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(blob):
            raise PngError("it is truncated")
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise PngError(f"its {kind.decode(errors='replace')} chunk is corrupt")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length
    raise PngError("it ends without an IEND chunk")


def read(path: Path) -> PngImage:
    image: PngImage | None = None
    compressed: list[bytes] = []
    for kind, body in read_chunks(path.read_bytes()):
        if kind == b"IHDR":
            width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if color_type not in CHANNELS:
                raise PngError(f"colour type {color_type} (palette) is not supported")
            if interlace:
                raise PngError("interlaced PNGs are not supported")
            image = PngImage(width, height, depth, color_type)
        elif image is None:
            raise PngError("it does not start with an IHDR chunk")
        elif kind == b"IDAT":
            compressed.append(body)
        elif kind != b"IEND" and not compressed and kind[0:1].islower() and kind not in _GEOMETRY_CHUNKS:
            image.ancillary.append((kind, body))
    if image is None or not compressed:
        raise PngError("it holds no image data")
    try:
        image.data = zlib.decompress(b"".join(compressed))
    except zlib.error as exc:
        raise PngError(f"its image data is corrupt ({exc})") from None
    if len(image.data) < image.height * (image.stride + 1):
        raise PngError("its image data is shorter than its size says")
    return image


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write(path: Path, template: PngImage, rows: Iterable[bytes], height: int, level: int = 6) -> None:
    """Write rows as a PNG shaped like `template` (width, depth, colour type, its ancillary chunks)."""
    stride = template.stride
    compressor = zlib.compressobj(level)
    parts: list[bytes] = []
    previous: bytes | None = None
    count = 0
    for row in rows:
        if len(row) != stride:
            raise PngError(f"row {count} has {len(row)} bytes, not {stride}")
        if previous is None:
            parts.append(compressor.compress(b"\x00" + row))
        else:
            parts.append(compressor.compress(b"\x02" + _bytewise(row, previous, subtract=True)))
        previous = row
        count += 1
    if count != height:
        raise PngError(f"{count} rows for an image {height} rows high")
    parts.append(compressor.flush())
    idat = b"".join(parts)
    header = struct.pack(">IIBBBBB", template.width, height, template.depth, template.color_type, 0, 0, 0)
    with open(path, "wb") as out:
        out.write(SIGNATURE + _chunk(b"IHDR", header))
        for kind, body in template.ancillary:
            out.write(_chunk(kind, body))
        for start in range(0, len(idat), IDAT_BYTES):
            out.write(_chunk(b"IDAT", idat[start:start + IDAT_BYTES]))
        out.write(_chunk(b"IEND", b""))


# --- filters ------------------------------------------------------------------------------------

_MASKS: dict[int, tuple[int, int]] = {}


def _masks(length: int) -> tuple[int, int]:
    masks = _MASKS.get(length)
    if masks is None:
        masks = _MASKS[length] = (int.from_bytes(b"\x80" * length, "big"), int.from_bytes(b"\x7f" * length, "big"))
    return masks


def _bytewise(x: bytes, y: bytes, subtract: bool = False) -> bytes:
    """(x + y) or (x - y) modulo 256 for every byte, on whole rows at once (SWAR on big integers)."""
    high, low = _masks(len(x))
    a, b = int.from_bytes(x, "big"), int.from_bytes(y, "big")
    if subtract:
        value = ((a | high) - (b & low)) ^ ((a ^ b ^ high) & high)
    else:
        value = ((a & low) + (b & low)) ^ ((a ^ b) & high)
    return value.to_bytes(len(x), "big")


def _unfilter(kind: int, line: bytes, previous: bytes, bpp: int) -> bytes:
    if kind == 0:
        return bytes(line)
    if kind == 2:
        return _bytewise(line, previous)
    row = bytearray(line)
    n = len(row)
    if kind == 1:
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif kind == 3:
        for i in range(min(bpp, n)):
            row[i] = (row[i] + (previous[i] >> 1)) & 0xFF
        for i in range(bpp, n):
            row[i] = (row[i] + ((row[i - bpp] + previous[i]) >> 1)) & 0xFF
    elif kind == 4:
        for i in range(min(bpp, n)):
            row[i] = (row[i] + previous[i]) & 0xFF
        for i in range(bpp, n):
            a, b, c = row[i - bpp], previous[i], previous[i - bpp]
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    else:
        raise PngError(f"unknown PNG filter type {kind}")
    return bytes(row)
