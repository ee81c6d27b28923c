"""Exceptions raised by the protocol package."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the connection must close."""


class MessageTooLarge(ProtocolError):
    """A length prefix announced more bytes than MAX_MESSAGE_BYTES."""


class ConnectionClosed(ProtocolError):
    """The peer closed the stream (cleanly between messages, or in the middle of one)."""


class AuthError(ProtocolError):
    """The farm secret check failed on one side or the other."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""


class TransferError(ProtocolError):
    """A bulk transfer was out of order, too large, or failed its sha256 check."""


class DiscoveryError(ProtocolError):
    """Zeroconf discovery cannot run as asked: an unknown interface, or sockets that cannot open."""
