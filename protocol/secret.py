"""Where a farm's secret comes from on the command line, the same for the server, the render client and the tools:
a file (--token-file), the environment ($MICROFARM_TOKEN), or, discouraged, the command line itself (--token, which
every local user can read in the process list).

A token file readable by its group or by everyone is used, with a warning that says how to fix it. ssh refuses such a
key, but an ssh key is one person's identity; a farm secret is shared by every machine of the farm already, and a
farm that refuses to start (or a client that will not join) in the middle of a night's renders protects nothing
the warning does not, since whoever could read the file has read it.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "MICROFARM_TOKEN"
#: A secret is a line of text; a bigger file is the wrong file.
MAX_SECRET_FILE_BYTES = 4096
#: The value the example Secret of deploy/kubernetes ships with: known to everyone, so never accepted as a secret.
EXAMPLE_SECRET = "replace-me-with-a-long-random-secret"


class SecretError(ValueError):
    """The farm secret cannot be read as asked; the message is one sentence for the user."""


def add_secret_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                       help=f"read the farm secret from this file (its first line; keep it private: chmod 600); "
                            f"default: ${ENV_VAR}")
    group.add_argument("--token", default=None, metavar="SECRET",
                       help="the farm secret itself (discouraged: visible to other local users in the process list; "
                            f"use --token-file or ${ENV_VAR})")


def secret_from_args(args: argparse.Namespace, warn: Callable[[str], None] | None = None) -> str | None:
    """The secret the options name (--token-file, else --token, else $MICROFARM_TOKEN), or None for none.
    Raises SecretError."""
    if getattr(args, "token_file", None) is not None:
        return refuse_example(read_secret_file(args.token_file, warn))
    secret = args.token or os.environ.get(ENV_VAR) or None
    return refuse_example(secret) if secret is not None else None


def refuse_example(secret: str) -> str:
    """The secret, unless it is the example value everyone can read in this project's manifests."""
    if secret.strip() == EXAMPLE_SECRET:
        raise SecretError("the farm secret is still the example value of deploy/kubernetes/base/secret.yaml, which "
                          "anyone can read: set a secret of your own (for example: openssl rand -hex 24)")
    return secret


def read_secret_file(path: Path, warn: Callable[[str], None] | None = None) -> str:
    """The first line of a token file, without its line ending and surrounding blanks. Raises SecretError."""
    warn = warn or log.warning
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SecretError(f"the token file {path} is not a regular file")
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretError(f"the token file {path} is over {MAX_SECRET_FILE_BYTES} bytes: not a farm secret")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"the token file {path} is not UTF-8 text") from None
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise SecretError(f"the token file {path} is empty: its first line is the farm secret")
    if sys.platform != "win32" and info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        who = "everyone" if info.st_mode & stat.S_IROTH else "its group"
        warn(f"the token file {path} is readable by {who} (mode {stat.S_IMODE(info.st_mode):04o}); "
             f"anyone who can read it can join or command the farm: chmod 600 {path}")
    return secret
