"""The handshake over real TCP on 127.0.0.1: versions, mutual proof of the secret, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

import pytest

from protocol import messages as m
from protocol.auth import new_nonce, server_proof
from protocol.errors import AuthError, ConnectionClosed, ProtocolError, VersionMismatch
from protocol.handshake import client_handshake, server_handshake
from protocol.limits import PROTOCOL_VERSION
from protocol.messages import Role
from protocol.stream import MessageStream
from protocol.tls import ServerTls
from server_addon.core.certificate import ensure_identity

pytestmark = pytest.mark.unit

TIMEOUT = 5.0
SECRET = "correct horse battery staple ünïcode"


@contextlib.asynccontextmanager
async def listening(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)


_CERT_DIR = tempfile.TemporaryDirectory(prefix="microfarm-tls-")  # removed when the test run ends


@functools.cache
def server_tls() -> ServerTls:
    """One certificate for the module's servers (a farm with a secret speaks TLS since protocol 2)."""
    return ServerTls.load(*ensure_identity(Path(_CERT_DIR.name)))


@contextlib.asynccontextmanager
async def handshake_server(secret: str | None):
    """A server that runs server_handshake once; yields its port and a future with the outcome."""
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        stream = MessageStream(reader, writer)
        try:
            result = await server_handshake(stream, farm="test-farm", secret=secret,
                                            assign_id=lambda peer: f"c-{peer.name}", heartbeat_s=2.0,
                                            tls=server_tls() if secret else None, timeout=TIMEOUT)
        except Exception as exc:
            outcome.set_exception(exc)
        else:
            outcome.set_result(result)
        finally:
            await stream.aclose()

    async with listening(on_connect) as port:
        yield port, outcome


@contextlib.asynccontextmanager
async def connect(port: int):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    stream = MessageStream(reader, writer)
    try:
        yield stream
    finally:
        await stream.aclose()


async def recv(stream: MessageStream) -> m.Message:
    return await asyncio.wait_for(stream.recv(), TIMEOUT)


async def outcome_of(future: asyncio.Future):
    return await asyncio.wait_for(future, TIMEOUT)


@pytest.mark.asyncio
@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "open"])
async def test_matching_secrets_are_accepted(secret):
    async with handshake_server(secret) as (port, outcome), connect(port) as stream:
        welcome, accepted = await client_handshake(stream, role=Role.WORKER, name="box", secret=secret,
                                                   blender="5.0.1", timeout=TIMEOUT)
        peer, client_id = await outcome_of(outcome)
    assert welcome.farm == "test-farm" and welcome.auth_required is (secret is not None)
    assert accepted.client_id == client_id == "c-box" and accepted.heartbeat_s == 2.0
    assert (peer.role, peer.name, peer.blender) == (Role.WORKER, "box", "5.0.1")


@pytest.mark.asyncio
async def test_wrong_version_is_refused_with_a_reason():
    async with handshake_server(SECRET) as (port, outcome), connect(port) as stream:
        await stream.send(m.Hello(version=PROTOCOL_VERSION + 1, role="worker", name="future", nonce=new_nonce()))
        reply = await recv(stream)
        assert isinstance(reply, m.Error)
        assert f"protocol version {PROTOCOL_VERSION + 1} is not supported" in reply.reason
        assert f"speaks {PROTOCOL_VERSION}" in reply.reason
        with pytest.raises(VersionMismatch):
            await outcome_of(outcome)
        with pytest.raises(ConnectionClosed):
            await recv(stream)


@pytest.mark.asyncio
async def test_unknown_role_is_refused():
    async with handshake_server(None) as (port, outcome), connect(port) as stream:
        await stream.send(m.Hello(version=PROTOCOL_VERSION, role="admin", name="x", nonce=new_nonce()))
        reply = await recv(stream)
        assert isinstance(reply, m.Error) and "admin" in reply.reason
        with pytest.raises(ProtocolError, match="role"):
            await outcome_of(outcome)


@pytest.mark.asyncio
async def test_client_with_wrong_secret_is_not_accepted():
    # The client checks the server's proof first, finds it wrong, and refuses the server itself.
    async with handshake_server(SECRET) as (port, outcome), connect(port) as stream:
        with pytest.raises(AuthError, match="could not prove"):
            await client_handshake(stream, role=Role.WORKER, name="box", secret="wrong", timeout=TIMEOUT)
        with pytest.raises(ProtocolError, match="failed to prove"):
            await outcome_of(outcome)


@pytest.mark.asyncio
@pytest.mark.parametrize("proof", [os.urandom(32), None, b""], ids=["random", "none", "empty"])
async def test_server_raises_auth_error_on_a_bad_client_proof(proof):
    async with handshake_server(SECRET) as (port, outcome), connect(port) as stream:
        await stream.send(m.Hello(version=PROTOCOL_VERSION, role="worker", name="liar", nonce=new_nonce()))
        welcome = await recv(stream)
        assert isinstance(welcome, m.Welcome) and welcome.auth_required
        await stream.send(m.Auth(proof=proof))
        reply = await recv(stream)
        assert isinstance(reply, m.Error) and "secret" in reply.reason
        with pytest.raises(AuthError, match="liar"):
            await outcome_of(outcome)


@pytest.mark.asyncio
async def test_client_with_secret_refuses_a_server_without_one():
    async with handshake_server(None) as (port, outcome), connect(port) as stream:
        with pytest.raises(AuthError, match="could not prove"):
            await client_handshake(stream, role=Role.WORKER, name="box", secret=SECRET, timeout=TIMEOUT)
        with pytest.raises(ProtocolError):
            await outcome_of(outcome)


@pytest.mark.asyncio
async def test_client_without_secret_refuses_a_farm_that_requires_one():
    async with handshake_server(SECRET) as (port, outcome), connect(port) as stream:
        with pytest.raises(AuthError, match="--token"):
            await client_handshake(stream, role=Role.CONTROL, name="tool", secret=None, timeout=TIMEOUT)
        with pytest.raises(ProtocolError, match="no secret configured"):
            await outcome_of(outcome)


@pytest.mark.asyncio
@pytest.mark.parametrize("proof", [os.urandom(32), None], ids=["made-up", "missing"])
async def test_client_refuses_a_rogue_server(proof):
    """A rogue server that cannot prove the secret gets an Error and never a client proof."""
    received: list[m.Message] = []
    done = asyncio.get_running_loop().create_future()

    async def rogue(reader, writer):
        stream = MessageStream(reader, writer)
        try:
            await recv(stream)  # the Hello
            await stream.send(m.Welcome(version=PROTOCOL_VERSION, farm="rogue", nonce=new_nonce(),
                                        auth_required=True, proof=proof))
            while True:
                received.append(await recv(stream))
        except ConnectionClosed:
            done.set_result(None)
        except Exception as exc:
            done.set_exception(exc)
        finally:
            await stream.aclose()

    async with listening(rogue) as port:
        async with connect(port) as stream:
            with pytest.raises(AuthError, match="could not prove"):
                await client_handshake(stream, role=Role.WORKER, name="box", secret=SECRET, timeout=TIMEOUT)
        await asyncio.wait_for(done, TIMEOUT)
    assert [type(msg) for msg in received] == [m.Error]
    assert not any(isinstance(msg, m.Auth) for msg in received)


# --- the secret never travels -----------------------------------------------------------------

@contextlib.asynccontextmanager
async def relay(target_port: int):
    """A TCP relay that records every byte in both directions; yields (port, captured, finished)."""
    captured = {"up": bytearray(), "down": bytearray()}
    finished = asyncio.get_running_loop().create_future()

    async def pipe(reader, writer, record):
        try:
            while data := await reader.read(65536):
                record.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def on_connect(client_reader, client_writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_reader, up_writer, captured["up"]),
                             pipe(up_reader, client_writer, captured["down"]))
        finished.set_result(None)

    async with listening(on_connect) as port:
        yield port, captured, finished


@pytest.mark.asyncio
@pytest.mark.parametrize("client_secret", [SECRET, "a different secret"], ids=["same", "wrong"])
async def test_secret_never_appears_on_the_wire(client_secret):
    async with handshake_server(SECRET) as (server_port, outcome), relay(server_port) as (port, wire, finished):
        async with connect(port) as stream:
            try:
                await client_handshake(stream, role=Role.WORKER, name="relay-client", secret=client_secret,
                                       timeout=TIMEOUT)
            except AuthError:
                assert client_secret != SECRET
            with contextlib.suppress(ProtocolError):
                await outcome_of(outcome)
        await asyncio.wait_for(finished, TIMEOUT)
    everything = bytes(wire["up"] + wire["down"])
    # The capture saw the handshake (both directions), so its absence below means something. Changed with TLS
    # (protocol 2): the client's name and the farm's travel inside TLS now, so the capture shows the plain hello that
    # asks for it and the plain welcome that answers it.
    assert b"hello" in wire["up"] and b"welcome" in wire["down"]
    assert b"relay-client" not in everything and b"test-farm" not in everything
    for secret in {SECRET, client_secret}:
        assert secret.encode("utf-8") not in everything
    assert b"horse battery" not in everything


def test_the_proofs_are_keyed_by_the_secret_stretched_with_scrypt() -> None:
    """A stranger who takes a server proof away tests each guess against scrypt (32 MiB), not against one HMAC."""
    client_nonce, server_nonce, certificate = bytes(range(32)), bytes(range(32, 64)), bytes(32)
    stretched = hashlib.scrypt(SECRET.encode(), salt=b"microfarm farm key v3", n=2**15, r=8, p=1,
                               maxmem=64 * 1024 * 1024, dklen=32)
    message = b"|".join((b"microfarm server proof v3", client_nonce, server_nonce, certificate))
    proof = server_proof(SECRET, client_nonce, server_nonce, certificate)
    assert proof == hmac.new(stretched, message, hashlib.sha256).digest()
    assert proof != hmac.new(SECRET.encode(), message, hashlib.sha256).digest()
    assert server_proof(SECRET + "x", client_nonce, server_nonce, certificate) != proof


@pytest.mark.asyncio
async def test_a_client_with_a_secret_tells_a_server_that_cannot_prove_it_nothing_of_itself():
    """A rogue server (TLS, a certificate of its own, no secret): the client's hellos name nobody, and the client
    refuses it before it says who it is."""
    seen: list[m.Message] = []
    done = asyncio.get_running_loop().create_future()

    async def rogue(reader, writer):
        stream = MessageStream(reader, writer)
        try:
            seen.append(await recv(stream))
            await stream.send(m.Welcome(version=PROTOCOL_VERSION, farm="", nonce=new_nonce(), auth_required=True,
                                        tls=True))
            await stream.start_tls(server_tls().context)
            seen.append(await recv(stream))
            await stream.send(m.Welcome(version=PROTOCOL_VERSION, farm="rogue", nonce=new_nonce(), auth_required=True,
                                        proof=bytes(32), tls=True, cert_sha256=server_tls().fingerprint))
            with contextlib.suppress(ProtocolError, asyncio.TimeoutError):
                while True:
                    seen.append(await recv(stream))
        finally:
            done.set_result(None)
            await stream.aclose()

    async with listening(rogue) as port, connect(port) as stream:
        with pytest.raises(AuthError, match="could not prove it knows the farm secret"):
            await client_handshake(stream, role=Role.WORKER, name="secret-box", secret=SECRET, blender="5.0.1",
                                   device="OPTIX", timeout=TIMEOUT)
        await stream.aclose()  # (the client gives up: the rogue has read all it will get)
        await asyncio.wait_for(done, TIMEOUT)
    hellos = [message for message in seen if isinstance(message, m.Hello)]
    assert len(hellos) == 2 and all((h.name, h.host, h.blender, h.device, h.devices) == ("", "", "", "", [])
                                    for h in hellos)
    assert not any(isinstance(message, m.Auth) for message in seen), seen
    assert "secret-box" not in repr(seen)
