"""Two error kinds: the user's input is wrong (exit 2) or publishing failed (exit 1)."""
from __future__ import annotations


class PublishInputError(ValueError):
    """Bad destination, incomplete or tampered artifact, revision exists without overwrite."""


class PublishError(RuntimeError):
    """The upload or its verification failed; the message says which step and why."""
