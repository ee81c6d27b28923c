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
