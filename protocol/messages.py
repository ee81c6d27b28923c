"""Message schemas: one frozen dataclass per message type, with explicit to/from wire.

On the wire a message is a msgpack map whose "t" key names the type; the other keys are the
dataclass fields. Unknown keys are ignored (a newer peer may add fields); a missing or
mistyped field, or an unknown type, is a ProtocolError.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import StrEnum
from typing import Any, ClassVar, Union

from .errors import ProtocolError
from .limits import MAX_ERROR_CHARS, MAX_HEARTBEAT_S, MAX_PROJECT_FILES, MAX_RENDER_S
from .manifest import Manifest, ManifestError


class MessageType(StrEnum):
    # handshake
    HELLO = "hello"
    WELCOME = "welcome"
    AUTH = "auth"
    ACCEPTED = "accepted"
    ERROR = "error"
    # render clients
    HEARTBEAT = "heartbeat"
    PROBE = "probe"
    PROBE_RESULT = "probe_result"
    ASSIGN = "assign"
    REVOKE = "revoke"
    LEASE_DONE = "lease_done"
    FRAME_BEGIN = "frame_begin"
    FRAME_FAILED = "frame_failed"
    BLEND_REQUEST = "blend_request"
    BLEND_BEGIN = "blend_begin"
    BLEND_REFUSED = "blend_refused"
    # bulk bytes, following a *_BEGIN message
    CHUNK = "chunk"
    END = "end"
    # control tools (submit, status)
    SUBMIT = "submit"
    UPLOAD_READY = "upload_ready"
    SUBMITTED = "submitted"
    STATUS_REQUEST = "status_request"
    STATUS = "status"
    WATCH = "watch"
    JOB_UPDATE = "job_update"
    JOB_CONTROL = "job_control"
    JOB_CONTROL_DONE = "job_control_done"
    FRAME_LOG_REQUEST = "frame_log_request"
    FRAME_LOG = "frame_log"


class Role(StrEnum):
    WORKER = "worker"
    CONTROL = "control"


@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[MessageType]

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"t": self.TYPE.value}
        for field in dataclasses.fields(self):
            wire[field.name] = getattr(self, field.name)
        return wire


_REGISTRY: dict[str, type[Message]] = {}
_HINTS: dict[type[Message], dict[str, Any]] = {}


def _message(cls: type[Message]) -> type[Message]:
    cls = dataclasses.dataclass(frozen=True)(cls)
    _REGISTRY[cls.TYPE.value] = cls
    return cls


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return _all_finite(value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN and the infinities are no numbers a peer may send (see _all_finite)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is bytes:
        return isinstance(value, bytes)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value) and _all_finite(value)
    raise TypeError(f"unsupported schema type {hint!r}")


def _all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere inside a list or map: what a schema leaves open (a probe's scene, settings,
    a status) is read by other code later, so a float in it is checked here, once, like a float field.
    Iterative, so a deeply nested message cannot exhaust the stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _in_range(message: Message, name: str, low: float, high: float) -> None:
    value = getattr(message, name)
    if not low <= value <= high:
        raise ProtocolError(f"{message.TYPE.value} message has a {name!r} of {value!r}, not between {low} and {high}")


def from_wire(payload: dict[str, Any]) -> Message:
    """Build the message a decoded map describes, checking every field's type."""
    kind = payload.get("t")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in payload:
            value = payload[field.name]
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            raise ProtocolError(f"{kind} message lacks field {field.name!r}")
        if not _type_ok(value, hints[field.name]):
            what = repr(value) if isinstance(value, float) else type(value).__name__
            if isinstance(value, (dict, list)) and not _all_finite(value):
                what += " holding a number that is not finite"
            raise ProtocolError(f"{kind} message has a bad {field.name!r}: {what}")
        values[field.name] = value
    message = cls(**values)
    check = getattr(message, "_check_received", None)
    if check is not None:
        check()  # what a peer sent is validated once, here; what this side builds from checked data is not
    return message


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Bound free text (error messages, logs) before it goes on the wire."""
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _project(message: Any, required: bool) -> Manifest | None:
    """The manifest a Probe, Assign or Submit carries, checked on receipt (from_wire) and kept with the message:
    a 2000-file manifest costs milliseconds to check, so neither a sender that builds the message from a checked
    Manifest (see _ProjectMessage.of) nor a reader that asks for it twice pays again."""
    if "_manifest" in message.__dict__:
        return message.__dict__["_manifest"]
    if not message.files:
        if required and message.main:
            raise ManifestError(f"{message.TYPE.value} names a main file but lists no files")
        return None
    manifest = Manifest.from_wire(message.files, message.main)
    main = manifest.main_file
    if (main.sha256, main.size) != (message.blend_sha256, message.blend_size):
        raise ManifestError(f"{message.TYPE.value}: the main file's checksum or size is not the .blend's")
    object.__setattr__(message, "_manifest", manifest)  # not a field: equality and the wire form ignore it
    return manifest


class _ProjectMessage(Message):
    """A message that carries a job's manifest (files, main, blend_sha256, blend_size)."""

    @classmethod
    def of(cls, manifest: Manifest, **fields: Any) -> Any:
        """The message for an already checked manifest: its wire form is the manifest's cached one, and it is
        not checked again (the peer checks it on receipt)."""
        main = manifest.main_file
        message = cls(blend_sha256=main.sha256, blend_size=main.size, files=manifest.files_wire(),
                      main=manifest.main, **fields)
        object.__setattr__(message, "_manifest", manifest)
        return message

    def _check_received(self) -> None:
        _project(self, True)


# --- handshake -------------------------------------------------------------------------

@_message
class Hello(Message):
    TYPE = MessageType.HELLO
    version: int
    role: str
    name: str
    nonce: bytes
    host: str = ""
    blender: str = ""
    device: str = ""  # what a render client renders on: "CPU", "OPTIX", "CUDA", ...
    devices: list[str] = dataclasses.field(default_factory=list)  # everything it could use
    allow_scripts: bool = False  # a render client started with --allow-scripts runs the scripts of .blend files


@_message
class Welcome(Message):
    TYPE = MessageType.WELCOME
    version: int
    farm: str
    nonce: bytes
    auth_required: bool
    proof: bytes | None = None


@_message
class Auth(Message):
    TYPE = MessageType.AUTH
    proof: bytes | None = None


@_message
class Accepted(Message):
    TYPE = MessageType.ACCEPTED
    client_id: str
    heartbeat_s: float  # 0: the client's default

    def _check_received(self) -> None:
        _in_range(self, "heartbeat_s", 0, MAX_HEARTBEAT_S)


@_message
class Error(Message):
    TYPE = MessageType.ERROR
    reason: str


# --- render clients ---------------------------------------------------------------------

@_message
class Heartbeat(Message):
    TYPE = MessageType.HEARTBEAT
    state: str = "idle"  # idle, downloading, opening, rendering, busy (finishing work the server took back)
    job_id: str | None = None
    frame: int | None = None
    lease_id: int | None = None
    device: str = ""  # changes when a failing GPU made the client fall back to the CPU


@_message
class Probe(_ProjectMessage):
    """Ask a client to open a job's .blend and report its scene settings."""

    TYPE = MessageType.PROBE
    lease_id: int
    job_id: str
    blend_sha256: str
    blend_size: int
    allow_scripts: bool = False
    files: list[dict] = dataclasses.field(default_factory=list)  # the job's manifest (protocol.manifest)
    main: str = ""  # the relative path of the .blend among files

    def manifest(self) -> Manifest:
        """The job's files; a server that sends none means the .blend alone."""
        return _project(self, True) or Manifest.single("scene.blend", self.blend_sha256, self.blend_size)


@_message
class ProbeResult(Message):
    TYPE = MessageType.PROBE_RESULT
    lease_id: int
    ok: bool
    scene: dict = dataclasses.field(default_factory=dict)
    error: str = ""


@_message
class Assign(_ProjectMessage):
    """Render these frames of a job; settings are data applied through the bpy API."""

    TYPE = MessageType.ASSIGN
    lease_id: int
    job_id: str
    blend_sha256: str
    blend_size: int
    frames: list[int]
    settings: dict
    files: list[dict] = dataclasses.field(default_factory=list)  # as in Probe
    main: str = ""

    def manifest(self) -> Manifest:
        return _project(self, True) or Manifest.single("scene.blend", self.blend_sha256, self.blend_size)


@_message
class Revoke(Message):
    """Stop work on these frames of a lease (all of its frames when the list is empty)."""

    TYPE = MessageType.REVOKE
    lease_id: int
    frames: list[int] = dataclasses.field(default_factory=list)


@_message
class LeaseDone(Message):
    TYPE = MessageType.LEASE_DONE
    lease_id: int


@_message
class FrameBegin(Message):
    """A rendered frame follows as CHUNK messages and one END."""

    TYPE = MessageType.FRAME_BEGIN
    lease_id: int
    job_id: str
    frame: int
    ext: str
    size: int
    render_s: float = 0.0
    # Files missing while it rendered (what the client's scan found, and Blender's own lines), named as the
    # artist wrote them; the frame is kept, the job carries the warning (protocol.assets bounds them).
    warnings: list[str] = dataclasses.field(default_factory=list)

    def _check_received(self) -> None:
        _in_range(self, "render_s", 0, MAX_RENDER_S)


@_message
class FrameFailed(Message):
    """A frame could not be rendered: Blender's error, and the tail of what it printed."""

    TYPE = MessageType.FRAME_FAILED
    lease_id: int
    job_id: str
    frame: int
    error: str
    log: str = ""


@_message
class BlendRequest(Message):
    """Send me this file of a job I was given (any file of its manifest, the .blend or what it needs)."""

    TYPE = MessageType.BLEND_REQUEST
    sha256: str


@_message
class BlendBegin(Message):
    TYPE = MessageType.BLEND_BEGIN
    sha256: str
    size: int


@_message
class BlendRefused(Message):
    """The server will not send this file (no running job of this client uses it): drop the task."""

    TYPE = MessageType.BLEND_REFUSED
    sha256: str
    reason: str


@_message
class Chunk(Message):
    TYPE = MessageType.CHUNK
    data: bytes


@_message
class End(Message):
    TYPE = MessageType.END
    sha256: str


# --- control tools ------------------------------------------------------------------------

@_message
class Submit(_ProjectMessage):
    """Create a job. The server answers UPLOAD_READY; the files it lacks follow, in the order it asked.

    files is the project's manifest (main the .blend's relative path among them); without it the job is
    the .blend alone, as blend_sha256 and blend_size describe it (which are the main file's in any case).
    """

    TYPE = MessageType.SUBMIT
    name: str
    blend_sha256: str
    blend_size: int
    settings: dict
    priority: int = 0
    start: bool = True
    video: dict | None = None
    files: list[dict] = dataclasses.field(default_factory=list)
    main: str = ""

    def manifest(self) -> Manifest | None:
        return _project(self, True)


@_message
class UploadReady(Message):
    TYPE = MessageType.UPLOAD_READY
    need_bytes: bool
    need: list[str] = dataclasses.field(default_factory=list)  # the sha256 of each file to send, in order

    def __post_init__(self) -> None:
        if len(self.need) > MAX_PROJECT_FILES or not all(len(sha) == 64 for sha in self.need):
            raise ManifestError("upload_ready asks for more files than a project has, or names one badly")


@_message
class Submitted(Message):
    TYPE = MessageType.SUBMITTED
    job_id: str


@_message
class StatusRequest(Message):
    TYPE = MessageType.STATUS_REQUEST


@_message
class Status(Message):
    TYPE = MessageType.STATUS
    jobs: list[dict]
    clients: list[dict]


@_message
class Watch(Message):
    TYPE = MessageType.WATCH
    job_id: str


@_message
class JobUpdate(Message):
    TYPE = MessageType.JOB_UPDATE
    job: dict


@_message
class JobControl(Message):
    """cancel, pause, resume, force_complete, delete, clear_completed, priority or video."""

    TYPE = MessageType.JOB_CONTROL
    action: str
    job_id: str = ""
    args: dict = dataclasses.field(default_factory=dict)


@_message
class JobControlDone(Message):
    TYPE = MessageType.JOB_CONTROL_DONE
    message: str
    jobs: list[dict] = dataclasses.field(default_factory=list)


@_message
class FrameLogRequest(Message):
    TYPE = MessageType.FRAME_LOG_REQUEST
    job_id: str
    frame: int


@_message
class FrameLog(Message):
    TYPE = MessageType.FRAME_LOG
    job_id: str
    frame: int
    failures: int
    error: str
    log: str
    clients: list[str]


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)
