"""A message stream over one asyncio connection, and bounded, verified bulk transfers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import sys
import tempfile
from pathlib import Path

from .errors import ConnectionClosed, ProtocolError, TransferError
from .framing import encode, read_frame
from .limits import BULK_CHUNK_BYTES, MAX_MESSAGE_BYTES
from .messages import Chunk, End, Message, from_wire

#: How long closing a TLS connection waits for the peer's close_notify before it drops the socket.
_TLS_SHUTDOWN_S = 2.0


class MessageStream:
    """Reads and writes whole messages; writes from several tasks never interleave bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.reader = reader
        self.writer = writer
        self.max_bytes = max_bytes
        self._send_lock = asyncio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def peer(self) -> str:
        info = self.writer.get_extra_info("peername")
        if isinstance(info, tuple) and len(info) >= 2:
            return f"{info[0]}:{info[1]}"
        return str(info or "?")

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self.writer.get_extra_info("ssl_object")

    async def start_tls(self, context: ssl.SSLContext, timeout: float | None = None) -> ssl.SSLObject:
        """Turn this connection into TLS in place (the side follows how it was made: accepted or opened).

        Called when the peer has nothing more to say in plain text: a byte already waiting would be read
        as if it had come through TLS, so any is refused."""
        if getattr(self.reader, "_buffer", b""):
            raise ProtocolError("the peer sent plain bytes where TLS should begin")
        extra = {"ssl_shutdown_timeout": _TLS_SHUTDOWN_S} if sys.version_info >= (3, 12) else {}
        try:
            await self.writer.start_tls(context, ssl_handshake_timeout=timeout, **extra)
        except (ssl.SSLError, OSError) as exc:
            raise ProtocolError(f"TLS handshake failed: {exc}") from None
        ssl_object = self.ssl_object
        if ssl_object is None:  # pragma: no cover - start_tls gives an SSL transport or raises
            raise ProtocolError("TLS did not start")
        return ssl_object

    async def recv(self) -> Message:
        payload = await read_frame(self.reader, self.max_bytes)
        return from_wire(payload)

    async def send(self, message: Message) -> None:
        # One write of prefix and body: two writes cost a delayed acknowledgement of the peer, 40 ms a message.
        data = encode(message.to_wire(), self.max_bytes)
        async with self._send_lock:
            if self.writer.is_closing():
                raise ConnectionClosed("connection is closing")
            self.writer.write(data)
            self.bytes_sent += len(data)
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ConnectionClosed(f"send failed: {exc}") from None

    async def send_file(self, begin: Message | None, path: Path, *, counter: list[int] | None = None,
                        sha256: str | None = None) -> str:
        """Send BEGIN (if any), the file as CHUNK messages and END with its sha256; return the digest.

        With `sha256` (a file of a content-addressed store, checked when it was stored) the digest is not
        computed again for every sending: the receiver checks it all the same.

        Other tasks may send their own (small) messages between our chunks; the receiver keeps
        one transfer per direction open at a time, so bulk transfers themselves must not overlap:
        callers serialise them.
        """
        digest = hashlib.sha256() if sha256 is None else None
        if begin is not None:
            await self.send(begin)
        with open(path, "rb") as handle:
            while True:
                # Read off the event loop so heartbeats keep flowing during big transfers.
                data = await asyncio.to_thread(handle.read, BULK_CHUNK_BYTES)
                if not data:
                    break
                if digest is not None:
                    digest.update(data)
                await self.send(Chunk(data=data))
                if counter is not None:
                    counter[0] += len(data)
        hexdigest = digest.hexdigest() if digest is not None else sha256
        assert hexdigest is not None
        await self.send(End(sha256=hexdigest))
        return hexdigest

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout=2.0)
        except (TimeoutError, ConnectionError, OSError):
            pass


class FileSink:
    """Receives one bulk transfer into a temporary file beside its destination.

    Bytes are counted against the announced size as they arrive; the sha256 is checked at the
    end; only then may the caller rename the file into place (commit). Abort removes it.
    """

    def __init__(self, directory: Path, size: int, expected_sha256: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.size = size
        self.received = 0
        self.expected = expected_sha256
        self._digest = hashlib.sha256()
        self.sha256: str | None = None

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.size:
            raise TransferError(f"transfer exceeds its announced size of {self.size} bytes")
        self._digest.update(data)
        self._file.write(data)

    def finish(self, sha256: str) -> str:
        """Close the file and check size and digest; raises TransferError on mismatch."""
        self._file.close()
        if self.received != self.size:
            raise TransferError(f"transfer ended after {self.received} of {self.size} bytes")
        actual = self._digest.hexdigest()
        if actual != sha256 or (self.expected is not None and actual != self.expected):
            raise TransferError("sha256 mismatch: the transfer was corrupted")
        self.sha256 = actual
        return actual

    def commit(self, destination: Path) -> None:
        os.replace(self.path, destination)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
