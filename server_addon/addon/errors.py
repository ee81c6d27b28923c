"""The add-on's exceptions."""

from __future__ import annotations


class FarmError(Exception):
    """Something the user asked for cannot be done; the message is one sentence for them."""


class Cancelled(FarmError):
    """Background work stopped because the add-on is shutting down (nothing to tell the user)."""


def sentence(text: str) -> str:
    """A message from the server core ("job x is done; ...") as a sentence for a report."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
