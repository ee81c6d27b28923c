"""The first exchange: version check and mutual proof of the farm secret.

    client → HELLO(version, role, name, nonce_c)
    server → WELCOME(version, farm, nonce_s, auth_required, proof_s)   proof_s over nonce_c
    client → AUTH(proof_c)                                             proof_c over nonce_s
    server → ACCEPTED(client_id) or ERROR(reason)

A client that holds a secret refuses a server whose proof is missing or wrong, so a rogue
server on the LAN cannot collect .blend files or hand out work.
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


async def server_handshake(stream: MessageStream, *, farm: str, secret: str | None,
                           assign_id: Callable[[Peer], str], heartbeat_s: float,
                           timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Peer, str]:
    """Run the server side; returns the peer and its id, or raises with the reason."""
    async with asyncio.timeout(timeout):
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
        name = clean_name(hello.name) or "unnamed"
        our_nonce = new_nonce()
        proof = server_proof(secret, hello.nonce, our_nonce) if secret else None
        await stream.send(Welcome(version=PROTOCOL_VERSION, farm=farm, nonce=our_nonce,
                                  auth_required=bool(secret), proof=proof))
        auth = await _expect(stream, Auth)
        assert isinstance(auth, Auth)
        if secret and not matches(client_proof(secret, our_nonce, hello.nonce), auth.proof):
            await _refuse(stream, "wrong or missing farm secret")
            raise AuthError(f"client {name!r} failed the farm secret check")
        peer = Peer(role=role, name=name, host=clean_name(hello.host), blender=clean_name(hello.blender),
                    device=clean_name(hello.device), devices=tuple(clean_name(d) for d in hello.devices[:16]),
                    allow_scripts=hello.allow_scripts)
        client_id = assign_id(peer)
        await stream.send(Accepted(client_id=client_id, heartbeat_s=heartbeat_s))
        return peer, client_id


async def client_handshake(stream: MessageStream, *, role: Role, name: str, secret: str | None,
                           blender: str = "", device: str = "", devices: list[str] | None = None,
                           allow_scripts: bool = False,
                           timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Welcome, Accepted]:
    """Run the client side; raises AuthError if the server cannot prove the secret."""
    async with asyncio.timeout(timeout):
        nonce = new_nonce()
        await stream.send(Hello(version=PROTOCOL_VERSION, role=role.value, name=name, nonce=nonce,
                                host=socket.gethostname(), blender=blender, device=device,
                                devices=list(devices or []), allow_scripts=allow_scripts))
        welcome = await _expect(stream, Welcome)
        assert isinstance(welcome, Welcome)
        if welcome.version != PROTOCOL_VERSION:
            raise VersionMismatch(f"server {stream.peer} speaks protocol version {welcome.version}; this client speaks "
                                  f"{PROTOCOL_VERSION}")
        if secret:
            if not matches(server_proof(secret, nonce, welcome.nonce), welcome.proof):
                await _refuse(stream, "server failed to prove the farm secret")
                raise AuthError(f"server {stream.peer} could not prove it knows the farm secret")
            await stream.send(Auth(proof=client_proof(secret, welcome.nonce, nonce)))
        else:
            if welcome.auth_required:
                await _refuse(stream, "no secret configured")
                raise AuthError(f"server {stream.peer} requires the farm secret: pass --token or set MICROFARM_TOKEN")
            await stream.send(Auth(proof=None))
        accepted = await _expect(stream, Accepted)
        assert isinstance(accepted, Accepted)
        return welcome, accepted
