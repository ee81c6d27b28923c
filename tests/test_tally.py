"""Counted log lines (server_addon.core.tally): a flood of events writes a few lines, not one per event."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server_addon.core.tally import MAX_KEYS, MAX_LINES, Tally

pytestmark = pytest.mark.unit

log = logging.getLogger("test_tally")


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test_tally"]


def make() -> Tally:
    return Tally(log, "refused {address}: {reason}", "refused {count} more from {address} in {seconds} s: {reason}",
                 interval=0.05)


@pytest.mark.asyncio
async def test_the_first_is_said_at_once_and_the_rest_counted_at_the_end_of_the_interval(caplog) -> None:
    caplog.set_level(logging.INFO, logger="test_tally")
    tally = make()
    for _ in range(1000):
        tally.note("10.0.0.5", "slots full")
    tally.note("10.0.0.6", "slots full")
    assert lines(caplog) == ["refused 10.0.0.5: slots full", "refused 10.0.0.6: slots full"]
    await asyncio.sleep(0.2)  # (past the interval: its timer writes the counts)
    assert lines(caplog)[2:] == ["refused 999 more from 10.0.0.5 in 0.05 s: slots full"]
    # A new interval starts with its own first line.
    tally.note("10.0.0.5", "slots full")
    tally.close()
    assert lines(caplog)[3:] == ["refused 10.0.0.5: slots full"]
    assert tally.total == 1002


@pytest.mark.asyncio
async def test_many_addresses_are_bounded_too(caplog) -> None:
    caplog.set_level(logging.INFO, logger="test_tally")
    tally = make()
    for n in range(5000):
        for _ in range(3):
            tally.note(f"10.1.{n // 256}.{n % 256}", "slots full")
    tally.close()
    # One first line per distinct address up to MAX_KEYS, MAX_LINES count lines, one line for all the rest.
    assert len(lines(caplog)) == MAX_KEYS + MAX_LINES + 1
    assert lines(caplog)[-1].startswith("... and ")


@pytest.mark.asyncio
async def test_what_a_stranger_sends_is_cleaned_and_cut(caplog) -> None:
    caplog.set_level(logging.INFO, logger="test_tally")
    tally = make()
    tally.note("10.0.0.5", "unknown role '" + "x" * 12_000 + "'")
    tally.note("10.0.0.6", "path /metrics\n2026-12-02 INFO forged line \x1b[31m")
    tally.close()
    first, second = lines(caplog)[:2]
    assert len(first) < 300 and first.endswith("...")
    assert "\n" not in second and "\x1b" not in second and "\\n2026" in second
