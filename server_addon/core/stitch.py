"""Stitching a split frame: the tiles' bands, decoded losslessly, joined top to bottom and encoded once.

Runs on a worker thread (never the event loop, never bpy). Tiles are PNG (for PNG and JPEG frames:
the display-referred 8- or 16-bit values Blender wrote) or uncompressed EXR; a tile may be the whole
canvas with only its rows rendered (what Blender writes without "crop to border") or just the rows
it rendered. Only each tile's own band is kept, so the margin rows rendered around it are dropped.
The result appears under its final name by an atomic rename.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from protocol.tiles import TileSpec

from . import exrfile, ffmpeg, pngfile
from .storage import PARTIAL_PREFIX

log = logging.getLogger(__name__)

#: An ffmpeg that encodes a JPEG (used only where Pillow is missing) gets this long.
FFMPEG_TIMEOUT_S = 300.0


class StitchError(Exception):
    """The tiles could not be made into the frame; the message says why."""


def _rows_of(spec: TileSpec, index: int, tile_height: int, what: str) -> tuple[int, int]:
    """Where tile `index`'s band lies inside its file, which holds the whole canvas or the rows rendered."""
    top, bottom = spec.band(index)
    first, last = spec.render_rows(index)
    if tile_height == spec.height:
        return top, bottom
    if tile_height == last - first:
        return top - first, bottom - first
    raise StitchError(f"{what} is {tile_height} rows high; a tile of this frame has {spec.height} or "
                      f"{last - first}")


def stitch(spec: TileSpec, tiles: Sequence[Path], output: Path, file_format: str, *, quality: int = 90,
           exr_codec: str = "ZIP") -> Path:
    """Join the tiles of a split frame into `output` (PNG, JPEG or OPEN_EXR). Raises StitchError."""
    if len(tiles) != spec.tiles:
        raise StitchError(f"{len(tiles)} tile files for {spec.tiles} tiles")
    try:
        fd, name = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=output.suffix, dir=output.parent)
    except OSError as exc:
        raise StitchError(f"cannot write into {output.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    partial = Path(name)
    try:
        if file_format == "OPEN_EXR":
            _stitch_exr(spec, tiles, partial, exr_codec)
        elif file_format in ("PNG", "JPEG"):
            _stitch_png(spec, tiles, partial, file_format, quality)
        else:
            raise StitchError(f"a split frame cannot be written as {file_format}")
        os.replace(partial, output)
    except OSError as exc:
        raise StitchError(f"cannot write {output.name}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return output


def _stitch_png(spec: TileSpec, tiles: Sequence[Path], partial: Path, file_format: str, quality: int) -> None:
    rows: list[bytes] = []
    first: pngfile.PngImage | None = None
    for index, path in enumerate(tiles):
        what = f"tile {index} ({path.name})"
        try:
            image = pngfile.read(path)
        except pngfile.PngError as exc:
            raise StitchError(f"{what} is not a usable PNG: {exc}") from None
        if first is None:
            first = image
        elif (image.width, image.depth, image.color_type) != (first.width, first.depth, first.color_type):
            raise StitchError(f"{what} is {image.width} pixels wide at {image.depth} bits, colour type "
                              f"{image.color_type}; tile 0 is {first.width}, {first.depth}, {first.color_type}")
        top, bottom = _rows_of(spec, index, image.height, what)
        try:
            rows.extend(image.rows(top, bottom))
        except pngfile.PngError as exc:
            raise StitchError(f"{what} is not a usable PNG: {exc}") from None
        del image  # one decoded tile at a time
    assert first is not None
    if file_format == "PNG":
        pngfile.write(partial, first, rows, spec.height)
        return
    if first.depth != 8 or first.color_type not in (0, 2):
        raise StitchError(f"JPEG tiles must be 8-bit grey or RGB, not {first.depth}-bit colour type {first.color_type}")
    _write_jpeg(partial, first.width, spec.height, "L" if first.color_type == 0 else "RGB", b"".join(rows), quality)


def _write_jpeg(path: Path, width: int, height: int, mode: str, pixels: bytes, quality: int) -> None:
    """Encode once: with Pillow (libjpeg's quality scale, like Blender's), else with ffmpeg."""
    try:
        from PIL import Image
    except ImportError:
        _ffmpeg_jpeg(path, width, height, mode, pixels, quality)
        return
    with Image.frombytes(mode, (width, height), pixels) as image:
        image.save(path, "JPEG", quality=max(1, min(quality, 100)))


def jpeg_encoder_available() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return ffmpeg.available()
    return True


def ffmpeg_qscale(quality: int) -> int:
    """ffmpeg's MJPEG quantiser (2 best .. 31 worst) for a libjpeg quality (100 best .. 1 worst)."""
    return max(2, min(31, round(2 + (100 - quality) * 29 / 100)))


def _ffmpeg_jpeg(path: Path, width: int, height: int, mode: str, pixels: bytes, quality: int) -> None:
    try:
        executable = ffmpeg.find()
    except ffmpeg.FfmpegError:
        raise StitchError("encoding a JPEG needs Pillow or ffmpeg on the server, and neither is installed") from None
    pix_fmt = "gray" if mode == "L" else "rgb24"
    command = [*ffmpeg.quiet(executable, stdin=True), "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt,
               "-s", f"{width}x{height}", "-i", "-", "-frames:v", "1", "-c:v", "mjpeg",
               "-q:v", str(ffmpeg_qscale(quality)), "-pix_fmt", "gray" if mode == "L" else "yuvj444p",
               "-f", "image2", str(path)]
    try:
        code, tail = ffmpeg.run_blocking(command, input=pixels, timeout_s=FFMPEG_TIMEOUT_S)
    except ffmpeg.FfmpegTimeout:
        raise StitchError(f"ffmpeg took longer than {FFMPEG_TIMEOUT_S:.0f} s to encode the JPEG") from None
    except ffmpeg.FfmpegError as exc:
        raise StitchError(str(exc)) from None
    if code != 0:
        raise StitchError(f"ffmpeg could not encode the JPEG: {tail[-1] if tail else code}")


def _stitch_exr(spec: TileSpec, tiles: Sequence[Path], partial: Path, exr_codec: str) -> None:
    lines: list[bytes] = []
    first: exrfile.ExrImage | None = None
    for index, path in enumerate(tiles):
        what = f"tile {index} ({path.name})"
        try:
            image = exrfile.read(path)
        except exrfile.ExrError as exc:
            raise StitchError(f"{what} is not a usable EXR: {exc}") from None
        if first is None:
            first = image
        elif (image.width, image.attribute("channels")) != (first.width, first.attribute("channels")):
            raise StitchError(f"{what} has other channels or another width than tile 0")
        top, bottom = _rows_of(spec, index, image.height, what)
        lines.extend(image.lines[top:bottom])
    assert first is not None
    exrfile.write(partial, first, lines, exrfile.CODECS.get(exr_codec, exrfile.ZIP))
