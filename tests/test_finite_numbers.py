"""Every number from the network is finite and in range, and the JSON the web sends is always valid."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Clients, Farm, submit
from web_support import Http, start_web_on, stop_web

from protocol import messages as m
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.framing import encode, read_frame
from protocol.handshake import client_handshake
from protocol.limits import MAX_RENDER_S
from protocol.messages import Role
from protocol.settings import SceneInfo
from protocol.stream import MessageStream
from server_addon.core import tiling
from server_addon.web import jsonout

pytestmark = pytest.mark.unit

TIMEOUT = 10.0
BLENDER = "5.0.1"  # the version of the test venv's bpy, which saved the test scene: the job's probe comes to us
SCENE = {"scene": "Scene", "engine": "CYCLES", "frame_start": 1, "frame_end": 12, "frame_step": 1, "fps": 24.0,
         "resolution_x": 64, "resolution_y": 36, "percentage": 100, "file_format": "PNG"}
BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, 1e308]


def strict_json(data: bytes | str) -> Any:
    """json.loads as a browser parses: NaN, Infinity and -Infinity are errors."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"invalid JSON: {name}")
    return json.loads(data, parse_constant=refuse)


# --- the schemas ---------------------------------------------------------------------------------

def frame_begin(render_s: Any) -> dict[str, Any]:
    return {**m.FrameBegin(lease_id=1, job_id="j", frame=1, ext="png", size=1).to_wire(), "render_s": render_s}


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_a_render_time_that_is_no_number_or_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ProtocolError, match="render_s"):
        m.from_wire(frame_begin(value))


@pytest.mark.parametrize("value", [0, 0.0, 0.25, 3, MAX_RENDER_S])
def test_real_render_times_pass(value: float) -> None:
    assert m.from_wire(frame_begin(value)).render_s == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1e308])
def test_a_heartbeat_interval_from_a_server_is_checked(value: float) -> None:
    with pytest.raises(ProtocolError, match="heartbeat_s"):
        m.from_wire({"t": "accepted", "client_id": "c1", "heartbeat_s": value})
    assert m.from_wire({"t": "accepted", "client_id": "c1", "heartbeat_s": 0.3}).heartbeat_s == 0.3


@pytest.mark.parametrize("payload", [
    {"t": "probe_result", "lease_id": 1, "ok": True, "scene": {**SCENE, "fps": math.nan}},
    {"t": "probe_result", "lease_id": 1, "ok": True, "scene": {"deep": [[{"x": [math.inf]}]]}},
    {"t": "job_control", "action": "priority", "args": {"priority": -math.inf}},
    {"t": "status", "jobs": [{"mean_frame_s": math.nan}], "clients": []},
])
def test_no_float_anywhere_in_a_message_may_be_nan_or_infinite(payload: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="not finite"):
        m.from_wire(payload)


@pytest.mark.parametrize("fps", [math.nan, math.inf, 0.0, -24.0, 1e12])
def test_a_probe_reports_a_real_frame_rate(fps: float) -> None:
    with pytest.raises(ProtocolError, match="frame rate|finite"):
        SceneInfo.from_wire({**SCENE, "fps": fps})
    assert SceneInfo.from_wire({**SCENE, "fps": 29.97}).fps == 29.97


def test_tile_counts_survive_speeds_that_are_no_numbers() -> None:
    names = ["a", "b", "c"]
    for bad in (math.nan, math.inf, 0.0, -1.0):
        assert tiling.tile_count(names, {"a": bad, "b": 1.0, "c": 1.0}) == 3
    assert tiling.tile_count(names, {"a": 1e-300, "b": 1.0}) == 12  # a ratio beyond floats: the most tiles


# --- JSON out ------------------------------------------------------------------------------------

def test_a_number_that_slips_through_is_sent_as_null_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server_addon.web")
    data = {"jobs": [{"id": "j1", "mean_frame_s": math.nan, "eta": math.inf, "ok": 1.5}]}
    for _ in range(3):
        assert strict_json(jsonout.dumps(data)) == {"jobs": [{"id": "j1", "mean_frame_s": None, "eta": None,
                                                              "ok": 1.5}]}
    logged = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(logged) == 2 and "$.jobs[0].mean_frame_s" in logged[0], logged


# --- a live farm, raw workers sending bad numbers, then a real client -----------------------------

@pytest.fixture
def web(farm: Farm) -> Iterator[Http]:
    server = start_web_on(farm)
    yield Http(server.port)
    stop_web(farm, server)


async def bad_worker(port: int, name: str, bad: dict[str, Any]) -> list[m.Message]:
    """A worker that waits for the job's probe, then sends `bad` for the probe's lease (and job): returns what
    the server sent after that, until it closed the connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        stream = MessageStream(reader, writer)
        await client_handshake(stream, role=Role.WORKER, name=name, secret=None, blender=BLENDER, device="CPU",
                               devices=["CPU"], timeout=TIMEOUT)
        await stream.send(m.Heartbeat(state="idle"))  # a worker is given work once it says it is idle
        async with asyncio.timeout(TIMEOUT):
            while True:
                probe = m.from_wire(await read_frame(reader))
                if isinstance(probe, m.Probe):
                    break
            payload = {**bad, "lease_id": probe.lease_id}
            if payload["t"] == "frame_begin":
                payload["job_id"] = probe.job_id
            writer.write(encode(payload))
            got: list[m.Message] = []
            while True:
                try:
                    got.append(m.from_wire(await read_frame(reader)))
                except ConnectionClosed:
                    return got
    finally:
        writer.close()


def job_untouched(farm: Farm, job_id: str) -> None:
    state = farm.call(lambda s: (s.farm.jobs[job_id].state.value, s.farm.jobs[job_id].frames_done,
                                 s.farm.jobs[job_id].probe_failures, s.farm.jobs[job_id].client_failures))
    assert state == ("probing", 0, 0, {}), state
    assert not list((farm.output).rglob("*.png"))


def status_is_valid_json(web: Http) -> dict[str, Any]:
    reply = web.get("/api/status")
    assert reply.status == 200
    return strict_json(reply.body)


CASES = {
    **{f"render_s={value!r}": (frame_begin(value), "render_s") for value in BAD_NUMBERS},
    "fps=nan": ({"t": "probe_result", "lease_id": 0, "ok": True, "scene": {**SCENE, "fps": math.nan}},
                "not finite"),
}


def test_bad_numbers_close_that_connection_and_a_real_client_renders_the_job(
        farm: Farm, web: Http, clients: Clients, animation: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server_addon")
    result = submit(farm, animation, "--frames", "1-2", wait=False)
    assert result.returncode == 0, result.stderr
    (job_id,) = farm.call(lambda s: list(s.farm.jobs))
    # The web's JSON in is strict too: Python's json would take NaN.
    reply = web.request("POST", f"/api/jobs/{job_id}/priority", b'{"priority": NaN}',
                        {"Content-Type": "application/json"})
    assert reply.status == 400 and "not valid JSON" in strict_json(reply.body)["error"]
    for index, (case, (payload, fragment)) in enumerate(CASES.items()):
        got = asyncio.run(bad_worker(farm.port, f"rude-{index}", payload))
        assert [type(msg) for msg in got] == [m.Error] and fragment in got[0].reason, (case, got)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(f"rude-{index}" in w and fragment in w for w in warnings), (case, warnings)
        job_untouched(farm, job_id)
        status_is_valid_json(web)
    # A real client joins, probes the job and renders it.
    clients.start("real", farm.address)
    farm.wait_until(lambda s: s.farm.jobs[job_id].state.value == "done", timeout=120, what="the job done")
    view = next(j for j in status_is_valid_json(web)["jobs"] if j["id"] == job_id)
    assert view["frames_done"] == 2 and view["state"] == "done"
    assert math.isfinite(view["mean_frame_s"]) and view["mean_frame_s"] > 0
    assert len(list(farm.output.rglob("frame_*.png"))) == 2
    # A new job after the attack probes too, and its tile count comes from the measured speeds.
    result = submit(farm, animation, "--frame", "3", "--split", "auto", timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert all(j["state"] == "done" for j in status_is_valid_json(web)["jobs"])
    assert strict_json(first_event(web.port))["jobs"]


def first_event(port: int) -> bytes:
    """The data of the first status event the page's stream sends."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/api/events")
        response = conn.getresponse()
        assert response.status == 200
        while True:
            line = response.fp.readline()
            assert line, "the event stream ended"
            if line.startswith(b"data: "):
                return line[len(b"data: "):]
    finally:
        conn.close()
