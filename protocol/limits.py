"""Named limits and timeouts shared by both ends of the wire."""

from __future__ import annotations

#: 2: a farm with a secret speaks TLS after the first, plain hello and welcome (protocol.handshake).
#: 3: the proofs are keyed by the secret stretched with scrypt (protocol.auth.farm_key).
PROTOCOL_VERSION = 3

#: Bytes in the length prefix that precedes every message (unsigned, big-endian).
LENGTH_PREFIX_BYTES = 4

#: Largest encoded message accepted. Checked before the body is read, so a peer that
#: announces more is cut off without us allocating anything for it.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024

#: Largest message before the handshake has succeeded: hello, welcome and auth are tiny.
HANDSHAKE_MAX_BYTES = 16 * 1024

#: Size of the binary pieces that bulk transfers (.blend files, rendered frames) are cut
#: into; well below MAX_MESSAGE_BYTES so a piece plus its envelope always fits.
BULK_CHUNK_BYTES = 512 * 1024

#: Largest .blend a farm accepts, and the largest image a client may send for one frame.
MAX_BLEND_BYTES = 64 * 1024**3
MAX_FRAME_BYTES = 8 * 1024**3

#: A client sends a heartbeat this often; the server declares it lost after TIMEOUT of silence.
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TIMEOUT_S = 5 * HEARTBEAT_INTERVAL_S

#: Longest render time a client may report for one frame (a week): beyond it the number is noise or hostile,
#: and it would overflow the means that tile counts and ETAs are made of.
MAX_RENDER_S = 7 * 24 * 3600.0
#: Largest render progress count a heartbeat may carry (protocol.messages.Heartbeat.progress).
MAX_PROGRESS = 1 << 62
#: Longest heartbeat interval a server may ask of a client.
MAX_HEARTBEAT_S = 3600.0

#: The first exchange (hello, welcome, auth) must finish within this time.
HANDSHAKE_TIMEOUT_S = 10.0

#: Length of the random nonces used to prove knowledge of the farm secret.
NONCE_BYTES = 32

#: Bounds on names and free text coming from the network.
MAX_NAME_CHARS = 128
MAX_ERROR_CHARS = 16 * 1024
MAX_FRAMES_PER_JOB = 1_000_000

#: Bounds on a job's project (protocol.manifest): files in all, bytes in all, and one relative path.
#: A manifest of MAX_PROJECT_FILES paths of MAX_RELPATH_BYTES each still fits in one message.
MAX_PROJECT_FILES = 2000
MAX_PROJECT_BYTES = 256 * 1024**3
MAX_RELPATH_BYTES = 400
MAX_RELPATH_PARTS = 32
#: One part of a relative path (a folder or file name), as most filesystems bound it.
MAX_PATH_PART_BYTES = 255

#: Jobs one STATUS reply carries at most: a tool asks for the next page for more (a queue of thousands of jobs
#: does not fit in one message).
MAX_STATUS_JOBS = 1000
