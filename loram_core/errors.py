"""User-facing errors.

Every error a user can cause (a bad config key, a missing checkpoint, a tampered download) is a
`LoramError`: the CLI prints its message as one paragraph and exits non-zero, without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LoramError(Exception):
    """An error the user can fix; the message names the problem and the fix."""


class ConfigError(LoramError):
    """A configuration file or override is invalid."""


class IntegrityError(LoramError):
    """A published file does not match its manifest (hash, size or path)."""
