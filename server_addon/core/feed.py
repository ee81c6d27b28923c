"""The change feed: a version that moves on every change a viewer may see, and a way to wait for it.

The service bumps it once per unit of work (see service.FarmService.unit); pages, watchers and the add-on
read or wait on it. Listeners are called on the server's loop, after the change, and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class ChangeFeed:
    def __init__(self) -> None:
        self._version = 0
        self._changed: asyncio.Event | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def version(self) -> int:
        """The state version: it moves on every change (see wait_change)."""
        return self._version

    def listen(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change (on the server's loop)."""
        self._listeners.append(listener)

    def bump(self) -> None:
        self._version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a broken listener must not take the server down
                log.exception("change listener failed")

    async def wait_change(self, version: int, timeout: float) -> int:
        """Wait until the state version moves past `version`; returns the current version."""
        if self._version == version:
            if self._changed is None:
                self._changed = asyncio.Event()
            event = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        return self._version
