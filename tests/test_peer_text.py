"""Text a peer sends (errors, render logs, warnings, probe errors, names) never carries CR, LF, ANSI escapes or other
control characters into a log line or onto the operator's terminal: shown as escapes, except the line breaks of a
render log that `tools.jobs log` prints on purpose."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Farm, repo_env
from scripted_farm import ScriptedClient, write_blend

from protocol import messages as m
from protocol.names import printable
from tools.control import Control
from tools.localfarm import REPO

#: A forged log line, a colour, a screen clear, a carriage return over the line, a bell, a right-to-left override.
HOSTILE = "boom\r\n2026-01-01 00:00:00 ERROR server: forged line\x1b[31m red\x1b[2J\rover\x07\u202eevil"


def _clean(text: str) -> bool:
    return not any(ch in text for ch in "\r\n\x1b\x07\u202e")


@pytest.mark.unit
def test_printable_shows_control_characters_as_escapes() -> None:
    assert printable("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    shown = printable(HOSTILE)
    assert _clean(shown) and shown.isprintable()
    assert "\\r\\n2026" in shown and "\\x1b[31m" in shown and "\\x07" in shown and "\\u202e" in shown
    lines = printable("frame 1\r\nframe 2\n\x1b[1mbold\x1b[0m\tcol\rback", lines=True)
    assert lines == "frame 1\nframe 2\n\\x1b[1mbold\\x1b[0m\tcol\\rback"
    assert printable(ValueError("a\nb")) == "a\\nb"


def _tool(port: int, *args: str) -> str:
    command = [sys.executable, "-m", args[0], "--server", f"127.0.0.1:{port}", *args[1:]]
    done = subprocess.run(command, cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.integration
def test_worker_text_reaches_logs_and_tools_cleaned(farm: Farm, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[str, str]:
        control = await Control.connect(farm.address, None, name="t")
        client = await ScriptedClient.join(farm.port, "A")
        try:
            probing = (await control.submit(write_blend(tmp_path / "a.blend", "a"), {"chunk": 1}))[0]
            await client.report("idle")
            probe = await client.expect(m.Probe)
            async with client._lock:  # a probe that fails with hostile text
                await client.stream.send(m.ProbeResult(lease_id=probe.lease_id, ok=False, error=HOSTILE))
            rendering = (await control.submit(write_blend(tmp_path / "b.blend", "b"),
                                              {"frame_start": 1, "frame_end": 2, "chunk": 2}))[0]
            probe = await client.expect(m.Probe)
            await client.probe_result(probe, 2)
            assign = await client.expect(m.Assign)
            await client.report("rendering", assign.lease_id, rendering, 1)
            async with client._lock:
                await client.stream.send(m.FrameFailed(lease_id=assign.lease_id, job_id=rendering, frame=1,
                                                       error=HOSTILE, log="Fra:1 Mem:1M\r\n" + HOSTILE))
            await asyncio.to_thread(farm.wait_until, lambda s: s.farm.jobs[rendering].frames[1].failures == 1,
                                    10, "the failure counted")
            return probing, rendering
        finally:
            await client.close()
            await control.close()

    with caplog.at_level(logging.INFO):
        probing, rendering = asyncio.run(main())
    farm.wait_until(lambda s: s.farm.jobs[probing].state.value in ("failed", "probing"), 10)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("server_addon")]
    hostile = [line for line in lines if "forged line" in line]
    assert hostile, lines  # the text was logged, and each line is one clean line
    assert all(_clean(line) for line in lines), [line for line in lines if not _clean(line)]

    status = _tool(farm.port, "tools.status")
    assert "\x1b" not in status and "\u202e" not in status and "\x07" not in status
    log = _tool(farm.port, "tools.jobs", "log", rendering, "1")
    assert "\x1b" not in log and "\x07" not in log and "\r" not in log and "\u202e" not in log
    assert "Fra:1 Mem:1M\nboom\n2026-01-01" in log, log  # the render log keeps its lines
    error_line = next(line for line in log.splitlines() if line.startswith("error: "))
    assert "boom\\r\\n2026" in error_line  # the one-line error shows its breaks as escapes
