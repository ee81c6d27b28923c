"""TLS for farms with a secret: the contexts of both sides and the certificate fingerprints the handshake binds.

No certificate authority is involved. The client accepts whatever certificate it is shown and remembers its
sha256; the secret-keyed proofs of the handshake (protocol.auth) cover the fingerprint each side knows (the
server its own, the client the one it saw). A relay that terminates TLS itself must show its own certificate,
so the proofs no longer match and each side refuses the other; a relay that passes the bytes on reads nothing.
Standard library only: the render client runs in a stock Blender.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerTls", "client_context", "peer_fingerprint", "short"]


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    # Both ends are MicroFarm, so nothing older than TLS 1.3 needs to be spoken.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def client_context() -> ssl.SSLContext:
    """A client context that verifies no chain: the handshake's proofs check the certificate instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return _harden(context)


@dataclass(frozen=True)
class ServerTls:
    """The server's side: its context, and the sha256 of the certificate it presents."""

    context: ssl.SSLContext
    fingerprint: bytes

    @classmethod
    def load(cls, cert: Path, key: Path) -> ServerTls:
        context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        context.load_cert_chain(cert, key)
        der = ssl.PEM_cert_to_DER_cert(cert.read_text("ascii"))
        return cls(context, hashlib.sha256(der).digest())


def peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes:
    """The sha256 of the certificate the other side presented (empty if it presented none)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return hashlib.sha256(der).digest() if der else b""


def short(fingerprint: bytes | None) -> str:
    """A fingerprint as people compare it in logs."""
    return fingerprint.hex()[:16] if fingerprint else "none"
