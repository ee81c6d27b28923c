"""The first exchange: version check, TLS where the farm has a secret, and mutual proof of the secret.

Without a secret (both sides), all of it is plain text:

    client → HELLO(version, role, name, nonce_c)
    server → WELCOME(version, farm, nonce_s, auth_required=False)
    client → AUTH()
    server → ACCEPTED(client_id) or ERROR(reason)

A client with a secret first asks for TLS in a plain hello that names nobody; the version is checked there, so
that either side can still refuse the other in a sentence. Then TLS starts (the server's self-signed certificate,
protocol.tls) and the exchange above runs inside it, with proofs:

    client → HELLO(version, role, nonce, tls=True)              plain
    server → WELCOME(version, auth_required, tls=True)          plain, no farm name; then the TLS handshake
    client → HELLO(version, role, nonce_c, tls=True)            inside TLS from here on; still no name
    server → WELCOME(farm, nonce_s, proof_s, cert_sha256)       proof_s over nonce_c and the server's certificate
    client → AUTH(proof_c, cert_sha256, name, host, blender, ...)   once proof_s holds; proof_c over nonce_s and
                                                                the certificate it was shown
    server → ACCEPTED(client_id) or ERROR(reason)

A client that holds a secret refuses a server whose proof is missing or wrong before it says who it is, so a
rogue server on the LAN learns nothing of it, collects no .blend files and hands out no work; and as both proofs
cover the certificate, a relay that terminates TLS with a certificate of its own fails both checks. A farm with
a secret takes nothing but TLS. The proofs' key is the secret stretched (protocol.auth.farm_key).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from .auth import client_proof, matches, new_nonce, server_proof
from .errors import AuthError, ProtocolError, VersionMismatch
from .limits import HANDSHAKE_TIMEOUT_S, NONCE_BYTES, PROTOCOL_VERSION
from .messages import Accepted, Auth, Error, Hello, Message, Role, Welcome
from .names import clean_name
from .schema import Bytes, SchemaError, Str, validate
from .stream import MessageStream
from .tls import ServerTls, client_context, peer_fingerprint, short

#: What a hello must carry beyond its types, checked here so that the refusal reaches the client before the
#: connection closes (a hello that is no hello at all is refused by its schema, on receipt).
_ROLE = Str(choices=[role.value for role in Role], message="unknown role {value!r}")
_NONCE = Bytes(min_len=NONCE_BYTES, max_len=NONCE_BYTES, message="hello carries a nonce of the wrong length")


@dataclass(frozen=True)
class Peer:
    """What the server learned about a client in the handshake."""

    role: Role
    name: str
    host: str
    blender: str
    device: str = ""
    devices: tuple[str, ...] = ()
    allow_scripts: bool = False


async def _expect(stream: MessageStream, kind: type[Message]) -> Message:
    message = await stream.recv()
    if isinstance(message, Error):
        raise ProtocolError(f"peer refused: {message.reason}")
    if not isinstance(message, kind):
        raise ProtocolError(f"expected {kind.TYPE.value}, got {message.TYPE.value}")
    return message


async def _refuse(stream: MessageStream, reason: str) -> None:
    try:
        await stream.send(Error(reason=reason))
    except ProtocolError:
        pass


async def _hello(stream: MessageStream) -> tuple[Hello, Role]:
    """The client's hello, its version, role and nonce checked (each refused with the reason)."""
    hello = await _expect(stream, Hello)
    assert isinstance(hello, Hello)
    if hello.version != PROTOCOL_VERSION:
        reason = f"protocol version {hello.version} is not supported; this server speaks {PROTOCOL_VERSION}"
        await _refuse(stream, reason)
        raise VersionMismatch(reason)
    try:
        role = Role(validate(_ROLE, hello.role))
    except SchemaError as exc:
        await _refuse(stream, str(exc))
        raise
    try:
        validate(_NONCE, hello.nonce)
    except SchemaError:
        await _refuse(stream, "bad nonce")
        raise
    return hello, role


async def server_handshake(stream: MessageStream, *, farm: str, secret: str | None,
                           assign_id: Callable[[Peer], str], heartbeat_s: float, tls: ServerTls | None = None,
                           timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Peer, str]:
    """Run the server side; returns the peer and its id, or raises with the reason.

    tls: the server's certificate, which a farm with a secret must have (it speaks nothing else)."""
    if secret and tls is None:
        raise ValueError("a farm with a secret needs its TLS certificate")
    async with asyncio.timeout(timeout):
        hello, role = await _hello(stream)
        name = clean_name(hello.name) or "unnamed"
        fingerprint = b""
        if secret and hello.tls:
            assert tls is not None
            # (No farm name in plain text: the welcome inside TLS names it.)
            await stream.send(Welcome(version=PROTOCOL_VERSION, farm="", nonce=new_nonce(), auth_required=True,
                                      tls=True))
            await stream.start_tls(tls.context)
            fingerprint = tls.fingerprint
            hello, role = await _hello(stream)
            name = clean_name(hello.name) or "unnamed"
        our_nonce = new_nonce()
        proof = server_proof(secret, hello.nonce, our_nonce, fingerprint) if fingerprint and secret else None
        # (A farm with a secret names itself only inside TLS; a peer that did not ask for it is refused below.)
        await stream.send(Welcome(version=PROTOCOL_VERSION, farm=farm if fingerprint or not secret else "",
                                  nonce=our_nonce, auth_required=bool(secret),
                                  proof=proof, tls=bool(fingerprint), cert_sha256=fingerprint or None))
        auth = await _expect(stream, Auth)
        assert isinstance(auth, Auth)
        who: Hello | Auth = hello
        if secret:
            who = auth  # (a client with a secret says who it is only after the server proved itself: see Auth)
            name = clean_name(auth.name) or name
            if not fingerprint:
                await _refuse(stream, "wrong or missing farm secret: this farm takes it over TLS only")
                raise AuthError(f"client {name!r} failed the farm secret check: it did not ask for TLS")
            if not matches(client_proof(secret, our_nonce, hello.nonce, fingerprint), auth.proof):
                await _refuse(stream, "wrong or missing farm secret")
                if auth.cert_sha256 and auth.cert_sha256 != fingerprint:
                    raise AuthError(f"client {name!r} failed the farm secret check: it was shown TLS certificate "
                                    f"{short(auth.cert_sha256)}, ours is {short(fingerprint)} (a relay in the "
                                    f"middle terminates TLS)")
                raise AuthError(f"client {name!r} failed the farm secret check (wrong secret, or a relay in the "
                                f"middle)")
        peer = Peer(role=role, name=name, host=clean_name(who.host), blender=clean_name(who.blender),
                    device=clean_name(who.device), devices=tuple(clean_name(d) for d in who.devices[:16]),
                    allow_scripts=who.allow_scripts)
        client_id = assign_id(peer)
        await stream.send(Accepted(client_id=client_id, heartbeat_s=heartbeat_s))
        return peer, client_id


async def _welcome(stream: MessageStream) -> Welcome:
    welcome = await _expect(stream, Welcome)
    assert isinstance(welcome, Welcome)
    if welcome.version != PROTOCOL_VERSION:
        raise VersionMismatch(f"server {stream.peer} speaks protocol version {welcome.version}; this client speaks "
                              f"{PROTOCOL_VERSION}")
    return welcome


async def client_handshake(stream: MessageStream, *, role: Role, name: str, secret: str | None,
                           blender: str = "", device: str = "", devices: list[str] | None = None,
                           allow_scripts: bool = False,
                           timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Welcome, Accepted]:
    """Run the client side; raises AuthError if the server cannot prove the secret (over TLS, when there is one).

    With a secret the stream is TLS when this returns."""
    async with asyncio.timeout(timeout):
        seen = b""
        if secret:
            await stream.send(Hello(version=PROTOCOL_VERSION, role=role.value, name="", nonce=new_nonce(), tls=True))
            welcome = await _welcome(stream)
            if not welcome.tls:
                await _refuse(stream, "server failed to prove the farm secret: it offers no TLS")
                raise AuthError(f"server {stream.peer} could not prove it knows the farm secret")
            seen = peer_fingerprint(await stream.start_tls(client_context()))
        nonce = new_nonce()
        identity = {"name": name, "host": socket.gethostname(), "blender": blender, "device": device,
                    "devices": list(devices or []), "allow_scripts": allow_scripts}
        if secret:  # who this client is goes in its AUTH, once the server has proved it knows the secret
            await stream.send(Hello(version=PROTOCOL_VERSION, role=role.value, name="", nonce=nonce, tls=True))
        else:
            await stream.send(Hello(version=PROTOCOL_VERSION, role=role.value, nonce=nonce, **identity))
        welcome = await _welcome(stream)
        if secret:
            if not matches(server_proof(secret, nonce, welcome.nonce, seen), welcome.proof):
                await _refuse(stream, f"server failed to prove the farm secret over TLS certificate {short(seen)}")
                if welcome.cert_sha256 and welcome.cert_sha256 != seen:
                    raise AuthError(f"server {stream.peer} could not prove it knows the farm secret: this client was "
                                    f"shown TLS certificate {short(seen)}, the server says its own is "
                                    f"{short(welcome.cert_sha256)} (a relay in the middle terminates TLS)")
                raise AuthError(f"server {stream.peer} could not prove it knows the farm secret over TLS "
                                f"certificate {short(seen)} (wrong secret, or a relay in the middle)")
            await stream.send(Auth(proof=client_proof(secret, welcome.nonce, nonce, seen), cert_sha256=seen,
                                   **identity))
        else:
            if welcome.auth_required:
                await _refuse(stream, "no secret configured")
                raise AuthError(f"server {stream.peer} requires the farm secret: pass --token or set MICROFARM_TOKEN")
            await stream.send(Auth(proof=None))
        accepted = await _expect(stream, Accepted)
        assert isinstance(accepted, Accepted)
        return welcome, accepted
