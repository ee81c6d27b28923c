"""Split-frame rendering: how one frame is cut into horizontal bands, shared by server and client.

A split frame of height H in K tiles: tile i keeps the image rows [i*H//K, (i+1)*H//K) (counted from
the top, as in the image file), so the bands cover every row exactly once. A client renders tile i
as a render border that reaches `margin` rows beyond the band on each side (clamped to the image),
so that what looks at neighbouring pixels (the denoiser, compositor blurs) sees the same
surroundings as in a full render; the server keeps only the band's own rows.

Blender turns the border's float fractions into pixels by truncating `border * height` computed in
single precision, so `y / H` itself can land one row short (y=24, H=37 gives row 23). The border
is therefore set half a row past each edge, which truncates to the intended row for any height
Blender accepts (checked with bpy for heights 7 to 4321). Blender counts border rows from the
bottom of the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from .schema import MISSING, TYPE, Int, Rule, record_of, validate

#: At most this many tiles per frame (and never more than the image has rows).
MAX_TILES = 1024
#: Fewer than two tiles is no split at all.
MIN_TILES = 2
#: Rows rendered beyond a band's edges at most (the client asks for what its scene needs).
MAX_MARGIN = 1024
#: Formats a split frame can be stitched into, and the lossless format its tiles travel in.
SPLIT_FORMATS: dict[str, str] = {"PNG": "png", "JPEG": "png", "OPEN_EXR": "exr"}


def band(height: int, tiles: int, index: int) -> tuple[int, int]:
    """The image rows [top, bottom) that tile `index` contributes (rows counted from the top)."""
    return index * height // tiles, (index + 1) * height // tiles


@dataclass(frozen=True)
class TileSpec:
    """How a split frame is cut: sent with every assignment of a split job."""

    frame: int
    tiles: int
    height: int
    margin: Annotated[int, Int(optional=False)] = 0  # on the wire it is always there

    def band(self, index: int) -> tuple[int, int]:
        return band(self.height, self.tiles, index)

    def render_rows(self, index: int) -> tuple[int, int]:
        """The rows [top, bottom) a client renders for tile `index`: its band plus the margin."""
        top, bottom = self.band(index)
        return max(0, top - self.margin), min(self.height, bottom + self.margin)

    def border(self, index: int) -> tuple[float, float]:
        """Blender's (border_min_y, border_max_y) for tile `index` (fractions from the bottom)."""
        top, bottom = self.render_rows(index)
        low, high = self.height - bottom, self.height - top  # rows counted from the bottom
        return (0.0 if low == 0 else (low + 0.5) / self.height,
                1.0 if high == self.height else (high + 0.5) / self.height)

    def to_wire(self) -> dict[str, Any]:
        return {"frame": self.frame, "tiles": self.tiles, "height": self.height, "margin": self.margin}

    @classmethod
    def from_wire(cls, raw: Any) -> TileSpec:
        return cls(**validate(TILE_SPEC, raw))


#: A split as it travels: every field a whole number, all of them there (a margin too), within bounds.
TILE_SPEC = record_of(
    TileSpec, message={TYPE: "split settings must be a map"},
    messages={TYPE: "split settings have a bad {name!r}", MISSING: "split settings have a bad {name!r}"},
    rules=[Rule(lambda v: MIN_TILES <= v["tiles"] <= min(MAX_TILES, v["height"]) and 0 <= v["margin"] <= MAX_MARGIN,
                "split settings are out of bounds: {tiles} tiles of {height} rows, margin {margin}")])
