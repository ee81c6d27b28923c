"""The server's settings and counters, shared by its parts."""

from __future__ import annotations

import bisect
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

from protocol.limits import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S

#: Render clients connected at once; tools (submit, status, ...) are counted apart, up to MAX_TOOL_CONNECTIONS,
#: so that a full farm never locks its operator out.
MAX_CONNECTIONS = 1024
MAX_TOOL_CONNECTIONS = 64
#: Connections still in their handshake, in all and from one address, and how long one may take: a stranger
#: that connects and says nothing holds a slot for HANDSHAKE_TIMEOUT_S at most, and never more than
#: MAX_HANDSHAKES_PER_ADDRESS of them.
MAX_PENDING_HANDSHAKES = 64
MAX_HANDSHAKES_PER_ADDRESS = 8
HANDSHAKE_TIMEOUT_S = 5.0
#: The web interface: connections at once, and how long a request's headers may take to arrive (also the
#: idle time of a kept-alive connection) and how long its body may stall between two reads.
WEB_MAX_CONNECTIONS = 256
WEB_HEADER_TIMEOUT_S = 10.0
WEB_BODY_TIMEOUT_S = 30.0
#: Refused connections and the like are logged as one counted line per address and reason per interval.
REFUSAL_LOG_INTERVAL_S = 10.0


class ServerStartError(Exception):
    """The server cannot start: its folders or its job database are unusable (the message says which)."""


@dataclass
class ServerConfig:
    output_dir: Path
    host: str = "0.0.0.0"
    port: int = 9090
    data_dir: Path | None = None
    secret: str | None = None
    farm_name: str = field(default_factory=socket.gethostname)
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_tool_connections: int = MAX_TOOL_CONNECTIONS
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S
    web_max_connections: int = WEB_MAX_CONNECTIONS
    web_header_timeout: float = WEB_HEADER_TIMEOUT_S
    web_body_timeout: float = WEB_BODY_TIMEOUT_S
    refusal_log_interval: float = REFUSAL_LOG_INTERVAL_S

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.output_dir / ".microfarm"


#: The upper bounds (seconds) of the frame render time histogram's buckets: from a test scene's fraction of a
#: second to a heavy production frame's hour.
RENDER_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


@dataclass
class RenderTimes:
    """How long stored frames took to render, counted into fixed buckets as they arrive (metrics read it)."""

    bounds: tuple[float, ...] = RENDER_SECONDS_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(RENDER_SECONDS_BUCKETS) + 1))  # last: +Inf
    total_s: float = 0.0
    observed: int = 0

    def observe(self, seconds: float | None) -> None:
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            return
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds
        self.observed += 1


@dataclass
class ServerStats:
    blend_bytes_sent: int = 0  # job files (the .blend and what it needs) sent to render clients
    files_sent: int = 0
    upload_bytes_received: int = 0  # job files received from submitters (only what the store lacked)
    files_received: int = 0
    frames_stored: int = 0
    duplicate_frames: int = 0
    connections_refused: int = 0
    render_times: RenderTimes = field(default_factory=RenderTimes)  # of the frames stored
