"""Names from elsewhere (a peer's hello, a farm's advertisement, a job's file name) as they may be shown: in the
panel, the web page, the status tool and the logs, on every side."""

from __future__ import annotations

import re

from .limits import MAX_NAME_CHARS

_PATH_SEPARATORS = re.compile(r"[\\/]")


def clean_name(text: str, limit: int = MAX_NAME_CHARS) -> str:
    """Printable characters only (so one line, no control or escape codes), without surrounding blanks, bounded."""
    return "".join(ch for ch in text if ch.isprintable()).strip()[:limit]


def clean_file_name(name: str) -> str:
    """A job name from a file name or a relative path that a browser sent: its last part, cleaned."""
    return clean_name(_PATH_SEPARATORS.split(name)[-1])


def printable(text: object, *, lines: bool = False) -> str:
    """Text from a peer (an error, a render log, a warning, a name) as it may go into a log line or onto a terminal:
    every control character shown as its escape (`\\x1b`, `\\r`, `\\n`, ...), so that an ANSI sequence is inert text
    and a CR or LF cannot forge or overwrite a line. With `lines` (a multi-line log shown on purpose), line feeds and
    tabs stay, and CR LF becomes LF."""
    text = str(text)
    if lines:
        text = text.replace("\r\n", "\n")
    if text.isprintable():
        return text
    keep = "\n\t" if lines else ""
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
