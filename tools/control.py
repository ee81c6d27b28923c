"""A control connection to a farm server, shared by the command-line tools."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import messages as m
from protocol.address import AddressError, parse_server
from protocol.errors import ProtocolError
from protocol.handshake import client_handshake
from protocol.manifest import Manifest, ManifestError, ProjectFile
from protocol.messages import Role
from protocol.names import printable
from protocol.secret import SecretError, secret_from_args
from protocol.stream import MessageStream, sha256_file
from protocol.units import human_bytes

CONNECT_TIMEOUT_S = 10.0


class ToolError(Exception):
    """A failure to report to the user as one line."""


def run_tool(main: Coroutine[Any, Any, int]) -> int:
    """Run a tool's coroutine; failures end as one line on stderr and a non-zero exit, never a traceback."""
    try:
        return asyncio.run(main)
    except ToolError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)  # often the server's words
        return 1
    except (ProtocolError, OSError) as exc:
        print(f"error: lost the connection to the farm: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def secret(args: argparse.Namespace) -> str | None:
    """The farm secret a tool's options name (see protocol.secret.add_secret_options); raises ToolError."""
    try:
        return secret_from_args(args, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    except SecretError as exc:
        raise ToolError(str(exc)) from None


@dataclass(frozen=True)
class UploadPlan:
    """What a submission sends: the whole project, and the contents the server lacks."""

    manifest: Manifest
    need: list[str]
    upload_bytes: int

    def describe(self) -> str:
        files, total = len(self.manifest.files), self.manifest.total_bytes
        kept = sum(1 for f in self.manifest.files if f.sha256 not in self.need)
        return (f"{files} file{'s' if files != 1 else ''} ({human_bytes(total)}); the farm has {kept} of them "
                f"already; uploading {len(self.need)} ({human_bytes(self.upload_bytes)})")



class Control:
    def __init__(self, stream: MessageStream) -> None:
        self.stream = stream

    @classmethod
    async def connect(cls, server: str, token: str | None, name: str = "") -> Control:
        try:
            host, port = parse_server(server)
        except AddressError as exc:
            raise ToolError(str(exc)) from None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            raise ToolError(f"cannot reach the farm at {host}:{port}: {exc or 'timed out'}") from None
        stream = MessageStream(reader, writer)
        try:
            await client_handshake(stream, role=Role.CONTROL, name=name or f"tool@{socket.gethostname()}",
                                   secret=token)
        except (TimeoutError, ProtocolError) as exc:
            await stream.aclose()
            raise ToolError(str(exc) or "handshake timed out") from None
        return cls(stream)

    async def close(self) -> None:
        await self.stream.aclose()

    async def _reply(self, kind: type[m.Message]) -> m.Message:
        try:
            message = await self.stream.recv()
        except ProtocolError as exc:
            raise ToolError(f"the server closed the connection: {exc}") from None
        if isinstance(message, m.Error):
            raise ToolError(message.reason)
        if not isinstance(message, kind):
            raise ToolError(f"unexpected {message.TYPE.value} from the server")
        return message

    async def _refusal(self) -> str | None:
        """The reason the server gave before it closed the connection, if it gave one."""
        try:
            message = await asyncio.wait_for(self.stream.recv(), 2.0)
        except (ProtocolError, TimeoutError, OSError):
            return None
        return message.reason if isinstance(message, m.Error) else None

    async def status(self, *, all_jobs: bool = True) -> m.Status:
        """The farm's clients and jobs: every job (page after page, for a queue too long for one reply), or
        with all_jobs=False the first page only."""
        await self.stream.send(m.StatusRequest())
        reply = await self._reply(m.Status)
        assert isinstance(reply, m.Status)
        jobs = list(reply.jobs)
        while all_jobs and reply.jobs and len(jobs) < reply.jobs_total:
            await self.stream.send(m.StatusRequest(job_offset=len(jobs)))
            page = await self._reply(m.Status)
            assert isinstance(page, m.Status)
            if not page.jobs:
                break  # jobs went meanwhile
            jobs += page.jobs
            reply = page
        return m.Status(jobs=jobs, clients=reply.clients, jobs_total=max(reply.jobs_total, len(jobs)))

    async def submit(self, blend: Path, settings: dict[str, Any], *, priority: int = 0, start: bool = True,
                     video: dict[str, Any] | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     files: list[tuple[str, Path]] | None = None, main: str | None = None,
                     on_plan: Callable[[UploadPlan], None] | None = None) -> tuple[str, bool]:
        """Send a job; returns its id and whether any bytes had to be uploaded.

        files: the project, (relative path in the job, file on this disk), main the .blend's relative path
        among them (default: the .blend alone, under its own name). The server says which contents it
        lacks; only those are sent (on_plan hears what travels before any byte does).
        """
        if files is None:
            files, main = [(blend.name, blend)], blend.name
        assert main is not None
        entries: list[ProjectFile] = []
        local: dict[str, Path] = {}
        for relpath, path in files:
            sha = await asyncio.to_thread(sha256_file, path)
            entries.append(ProjectFile(relpath, sha, path.stat().st_size))
            local.setdefault(sha, path)
        try:
            manifest = Manifest.build(entries, main)
        except ManifestError as exc:
            raise ToolError(str(exc)) from None
        blend_entry = manifest.main_file
        await self.stream.send(m.Submit(name=blend.name, blend_sha256=blend_entry.sha256, blend_size=blend_entry.size,
                                        settings=settings, priority=priority, start=start, video=video,
                                        **manifest.to_wire()))
        ready = await self._reply(m.UploadReady)
        assert isinstance(ready, m.UploadReady)
        need = list(ready.need) if ready.need or not ready.need_bytes else [blend_entry.sha256]  # an older server
        sizes = {f.sha256: f.size for f in manifest.files}
        if any(sha not in sizes for sha in need):
            raise ToolError("the server asked for a file that is not part of this job")
        plan = UploadPlan(manifest, need, sum(sizes[sha] for sha in need))
        if on_plan:
            on_plan(plan)
        counter = [0]
        for sha in need:
            task = asyncio.create_task(self.stream.send_file(None, local[sha], counter=counter))
            while not task.done():
                if progress:
                    progress(counter[0], plan.upload_bytes)
                await asyncio.wait({task}, timeout=0.2)
            try:
                sent = task.result()
            except ProtocolError as exc:
                # The server may have refused the upload (the file changed while it was sent): say why.
                raise ToolError(await self._refusal() or f"the upload was cut off: {exc}") from None
            if sent != sha:
                raise ToolError(f"{local[sha]} changed while it was being sent; submit again")
        submitted = await self._reply(m.Submitted)
        assert isinstance(submitted, m.Submitted)
        return submitted.job_id, bool(need)

    async def job_action(self, action: str, job_id: str = "", **args: Any) -> m.JobControlDone:
        await self.stream.send(m.JobControl(action=action, job_id=job_id, args=args))
        reply = await self._reply(m.JobControlDone)
        assert isinstance(reply, m.JobControlDone)
        return reply

    async def frame_log(self, job_id: str, frame: int) -> m.FrameLog:
        await self.stream.send(m.FrameLogRequest(job_id=job_id, frame=frame))
        reply = await self._reply(m.FrameLog)
        assert isinstance(reply, m.FrameLog)
        return reply

    async def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        await self.stream.send(m.Watch(job_id=job_id))
        while True:
            update = await self._reply(m.JobUpdate)
            assert isinstance(update, m.JobUpdate)
            yield update.job
            if update.job.get("settled"):
                return
