"""Message schemas: one frozen dataclass per message type, with explicit to/from wire.

On the wire a message is a msgpack map whose "t" key names the type; the other keys are the
dataclass fields. Unknown keys are ignored (a newer peer may add fields); a missing or
mistyped field, or an unknown type, is a ProtocolError.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from .errors import ProtocolError
from .limits import MAX_ERROR_CHARS, MAX_HEARTBEAT_S, MAX_PROGRESS, MAX_PROJECT_FILES, MAX_RENDER_S, MAX_STATUS_JOBS
from .manifest import Manifest, ManifestError
from .schema import (
    CHOICE,
    FINITE,
    FORM,
    LONG,
    MISSING,
    RANGE,
    SHORT,
    TYPE,
    Float,
    Int,
    ListOf,
    Record,
    Str,
    record_of,
    validate,
)


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
    HAND_BACK = "hand_back"
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
_SCHEMAS: dict[type[Message], Record] = {}

#: How a field's problem reads in a message ({kind}: the message type); a field's spec may word its own.
_WORDING = {
    MISSING: "{kind} message lacks field {name!r}",
    RANGE: "{kind} message has a {name!r} of {value!r}, not between {low} and {high}",
    **{problem: "{kind} message has a bad {name!r}: {what}"
       for problem in (TYPE, FINITE, SHORT, LONG, CHOICE, FORM)},
}


def _message(cls: type[Message]) -> type[Message]:
    cls = dataclasses.dataclass(frozen=True)(cls)
    _REGISTRY[cls.TYPE.value] = cls
    return cls


def _schema(cls: type[Message]) -> Record:
    """A message's fields as a Record: each from its type hint (Annotated[T, spec] where a rule says more)."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = record_of(cls, messages=_WORDING)
    return schema


def from_wire(payload: dict[str, Any]) -> Message:
    """Build the message a decoded map describes, checking every field against its schema."""
    if not isinstance(payload, dict):  # decode_body makes sure of it; a caller with a map of its own may not
        raise ProtocolError(f"message is a {type(payload).__name__}, not a map")
    kind = payload.get("t")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    message = cls(**validate(_schema(cls), payload, kind=kind))
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
    tls: bool = False  # in the first, plain hello of a client with a secret: it asks for TLS (protocol.handshake)


@_message
class Welcome(Message):
    TYPE = MessageType.WELCOME
    version: int
    farm: str
    nonce: bytes
    auth_required: bool
    proof: bytes | None = None
    tls: bool = False  # in the plain welcome: TLS follows
    cert_sha256: bytes | None = None  # the server's own certificate (so that a client can name a relay)


@_message
class Auth(Message):
    TYPE = MessageType.AUTH
    proof: bytes | None = None
    cert_sha256: bytes | None = None  # the certificate the client was shown
    # A client with a secret says who it is here, once the server has proved it knows the secret (its hello inside
    # TLS carries no name): a server that cannot prove it learns nothing of the client. Without a secret: in HELLO.
    name: str = ""
    host: str = ""
    blender: str = ""
    device: str = ""
    devices: list[str] = dataclasses.field(default_factory=list)
    allow_scripts: bool = False


@_message
class Accepted(Message):
    TYPE = MessageType.ACCEPTED
    client_id: str
    heartbeat_s: Annotated[float, Float(0, MAX_HEARTBEAT_S)]  # 0: the client's default


@_message
class Error(Message):
    TYPE = MessageType.ERROR
    reason: str


# --- render clients ---------------------------------------------------------------------

@_message
class Heartbeat(Message):
    TYPE = MessageType.HEARTBEAT
    # idle, downloading, opening, rendering, busy (finishing work the server took back), draining (stopping:
    # it takes no new work)
    state: str = "idle"
    job_id: str | None = None
    frame: int | None = None
    lease_id: int | None = None
    device: str = ""  # changes when a failing GPU made the client fall back to the CPU
    # Signs of life of the frame being rendered: a count that grows whenever Blender's render stats change
    # (Cycles' "Sample N/M", a tile, "Synchronizing object"); None from a client that cannot tell.
    progress: Annotated[int | None, Int(0, MAX_PROGRESS)] = None


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
class HandBack(Message):
    """The client is stopping (told to by its machine): it will not render these frames of its lease. The
    server gives them to another client at once and counts no failure against anyone."""

    TYPE = MessageType.HAND_BACK
    lease_id: int
    frames: list[int]


@_message
class FrameBegin(Message):
    """A rendered frame follows as CHUNK messages and one END."""

    TYPE = MessageType.FRAME_BEGIN
    lease_id: int
    job_id: str
    frame: int
    ext: str
    size: int
    render_s: Annotated[float, Float(0, MAX_RENDER_S)] = 0.0
    # Files missing while it rendered (what the client's scan found, and Blender's own lines), named as the
    # artist wrote them; the frame is kept, the job carries the warning (protocol.assets bounds them).
    warnings: list[str] = dataclasses.field(default_factory=list)


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


_BAD_NEED = "upload_ready asks for more files than a project has, or names one badly"
_NEED = ListOf(Str(min_len=64, max_len=64), max_len=MAX_PROJECT_FILES, error=ManifestError,
               message={SHORT: _BAD_NEED, LONG: _BAD_NEED})
_NEED_BUILT = _NEED.but(kind=(list, tuple))  # what this side builds may hold a tuple


@_message
class UploadReady(Message):
    TYPE = MessageType.UPLOAD_READY
    need_bytes: bool
    # the sha256 of each file to send, in order
    need: Annotated[list[str], _NEED] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        validate(_NEED_BUILT, self.need)  # the server's own answer is held to the rule its peers' are


@_message
class Submitted(Message):
    TYPE = MessageType.SUBMITTED
    job_id: str


@_message
class StatusRequest(Message):
    """The farm's clients and a page of its jobs (job_limit 0: as many as a reply carries, MAX_STATUS_JOBS)."""

    TYPE = MessageType.STATUS_REQUEST
    job_offset: Annotated[int, Int(0, 2**31)] = 0
    job_limit: Annotated[int, Int(0, MAX_STATUS_JOBS)] = 0


@_message
class Status(Message):
    """jobs: the page asked for, from job_offset, of jobs_total (a server before pages sends every job and 0)."""

    TYPE = MessageType.STATUS
    jobs: list[dict]
    clients: list[dict]
    jobs_total: Annotated[int, Int(0, 2**31)] = 0
    job_offset: Annotated[int, Int(0, 2**31)] = 0


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
