"""Proof of a shared farm secret without sending it: HMAC-SHA256 over both sides' nonces.

Each side proves itself over the other side's fresh nonce, with a different label per
direction, so a proof captured from one direction or one session is useless anywhere else.
Both proofs also cover the sha256 of the TLS certificate the connection runs over (protocol.tls):
the server's proof its own certificate, the client's the one it was shown. A relay that terminates
TLS shows another certificate, so neither proof holds across it.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .limits import NONCE_BYTES

_SERVER_LABEL = b"microfarm server proof v2"
_CLIENT_LABEL = b"microfarm client proof v2"


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _proof(secret: str, label: bytes, theirs: bytes, ours: bytes, certificate: bytes) -> bytes:
    # Nonces and fingerprints have fixed lengths, so joining them cannot make two inputs alike.
    message = b"|".join((label, theirs, ours, certificate))
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()


def server_proof(secret: str, client_nonce: bytes, server_nonce: bytes, certificate: bytes) -> bytes:
    """certificate: the sha256 of the server's TLS certificate (the server's own, or the one a client saw)."""
    return _proof(secret, _SERVER_LABEL, client_nonce, server_nonce, certificate)


def client_proof(secret: str, server_nonce: bytes, client_nonce: bytes, certificate: bytes) -> bytes:
    return _proof(secret, _CLIENT_LABEL, server_nonce, client_nonce, certificate)


def matches(expected: bytes, given: bytes | None) -> bool:
    return given is not None and hmac.compare_digest(expected, given)
