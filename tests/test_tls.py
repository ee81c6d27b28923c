"""TLS on farms with a secret: the certificate, relays in the middle (detected by both sides), and what a capture
of the relayed bytes shows of a job (nothing, with a secret)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Clients, Farm, connected, repo_env, submit_to
from PIL import Image
from relay import Relay

from protocol import messages as m
from protocol.auth import client_proof, new_nonce
from protocol.errors import ProtocolError
from protocol.framing import encode
from protocol.handshake import server_handshake
from protocol.limits import PROTOCOL_VERSION
from protocol.stream import MessageStream
from protocol.tls import ServerTls, client_context, peer_fingerprint
from server_addon.core.certificate import CERT_NAME, KEY_NAME, ensure_identity
from tools.control import Control, ToolError

pytestmark = pytest.mark.integration

SECRET = "tls-test-secret"
TIMEOUT = 10.0


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "server_addon.core.listener"]
    return [line for line in lines if "refused" in line]


# --- the certificate ---------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_the_certificate_is_made_once_private_and_reused(tmp_path: Path) -> None:
    cert, key = ensure_identity(tmp_path)
    assert (cert.name, key.name) == (CERT_NAME, KEY_NAME)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(cert.stat().st_mode) == 0o600
    first = ServerTls.load(cert, key)
    assert first.fingerprint == hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).digest()
    before = (cert.read_bytes(), key.read_bytes())
    assert ensure_identity(tmp_path) == (cert, key) and (cert.read_bytes(), key.read_bytes()) == before
    assert ServerTls.load(cert, key).fingerprint == first.fingerprint
    # Another data dir, another farm: another key.
    assert ServerTls.load(*ensure_identity(tmp_path / "other")).fingerprint != first.fingerprint


@pytest.mark.integration  # runs the openssl program
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl program to check the signature")
def test_the_certificate_signs_itself_correctly(tmp_path: Path) -> None:
    cert, key = ensure_identity(tmp_path)
    verified = subprocess.run(["openssl", "verify", "-check_ss_sig", "-CAfile", cert, cert], capture_output=True,
                              text=True, timeout=30)
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stdout + verified.stderr
    from_key = subprocess.run(["openssl", "pkey", "-in", key, "-pubout"], capture_output=True, timeout=30).stdout
    from_cert = subprocess.run(["openssl", "x509", "-in", cert, "-pubkey", "-noout"], capture_output=True,
                               timeout=30).stdout
    assert from_key and from_key == from_cert


@pytest.mark.unit
@pytest.mark.asyncio
async def test_plain_bytes_sent_where_tls_begins_are_refused(tmp_path: Path) -> None:
    """Bytes a relay slips in after the plain hello would otherwise be read as if they had come through TLS."""
    tls = ServerTls.load(*ensure_identity(tmp_path))
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        stream = MessageStream(reader, writer)
        try:
            outcome.set_result(await server_handshake(stream, farm="f", secret=SECRET, assign_id=lambda _p: "c1",
                                                      heartbeat_s=1.0, tls=tls, timeout=TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome.set_exception(exc)
        finally:
            await stream.aclose()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        plain = m.Hello(version=PROTOCOL_VERSION, role="worker", name="", nonce=new_nonce(), tls=True)
        injected = m.Hello(version=PROTOCOL_VERSION, role="worker", name="injected", nonce=new_nonce(), tls=True)
        writer.write(encode(plain.to_wire()) + encode(injected.to_wire()))  # one write: both wait in the buffer
        with pytest.raises(ProtocolError, match="plain bytes where TLS should begin"):
            await asyncio.wait_for(outcome, TIMEOUT)
        writer.close()
    finally:
        server.close()


# --- a relay that terminates TLS, against a live server -----------------------------------------------------------

@pytest.fixture
def secret_farm(tmp_path: Path):
    f = Farm(tmp_path / "output", secret=SECRET)
    yield f
    f.stop()


def test_a_tool_refuses_a_relay_that_terminates_tls_and_the_server_logs_it(secret_farm: Farm, caplog) -> None:
    caplog.set_level(logging.INFO)
    with Relay(secret_farm.port, "terminate") as relay:
        with pytest.raises(ToolError, match=f"shown TLS certificate {relay.fingerprint}.*a relay in the middle"):
            asyncio.run(Control.connect(relay.address, SECRET))
        assert relay.connections == 1
        secret_farm.wait_until(lambda s: s.stats.connections_refused >= 1, what="the refusal")
    assert any(f"server failed to prove the farm secret over TLS certificate {relay.fingerprint}" in line
               for line in refusals(caplog)), refusals(caplog)
    # Through no relay, the same tool gets in.
    asyncio.run(_status(secret_farm.address))


async def _status(address: str) -> None:
    control = await Control.connect(address, SECRET)
    try:
        assert isinstance(await control.status(), m.Status)
    finally:
        await control.close()


async def _honest_client(port: int) -> m.Message:
    """A client with the secret that proves itself over the certificate it was shown, without checking the
    server's proof first: what the server sees of a client behind a relay that terminates TLS."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    stream = MessageStream(reader, writer)
    try:
        await stream.send(m.Hello(version=PROTOCOL_VERSION, role="worker", name="", nonce=new_nonce(), tls=True))
        plain = await stream.recv()
        assert isinstance(plain, m.Welcome) and plain.farm == ""  # the farm's name only inside TLS
        seen = peer_fingerprint(await stream.start_tls(client_context()))
        nonce = new_nonce()
        await stream.send(m.Hello(version=PROTOCOL_VERSION, role="worker", name="", nonce=nonce, tls=True))
        welcome = await asyncio.wait_for(stream.recv(), TIMEOUT)
        assert isinstance(welcome, m.Welcome) and welcome.farm
        await stream.send(m.Auth(proof=client_proof(SECRET, welcome.nonce, nonce, seen), cert_sha256=seen,
                                 name="behind-relay", blender="5.0.1"))
        return await asyncio.wait_for(stream.recv(), TIMEOUT)
    finally:
        await stream.aclose()


def test_the_server_refuses_a_client_that_was_shown_another_certificate(secret_farm: Farm, caplog) -> None:
    caplog.set_level(logging.INFO)
    # Straight to the server, the client's proof holds: the check below is the certificate's, not the code's.
    assert isinstance(asyncio.run(_honest_client(secret_farm.port)), m.Accepted)
    with Relay(secret_farm.port, "terminate") as relay:
        reply = asyncio.run(_honest_client(relay.port))
        assert isinstance(reply, m.Error) and "secret" in reply.reason
        secret_farm.wait_until(lambda s: s.stats.connections_refused >= 1, what="the refusal")
        # The relay read the exchange in clear: it is the man in the middle, yet it got nowhere.
        assert b"behind-relay" in relay.captured()
    ours = _server_fingerprint(secret_farm)
    assert any(f"it was shown TLS certificate {relay.fingerprint}, ours is {ours}" in line
               and "a relay in the middle terminates TLS" in line for line in refusals(caplog)), refusals(caplog)


def _server_fingerprint(farm: Farm) -> str:
    cert = farm.output / ".microfarm" / CERT_NAME
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()[:16]


# --- real render clients ------------------------------------------------------------------------------------------

def test_a_render_client_refuses_a_relay_that_terminates_tls(secret_farm: Farm, clients: Clients, caplog) -> None:
    caplog.set_level(logging.INFO)
    with Relay(secret_farm.port, "terminate") as relay:
        proc = clients.start("careful", relay.address, "--token", SECRET, "--exit-on-auth-failure")
        assert proc.wait(timeout=90) == 2
    errors = [line for line in clients.log("careful").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"shown TLS certificate {relay.fingerprint}" in errors[0] \
        and "a relay in the middle terminates TLS" in errors[0], errors
    assert any(f"over TLS certificate {relay.fingerprint}" in line for line in refusals(caplog)), refusals(caplog)
    assert secret_farm.call(lambda s: len(s.farm.clients)) == 0


def _slices(path: Path, count: int = 4, size: int = 48) -> list[bytes]:
    """Pieces from all over a file: one of them in a capture means the file travelled readable."""
    data = path.read_bytes()
    step = max(1, (len(data) - size) // count)
    return [data[i:i + size] for i in range(0, len(data) - size, step)][:count]


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "open"])
def test_a_capture_of_a_job_shows_nothing_of_it_on_a_farm_with_a_secret(tmp_path: Path, clients: Clients, scenes,
                                                                         secret: str | None) -> None:
    blend = scenes("tls3", "--frames", "3")
    farm = Farm(tmp_path / "output", secret=secret)
    token = ("--token", secret) if secret else ()
    try:
        with Relay(farm.port, "bytes") as relay:
            clients.start("relayed", relay.address, *token)
            farm.wait_until(connected(1), what="the client behind the relay")
            result = submit_to(relay.address, blend, *token)
            assert result.returncode == 0, result.stderr
            job_id = result.stdout.strip()
            assert farm.job(job_id)["state"] == "done"
            frames = sorted((farm.output / job_id).glob("frame_*.png"))
            assert [f.name for f in frames] == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]
            assert farm.call(lambda s: (s.stats.frames_stored, s.stats.duplicate_frames)) == (3, 0)
            capture = relay.captured()
    finally:
        farm.stop()
    # Every frame as an undisturbed render of the same file gives it.
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "tools.render_local", str(blend), "1", "3", str(local)], cwd=REPO,
                   env=repo_env(), check=True, capture_output=True, timeout=300)
    for frame in frames:
        ours, theirs = (np.asarray(Image.open(f).convert("RGBA"), dtype=int) for f in (frame, local / frame.name))
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1, frame.name
    # The .blend went up (the tool's upload) and down (to the client), the frames up, all through the relay.
    assert len(capture) > 2 * blend.stat().st_size
    markers = [*_slices(blend), b"\x89PNG\r\n\x1a\n", *(piece for f in frames for piece in _slices(f))]
    readable = [marker for marker in markers if marker in capture]
    if secret:
        assert readable == []
    else:
        # Without a secret the farm works as before, in plain text: the capture is able to show what travels.
        assert readable == markers
