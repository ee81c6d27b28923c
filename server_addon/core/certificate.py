"""The server's TLS identity: an Ed25519 key and a self-signed certificate, made once per data dir.

Made with the standard library alone, so the add-on needs no compiled wheel (such as `cryptography`) and no
`openssl` program on Windows or macOS. Nobody checks the certificate against an authority: the farm secret's
handshake covers its sha256 instead (protocol.tls), so the certificate only has to carry the public key that
the TLS library proves possession of. The arithmetic is RFC 8032's, written for clarity, not speed: making a key
and signing one certificate takes a few milliseconds, once.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["CERT_NAME", "KEY_NAME", "ensure_identity", "make_identity"]

CERT_NAME = "farm-cert.pem"
KEY_NAME = "farm-key.pem"

# --- Ed25519 (RFC 8032, section 5.1) -----------------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, -1, _P) % _P
_BY = 4 * pow(5, -1, _P) % _P
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BASE = (_BX, _BY, 1, _BX * _BY % _P)  # extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, xy = T/Z


def _add(p: tuple[int, int, int, int], q: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _times(scalar: int, point: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    result = (0, 1, 1, 0)  # the neutral element
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _encode(point: tuple[int, int, int, int]) -> bytes:
    x, y, z, _ = point
    zi = pow(z, -1, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _expand(seed: bytes) -> tuple[int, bytes]:
    digest = hashlib.sha512(seed).digest()
    scalar = int.from_bytes(digest[:32], "little")
    scalar = (scalar & ((1 << 254) - 8)) | (1 << 254)
    return scalar, digest[32:]


def _public_key(seed: bytes) -> bytes:
    return _encode(_times(_expand(seed)[0], _BASE))


def _sign(seed: bytes, message: bytes) -> bytes:
    scalar, prefix = _expand(seed)
    public = _encode(_times(scalar, _BASE))
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % _L
    big_r = _encode(_times(r, _BASE))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % _L
    return big_r + ((r + k * scalar) % _L).to_bytes(32, "little")


# --- DER (X.690) for one certificate and one PKCS#8 key -----------------------------------------

def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


_ED25519 = _seq(_der(0x06, bytes([0x2B, 0x65, 0x70])))  # AlgorithmIdentifier { 1.3.101.112 }
_COMMON_NAME = bytes([0x55, 0x04, 0x03])  # 2.5.4.3


def _name(text: str) -> bytes:
    return _seq(_der(0x31, _seq(_der(0x06, _COMMON_NAME), _der(0x0C, text.encode("utf-8")))))


def _time(moment: dt.datetime) -> bytes:
    # RFC 5280: UTCTime up to 2049, GeneralizedTime from 2050 on.
    if moment.year < 2050:
        return _der(0x17, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _der(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def _pem(kind: str, der: bytes) -> bytes:
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return ("\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"]) + "\n").encode("ascii")


def make_identity(common_name: str = "MicroFarm server") -> tuple[bytes, bytes]:
    """A new key and its self-signed certificate, both PEM: (certificate, private key)."""
    seed = os.urandom(32)
    serial = int.from_bytes(os.urandom(16), "big") >> 1 or 1  # positive, at most 16 bytes
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    tbs = _seq(
        _der(0x02, serial.to_bytes((serial.bit_length() + 8) // 8, "big")),  # version 1: no extensions
        _ED25519,
        _name(common_name),
        _seq(_time(now - dt.timedelta(days=1)), _der(0x18, b"99991231235959Z")),  # "no well-defined expiry"
        _name(common_name),
        _seq(_ED25519, _der(0x03, b"\x00" + _public_key(seed))),
    )
    certificate = _seq(tbs, _ED25519, _der(0x03, b"\x00" + _sign(seed, tbs)))
    key = _seq(_der(0x02, b"\x00"), _ED25519, _der(0x04, _der(0x04, seed)))
    return _pem("CERTIFICATE", certificate), _pem("PRIVATE KEY", key)


def ensure_identity(directory: Path) -> tuple[Path, Path]:
    """The certificate and key kept in directory (made on first use, the key readable by its owner only)."""
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_identity()
    for path, data in ((key, key_pem), (cert, cert_pem)):
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(part, path)
    log.info("made the farm's TLS certificate in %s", directory)
    return cert, key
