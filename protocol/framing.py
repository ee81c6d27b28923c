"""Length-prefixed msgpack framing over asyncio streams.

Every message is a 4-byte big-endian length followed by one msgpack map. The length is
checked against the limit before a single byte of the body is read.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

from .errors import ConnectionClosed, MessageTooLarge, ProtocolError
from .limits import LENGTH_PREFIX_BYTES, MAX_MESSAGE_BYTES

_PREFIX = struct.Struct(">I")


def encode(payload: dict[str, Any], max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Return the framed bytes of one message map."""
    body = msgpack.packb(payload, use_bin_type=True)
    if len(body) > max_bytes:
        raise MessageTooLarge(f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
    return _PREFIX.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Unpack one message body; anything but a map with string keys is a protocol error."""
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise ProtocolError(f"undecodable message: {exc}") from None
    except Exception as exc:  # msgpack raises a few other types on hostile input
        raise ProtocolError(f"undecodable message: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"message is a {type(payload).__name__}, not a map")
    if not all(isinstance(key, str) for key in payload):
        raise ProtocolError("message map has keys that are not strings")
    return payload


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Read one framed message. Raises ConnectionClosed at end of stream."""
    try:
        prefix = await reader.readexactly(LENGTH_PREFIX_BYTES)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionClosed("stream ended inside a length prefix") from None
        raise ConnectionClosed("peer closed the connection") from None
    (length,) = _PREFIX.unpack(prefix)
    if length > max_bytes:
        raise MessageTooLarge(f"peer announced a {length}-byte message; the limit is {max_bytes}")
    if length == 0:
        raise ProtocolError("empty message")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed(f"stream ended after {len(exc.partial)} of {length} message bytes") from None
    return decode_body(body)
