"""From any thread to Blender's main thread: notices in order, and in one-slot queues the latest FarmView
and FileCheck (the panel only needs the newest); the frames that arrived for Render Current Frame.
Puts never block; takes never wait unless asked to. Plain data only, no bpy.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .project import FileCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    level: str  # "INFO", "WARNING" or "ERROR", as in Operator.report
    text: str


@dataclass(frozen=True)
class FarmView:
    """What the panel shows: the server's snapshot, frozen. Made on the loop thread, read on the main thread."""

    farm: str = ""
    jobs: tuple[Mapping[str, Any], ...] = ()
    clients: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(cls, snapshot: dict[str, Any]) -> FarmView:
        return cls(farm=snapshot.get("farm", ""),
                   jobs=tuple(MappingProxyType(job) for job in snapshot.get("jobs", ())),
                   clients=tuple(MappingProxyType(client) for client in snapshot.get("clients", ())))


class Outbox:
    def __init__(self) -> None:
        self._notices: queue.Queue[Notice] = queue.Queue()
        self._views: queue.Queue[FarmView] = queue.Queue(maxsize=1)
        self._checks: queue.Queue[FileCheck] = queue.Queue(maxsize=1)
        self._results: queue.Queue[Path] = queue.Queue()

    def post(self, level: str, text: str) -> None:
        """A message for the user; the drain shows it in the panel and reports it."""
        (log.error if level == "ERROR" else log.info)("MicroFarm: %s", text)
        self._notices.put(Notice(level, text))

    def put_view(self, view: FarmView) -> None:
        _put_latest(self._views, view)

    def put_check(self, check: FileCheck) -> None:
        _put_latest(self._checks, check)

    def put_result(self, path: Path) -> None:
        self._results.put(path)

    def take_view(self, timeout: float = 0.0) -> FarmView | None:
        try:
            return self._views.get(timeout=timeout) if timeout > 0 else self._views.get_nowait()
        except queue.Empty:
            return None

    def take_check(self) -> FileCheck | None:
        try:
            return self._checks.get_nowait()
        except queue.Empty:
            return None

    def take_notices(self, deadline: float) -> list[Notice]:
        """The waiting notices, in order, until time.perf_counter() passes `deadline` (at least one, if any)."""
        notices: list[Notice] = []
        while not notices or time.perf_counter() < deadline:
            try:
                notices.append(self._notices.get_nowait())
            except queue.Empty:
                break
        return notices

    def take_results(self) -> list[Path]:
        results = []
        with contextlib.suppress(queue.Empty):
            while True:
                results.append(self._results.get_nowait())
        return results


def _put_latest(slot: queue.Queue[Any], item: Any) -> None:
    # One slot: what nobody has drawn yet is replaced by the newer one.
    while True:
        try:
            slot.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                slot.get_nowait()


