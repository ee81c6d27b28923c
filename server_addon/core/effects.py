"""What the scheduler decides and the service carries out: the scheduler changes no socket, file or task
itself; it returns these, in the order they are to happen (see Farm.decide)."""

from __future__ import annotations

from dataclasses import dataclass

from .jobs import Lease, Revocation

__all__ = ["Assign", "BuildVideo", "Effect", "Revocation", "Stitch"]


@dataclass(frozen=True)
class Assign:
    """Send the client its new lease: a probe of the job's file, or frames to render."""

    lease: Lease


@dataclass(frozen=True)
class Stitch:
    """A split job's tiles are all on disk: stitch them into its frame (off the loop)."""

    job_id: str


@dataclass(frozen=True)
class BuildVideo:
    """A finished job's video is due: build it with ffmpeg (off the loop)."""

    job_id: str


#: Revocation (a lease, or some of its frames, no longer wanted from its client) is the fourth effect.
Effect = Stitch | BuildVideo | Revocation | Assign
