"""The server's background tasks: every coroutine the server starts runs as one of these, so that a stop
can wait for them or cancel them, and a task that fails is logged instead of vanishing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Spawner(Protocol):
    """What a part of the server needs to start work in the background."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...


class Tasks:
    """Runs on the server's loop; every method is called from it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.adopt(task, log_failure=True)
        return task

    def adopt(self, task: asyncio.Task[Any], *, log_failure: bool = False) -> None:
        """Track a task started elsewhere (a connection handler) until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._done_logged if log_failure else self._tasks.discard)

    def _done_logged(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
