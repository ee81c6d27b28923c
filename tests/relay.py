"""Men in the middle for tests: a TCP relay on 127.0.0.1 between a client and a farm, on a thread of its own.

"bytes" passes every byte on unchanged and records them (what a capture of the LAN would hold). "terminate"
speaks the protocol's plain hello and welcome through, then ends TLS itself on both legs (its own certificate
towards the client, a TLS client towards the server) and passes and records the decrypted bytes: the relay
that a farm's secret must make both sides detect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import threading
from pathlib import Path

from protocol import messages as m
from protocol.stream import MessageStream
from protocol.tls import ServerTls, client_context
from server_addon.core.certificate import ensure_identity

LOOPBACK = "127.0.0.1"


class Relay:
    def __init__(self, target_port: int, kind: str = "bytes") -> None:
        assert kind in ("bytes", "terminate")
        self.kind = kind
        self.target_port = target_port
        self.port = 0
        self.up = bytearray()  # client -> server, as the relay saw it
        self.down = bytearray()
        self.connections = 0
        self._directory = tempfile.TemporaryDirectory(prefix="microfarm-relay-")
        self.tls = ServerTls.load(*ensure_identity(Path(self._directory.name)))  # its own certificate
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"relay-{kind}", daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def fingerprint(self) -> str:
        return self.tls.fingerprint.hex()[:16]

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self.up + self.down)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await reader.read(65536):
                with self._lock:
                    record.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        if self.kind == "terminate":
            client_side, server_side = MessageStream(reader, writer), MessageStream(up_reader, up_writer)
            try:
                await server_side.send(await client_side.recv())  # the plain hello
                welcome = await server_side.recv()
                await client_side.send(welcome)
                if isinstance(welcome, m.Welcome) and welcome.tls:
                    await asyncio.gather(client_side.start_tls(self.tls.context),
                                         server_side.start_tls(client_context()))
            except Exception:  # noqa: BLE001 - either side giving up ends this connection
                writer.close()
                up_writer.close()
                return
            # start_tls swapped the transports under the same writer objects.
            writer, up_writer = client_side.writer, server_side.writer
        await asyncio.gather(self._pipe(reader, up_writer, self.up), self._pipe(up_reader, writer, self.down))

    def __enter__(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, LOOPBACK, 0), self._loop).result(10.0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()
        self._directory.cleanup()
