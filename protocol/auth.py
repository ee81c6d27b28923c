"""Proof of a shared farm secret without sending it: HMAC-SHA256 over both sides' nonces.

Each side proves itself over the other side's fresh nonce, with a different label per
direction, so a proof captured from one direction or one session is useless anywhere else.
Both proofs also cover the sha256 of the TLS certificate the connection runs over (protocol.tls):
the server's proof its own certificate, the client's the one it was shown. A relay that terminates
TLS shows another certificate, so neither proof holds across it.

The server proves itself first (a client must know it talks to its farm before it says anything), so anyone who
reaches the port can take a server proof home and test guesses of the secret against it there, at their own pace.
The proofs are therefore keyed not by the secret itself but by the secret stretched with scrypt (farm_key): each
guess costs a tenth of a second of a core and 32 MiB of memory instead of one HMAC (about a million times more),
while each side computes the key once. A long random secret is still what makes guessing hopeless.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os

from .limits import NONCE_BYTES

_SERVER_LABEL = b"microfarm server proof v3"
_CLIENT_LABEL = b"microfarm client proof v3"
_KEY_SALT = b"microfarm farm key v3"
#: scrypt's cost: N = 2^15, r = 8 (32 MiB), p = 1: about 0.1 s on one core of this project's machines.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


@functools.lru_cache(maxsize=8)
def farm_key(secret: str) -> bytes:
    """The key the proofs are made with: the secret stretched (see the module's text); computed once a process."""
    return hashlib.scrypt(secret.encode("utf-8"), salt=_KEY_SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=4 * 128 * SCRYPT_R * SCRYPT_N, dklen=32)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _proof(secret: str, label: bytes, theirs: bytes, ours: bytes, certificate: bytes) -> bytes:
    # Nonces and fingerprints have fixed lengths, so joining them cannot make two inputs alike.
    message = b"|".join((label, theirs, ours, certificate))
    return hmac.new(farm_key(secret), message, hashlib.sha256).digest()


def server_proof(secret: str, client_nonce: bytes, server_nonce: bytes, certificate: bytes) -> bytes:
    """certificate: the sha256 of the server's TLS certificate (the server's own, or the one a client saw)."""
    return _proof(secret, _SERVER_LABEL, client_nonce, server_nonce, certificate)


def client_proof(secret: str, server_nonce: bytes, client_nonce: bytes, certificate: bytes) -> bytes:
    return _proof(secret, _CLIENT_LABEL, server_nonce, client_nonce, certificate)


def matches(expected: bytes, given: bytes | None) -> bool:
    return given is not None and hmac.compare_digest(expected, given)
