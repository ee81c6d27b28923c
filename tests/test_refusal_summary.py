"""A render client whose secret the farm does not share retries without writing a warning each time: one warning,
then now and then a counted line, while it keeps trying (real server, real TCP)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import Farm

from client.cache import BlendCache
from client.link import Link, fixed_target

pytestmark = pytest.mark.integration


def test_a_client_with_the_wrong_secret_warns_once_then_counts(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    farm = Farm(tmp_path / "out", secret="the farm's secret")
    link = Link(fixed_target("127.0.0.1", farm.port), name="c", secret="another secret",
                cache=BlendCache(tmp_path / "cache"))
    link._core.refusal_summary_s = 1.0  # a summary a second, not every ten minutes
    try:
        with caplog.at_level(logging.DEBUG, logger="client.connection"):
            link.start()
            farm.wait_until(lambda s: s.stats.connections_refused >= 4, 60, "four attempts refused")
            link.stop()
    finally:
        farm.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "client.connection"
                and r.levelno >= logging.WARNING]
    tries = [r for r in caplog.records if r.name == "client.connection" and "refused again" in r.getMessage()]
    first = [w for w in warnings if "could not prove it knows the farm secret" in w and "skipping it" in w]
    summaries = [w for w in warnings if "refused" in w and "more time" in w and "in the last" in w]
    assert len(first) == 1, warnings
    assert summaries, warnings
    assert len(warnings) == len(first) + len(summaries), warnings
    assert len(warnings) < 1 + len(tries) + len(summaries), "a warning for every retry"
