"""Where a farm server is, as people type it after --server (the render client and the tools alike)."""

from __future__ import annotations


class AddressError(ValueError):
    """The text is not HOST:PORT; the message says what is wrong, naming the option."""


def parse_server(text: str, option: str = "--server") -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT, the port required and from 1 to 65535; raises AddressError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{option} wants HOST:PORT, not {text!r}")
    if not (port.isascii() and port.isdigit()):
        raise AddressError(f"{option} port {port!r} is not a number")
    number = int(port)
    if not 0 < number < 65536:
        raise AddressError(f"{option} port {number} is not between 1 and 65535")
    return host.strip("[]"), number
