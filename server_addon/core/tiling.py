"""How many tiles a split frame gets when it asked for "auto": from how fast the clients that can
take it are, measured on the frames they delivered. Pure numbers, no farm state."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from protocol.limits import MAX_RENDER_S
from protocol.tiles import MAX_TILES, MIN_TILES

from .jobs import FrameState, Job


def client_speeds(jobs: Iterable[Job]) -> dict[str, float]:
    """Each client's speed relative to the others (1.0: typical), from the items it delivered.

    Jobs differ in cost, so speeds are compared within a job: a client's mean item time on a job
    against the mean over that job's clients; a client's speed is the mean of those ratios."""
    ratios: dict[str, list[float]] = {}
    for job in jobs:
        times: dict[str, list[float]] = {}
        for frame in job.frames.values():
            # A time that is no usable number (NaN, infinite, 0, negative: from an older database, or
            # anything the protocol let by) says nothing about speed, and would poison every mean.
            if (frame.state is FrameState.DONE and frame.render_s is not None and 0 < frame.render_s <= MAX_RENDER_S
                    and frame.rendered_by):
                times.setdefault(frame.rendered_by, []).append(frame.render_s)
        means = {name: statistics.fmean(values) for name, values in times.items()}
        if not means:
            continue
        typical = statistics.fmean(means.values())
        for name, mean in means.items():
            ratios.setdefault(name, []).append(typical / mean)
    return {name: statistics.fmean(values) for name, values in ratios.items()}


def tile_count(names: list[str], measured: dict[str, float]) -> int:
    """The tile count for the n clients `names` (see Farm.auto_tiles); unmeasured ones count at the
    median measured speed. K = round(sum(speed) / min(speed)), at least n and at most 4n."""
    if not names:
        return MIN_TILES
    usable = {n: s for n, s in measured.items() if math.isfinite(s) and s > 0}  # a zero speed would divide by 0
    known = [usable[n] for n in names if n in usable]
    default = statistics.median(known) if known else 1.0
    speeds = [usable.get(n, default) for n in names]
    ratio = sum(speeds) / min(speeds)
    count = round(ratio) if math.isfinite(ratio) else 4 * len(names)  # beyond floats: the most tiles
    return max(MIN_TILES, min(max(count, len(names)), 4 * len(names), MAX_TILES))
