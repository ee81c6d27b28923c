"""MicroFarm's wire format: framing, message schemas, limits, handshake and bulk transfers.

Shared by the server, the render clients and the command-line tools. No bpy here.
"""

from .errors import AuthError, ConnectionClosed, MessageTooLarge, ProtocolError, TransferError, VersionMismatch
from .limits import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from .messages import MessageType, Role
from .stream import FileSink, MessageStream, sha256_file

__all__ = [
    "AuthError", "ConnectionClosed", "FileSink", "HEARTBEAT_INTERVAL_S", "HEARTBEAT_TIMEOUT_S",
    "MAX_MESSAGE_BYTES", "MessageStream", "MessageTooLarge", "MessageType", "PROTOCOL_VERSION",
    "ProtocolError", "Role", "TransferError", "VersionMismatch", "sha256_file",
]
