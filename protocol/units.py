"""Sizes as people read them, for messages on every side (client, server, add-on, tools)."""

from __future__ import annotations


def human_bytes(count: int) -> str:
    """'512 bytes', '986.8 KiB', '32.0 MiB', '3.0 GiB'."""
    size = float(count)
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024:
            return f"{count} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
