"""What TLS costs: the same bulk transfer (a job file sent by the server to a render client) in plain text and over
TLS, each side in its own process, reporting MB/s and the CPU seconds each side spent on it.

    python -m tools.bench tls [--size-mb 1024] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

SECRET = "benchmark secret"
_BLOCK = 1024 * 1024


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("tls", help="one large job-file transfer, plain versus TLS: MB/s and CPU s of each side")
    bench.add_argument("--size-mb", type=int, default=1024, help="size of the file sent (default: 1024, 1 GiB)")
    bench.add_argument("--rounds", type=int, default=1, help="transfers of each kind, alternating (default: 1)")


def _sender(path: str, sha256: str, secret: str | None, cert_dir: str, pipe: Connection) -> None:
    from protocol import messages as m
    from protocol.handshake import server_handshake
    from protocol.stream import MessageStream
    from protocol.tls import ServerTls
    from server_addon.core.certificate import ensure_identity

    tls = ServerTls.load(*ensure_identity(Path(cert_dir))) if secret else None
    size = os.path.getsize(path)

    async def main() -> None:
        done = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = MessageStream(reader, writer)
            await server_handshake(stream, farm="bench", secret=secret, assign_id=lambda _peer: "c1",
                                   heartbeat_s=0, tls=tls)
            cpu = time.process_time()
            await stream.send_file(m.BlendBegin(sha256=sha256, size=size), Path(path))
            await stream.recv()  # the receiver's word that it has all of it
            pipe.send({"sender_cpu_s": time.process_time() - cpu})
            await stream.aclose()
            done.set()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        pipe.send(server.sockets[0].getsockname()[1])
        await done.wait()
        server.close()

    asyncio.run(main())


def _receiver(port: int, secret: str | None, into: str, pipe: Connection) -> None:
    from protocol import messages as m
    from protocol.errors import ProtocolError
    from protocol.handshake import client_handshake
    from protocol.stream import FileSink, MessageStream

    async def main() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = MessageStream(reader, writer)
        await client_handshake(stream, role=m.Role.WORKER, name="bench", secret=secret)
        begin = await stream.recv()
        assert isinstance(begin, m.BlendBegin)
        cpu, wall = time.process_time(), time.perf_counter()
        sink = FileSink(Path(into), begin.size, begin.sha256)
        while True:
            message = await stream.recv()
            if isinstance(message, m.Chunk):
                await asyncio.to_thread(sink.write, message.data)  # as the render client writes its cache
            else:
                assert isinstance(message, m.End)
                await asyncio.to_thread(sink.finish, message.sha256)
                break
        seconds, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sink.abort()
        await stream.send(m.Heartbeat())
        pipe.send({"seconds": seconds, "receiver_cpu_s": cpu, "tls": stream.ssl_object is not None})
        with contextlib.suppress(ProtocolError, OSError):
            await stream.recv()  # until the sender hangs up
        await stream.aclose()

    asyncio.run(main())


def _transfer(path: Path, sha256: str, secret: str | None, work: Path) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    send_end, send_here = spawn.Pipe()
    recv_end, recv_here = spawn.Pipe()
    sender = spawn.Process(target=_sender, args=(str(path), sha256, secret, str(work / "cert"), send_end))
    sender.start()
    port = send_here.recv()
    receiver = spawn.Process(target=_receiver, args=(port, secret, str(work / "into"), recv_end))
    receiver.start()
    result = {**recv_here.recv(), **send_here.recv()}
    for process in (receiver, sender):
        process.join(60)
    size_mb = path.stat().st_size / 1e6
    return {"mode": "tls" if secret else "plain", "mb": round(size_mb), "mb_s": round(size_mb / result["seconds"], 1),
            "seconds": round(result["seconds"], 2), "sender_cpu_s": round(result["sender_cpu_s"], 2),
            "receiver_cpu_s": round(result["receiver_cpu_s"], 2), "encrypted": result["tls"]}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="microfarm-bench-tls-") as folder:
        work = Path(folder)
        path = work / "job.blend"
        digest = hashlib.sha256()
        block = os.urandom(_BLOCK)
        with open(path, "wb") as handle:
            for i in range(args.size_mb):
                piece = block[i % 256:] + block[:i % 256]  # no two blocks alike
                digest.update(piece)
                handle.write(piece)
        results = []
        for _ in range(args.rounds):
            for secret in (None, SECRET):
                results.append(_transfer(path, digest.hexdigest(), secret, work))
        return results
