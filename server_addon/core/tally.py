"""Counted log lines for events that strangers can cause at any rate (refused connections, closed slow requests,
failed accepts): the first of each (address, reason) in an interval is logged at once, the rest as one count when
the interval ends. So a flood writes a few lines per address per interval, never a line per event."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from protocol.names import printable

__all__ = ["Tally"]

#: Distinct (address, reason) pairs counted per interval; beyond them events are counted in one "others" line.
MAX_KEYS = 256
#: Count lines written per interval; the rest are summed up in one line.
MAX_LINES = 20
#: What a stranger may put into one line (a role, a path, a header) is cut to this many characters.
MAX_REASON_CHARS = 200


class Tally:
    """`first` and `repeated` are format strings with {address}, {reason}, and for `repeated` also {count} and
    {seconds}. Used on the server's loop only."""

    def __init__(self, logger: logging.Logger, first: str, repeated: str, interval: float,
                 level: int = logging.WARNING) -> None:
        self._log = logger
        self._first = first
        self._repeated = repeated
        self.interval = interval
        self._level = level
        self._counts: Counter[tuple[str, str]] = Counter()  # events after the first, this interval
        self._seen: set[tuple[str, str]] = set()
        self._others = 0
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0

    def note(self, address: str, reason: str) -> None:
        self.total += 1
        address, reason = printable(address)[:MAX_REASON_CHARS], printable(reason)
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + "..."
        key = (address, reason)
        if key in self._seen:
            self._counts[key] += 1
        elif len(self._seen) < MAX_KEYS:
            self._seen.add(key)
            self._log.log(self._level, self._first.format(address=address, reason=reason))
        else:
            self._others += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write the counts of this interval and start a new one."""
        seconds = f"{self.interval:g}"
        ranked = self._counts.most_common()
        for (address, reason), count in ranked[:MAX_LINES]:
            self._log.log(self._level, self._repeated.format(address=address, reason=reason, count=count,
                                                             seconds=seconds))
        rest = sum(count for _, count in ranked[MAX_LINES:]) + self._others
        if rest:
            self._log.log(self._level, "... and %d more like these from other addresses in the last %s s",
                          rest, seconds)
        self._counts.clear()
        self._seen.clear()
        self._others = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
