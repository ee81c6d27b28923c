"""Proof of a shared farm secret without sending it: HMAC-SHA256 over both sides' nonces.

Each side proves itself over the other side's fresh nonce, with a different label per
direction, so a proof captured from one direction or one session is useless anywhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .limits import NONCE_BYTES

_SERVER_LABEL = b"microfarm server proof v1"
_CLIENT_LABEL = b"microfarm client proof v1"


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _proof(secret: str, label: bytes, theirs: bytes, ours: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), label + b"|" + theirs + b"|" + ours, hashlib.sha256).digest()


def server_proof(secret: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _proof(secret, _SERVER_LABEL, client_nonce, server_nonce)


def client_proof(secret: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _proof(secret, _CLIENT_LABEL, server_nonce, client_nonce)


def matches(expected: bytes, given: bytes | None) -> bool:
    return given is not None and hmac.compare_digest(expected, given)
