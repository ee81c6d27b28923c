"""The open-files limit and what the server's connection limits need of it.

Each render client can hold two descriptors (its socket and the frame it uploads), a tool two (its socket and a
file it submits), a web connection two (its socket and a file it downloads), a handshake one; the server itself
needs a few dozen more (its database, stores, zeroconf, logs). The soft limit is raised toward the hard one as
far as that needs; where the machine allows fewer, fewer render clients are let in, and the log says so.
"""

from __future__ import annotations

import logging

from .config import ServerConfig

__all__ = ["FD_RESERVE", "connection_budget", "raise_open_files"]

log = logging.getLogger(__name__)

#: Descriptors the server needs besides its connections.
FD_RESERVE = 64


def _needed(config: ServerConfig, workers: int) -> int:
    return (2 * workers + 2 * config.max_tool_connections + config.max_pending_handshakes
            + 2 * config.web_max_connections + FD_RESERVE)


def raise_open_files(wanted: int) -> int | None:
    """Raise the soft open-files limit to `wanted` where the hard limit allows (never lower it); returns the
    soft limit now, or None where there is no such limit (Windows, or unlimited)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("open-files limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_budget(config: ServerConfig) -> int:
    """How many render clients may be connected at once: config.max_connections where the open-files limit
    (raised as far as needed and allowed) has room for them, fewer where it has not (logged once)."""
    asked = max(1, config.max_connections)
    limit = raise_open_files(_needed(config, asked))
    if limit is None or _needed(config, asked) <= limit:
        return asked
    room = (limit - _needed(config, 0)) // 2
    allowed = max(1, min(asked, room))
    log.warning("the open-files limit (%d) leaves room for %d render clients at once, not the %d asked "
                "(max connections); raise it (ulimit -n) to let more in", limit, allowed, asked)
    return allowed
