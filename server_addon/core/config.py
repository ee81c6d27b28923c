"""The server's settings and counters, shared by its parts."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from protocol.limits import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S

#: A client on one frame for longer than FACTOR times the job's median frame time (and at least
#: MIN_S, and only once MIN_SAMPLES frames were measured) is treated as lost.
HANG_FACTOR = 10.0
HANG_MIN_S = 120.0
HANG_MIN_SAMPLES = 3


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
    hang_factor: float = HANG_FACTOR
    hang_min_s: float = HANG_MIN_S

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.output_dir / ".microfarm"


@dataclass
class ServerStats:
    blend_bytes_sent: int = 0  # job files (the .blend and what it needs) sent to render clients
    files_sent: int = 0
    upload_bytes_received: int = 0  # job files received from submitters (only what the store lacked)
    files_received: int = 0
    frames_stored: int = 0
    duplicate_frames: int = 0
    connections_refused: int = 0
