"""The add-on's state machine and its bridge to the server thread in plain Python, no Blender at all
(server_addon/addon/session.py, bridge.py, outbox.py, sending.py): a real ServerThread on 127.0.0.1, driven
as the operators drive it, and drained as the timer drains it. It runs in a Python of its own, since other
tests of a session import bpy, and shows that none of this ever imports bpy."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, repo_env

pytestmark = pytest.mark.integration  # (a server thread in a subprocess, no Blender)

SCENARIO = r"""
import json, shutil, socket, sys, threading, time
from pathlib import Path

from server_addon.addon import bridge, outbox, sending, session
from server_addon.addon.errors import FarmError
from protocol.settings import JobRequest
from server_addon.addon.submit import JobSubmission

out, blend = Path(sys.argv[1]), Path(sys.argv[2])
result = {"bpy_after_import": "bpy" in sys.modules}
WAIT_S = 30.0


def refused(call):
    try:
        call()
    except FarmError as exc:
        return str(exc)
    return None


def drain_until(s, predicate):
    seen = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        seen += [[n.level, n.text] for n in s.drain()[1]]
        if any(predicate(level, text) for level, text in seen):
            return seen
        s.wait_view(0.05)
    raise AssertionError(f"no such notice; got {seen}")


s = session.Session()
settings = bridge.ServerSettings(output_dir=out, host="127.0.0.1", port=0, discovery=False)
result["stopped"] = {"state": s.state.value, "stop": refused(s.stop), "drop": refused(s.blend_drop_path),
                     "action": refused(lambda: s.job_action("cancel", "x"))}
s.start(settings)
result["second_start"] = refused(lambda: s.start(settings))
assert s.wait_for(session.State.RUNNING, WAIT_S)
result["address"] = list(s.address)
assert s.wait_view(WAIT_S)
result["farm"] = s.view.farm
result["clear"] = s.job_action("clear_completed", wait=WAIT_S)
result["no_job"] = refused(lambda: s.job_action("cancel", "nope", wait=WAIT_S))

# Render Current Frame: the job is followed on the loop thread; cancelled, its end comes back as a notice.
copy = s.blend_drop_path()
shutil.copyfile(blend, copy)
s.submit(JobSubmission(blend=copy, name="frame.blend", request=JobRequest(frame_start=3, frame_end=3), pack=False,
                       show_result=True))
seen = drain_until(s, lambda level, text: text.startswith("Frame 3 sent to the farm as job "))
job_id = seen[-1][1].removeprefix("Frame 3 sent to the farm as job ").rstrip(".")
result["job_id"], result["check_job"] = job_id, s.check.job_id if s.check else None
result["copy_left"] = copy.exists()
result["cancel"] = s.job_action("cancel", job_id, wait=WAIT_S)
result["watched"] = drain_until(s, lambda level, text: level == "ERROR")[-1]
s.drain()  # the view published with that notice, if the drain that found it came too early for it
result["jobs_in_view"] = [dict(j) for j in s.view.jobs]

port = s.address[1]
s.stop()
result["second_stop"] = refused(s.stop)
assert s.wait_for(session.State.STOPPED, WAIT_S)
result["stopped_notice"] = drain_until(s, lambda level, text: text == "Farm server stopped.")[-1]
result["view_after_stop"] = [s.view.farm, list(s.view.jobs), list(s.view.clients)]
with socket.socket() as probe:
    probe.bind(("127.0.0.1", port))  # the port is free again
result["address_after_stop"] = s.address

# Started again in the same session, it finds the job it left (the server's database is in the output folder).
s.start(settings)
assert s.wait_for(session.State.RUNNING, WAIT_S)
result["restarted_jobs"] = s.thread.call(lambda server: sorted(server.farm.jobs))
s.shutdown()
result["state_after_shutdown"] = s.state.value
result["threads_left"] = sorted(t.name for t in threading.enumerate() if t.name.startswith("microfarm-"))
result["bpy_at_end"] = "bpy" in sys.modules
result["modules"] = sorted(m for m in sys.modules if m.startswith("server_addon.addon."))
print(json.dumps(result))
"""


def test_the_session_runs_a_real_server_without_bpy(animation: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path / "out"), str(animation)], cwd=REPO,
                          env=repo_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["bpy_after_import"] is False and result["bpy_at_end"] is False
    assert "server_addon.addon.runtime" not in result["modules"], "the bpy glue is not needed to run the farm"

    not_running = "The farm server is not running; start it first."
    assert result["stopped"] == {"state": "stopped", "stop": "The farm server is stopped, not running.",
                                 "action": not_running, "drop": not_running}
    assert result["second_start"] in ("The farm server is already starting.", "The farm server is already running.")
    host, port = result["address"]
    assert host == "127.0.0.1" and port > 0 and result["farm"]
    assert result["clear"] == "cleared 0 finished jobs"
    assert result["no_job"] == "There is no job 'nope'."

    job_id = result["job_id"]
    assert job_id.startswith("frame-") and result["check_job"] == job_id and not result["copy_left"]
    assert result["cancel"] == f"job {job_id} cancelled"
    assert result["watched"] == ["ERROR", f"Render Current Frame: job {job_id} cancelled."]
    assert [(j["id"], j["state"]) for j in result["jobs_in_view"]] == [(job_id, "cancelled")]

    assert result["second_stop"] == "The farm server is stopping, not running."
    assert result["stopped_notice"] == ["INFO", "Farm server stopped."]
    assert result["view_after_stop"] == ["", [], []] and result["address_after_stop"] is None
    assert result["restarted_jobs"] == [job_id]
    assert result["state_after_shutdown"] == "stopped" and result["threads_left"] == []


def test_a_start_that_fails_leaves_the_session_stopped(tmp_path: Path) -> None:
    # In this process too: the state machine needs nothing of Blender, whatever else the session imported.
    from server_addon.addon.bridge import ServerSettings
    from server_addon.addon.session import Session, State

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = Session()
        s.start(ServerSettings(output_dir=tmp_path / "out", host="127.0.0.1", port=port, discovery=False))
        assert s.wait_for(State.STOPPED, 30.0)
        notices = []
        for _ in range(300):
            notices += s.drain()[1]
            if notices:
                break
            s.wait_view(0.1)
    assert [(n.level, n.text) for n in notices] == [
        ("ERROR", f"Could not start the farm server on 127.0.0.1:{port}: Address already in use.")]
    assert s.thread is None and s.address is None
    s.start(ServerSettings(output_dir=tmp_path / "out", host="127.0.0.1", port=0, discovery=False))
    assert s.wait_for(State.RUNNING, 30.0), "a failed start leaves the way open for the next"
    s.shutdown()
    assert s.state is State.STOPPED
