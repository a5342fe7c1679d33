"""Typed errors shared by every layer.

Core logic raises these; each service's interceptor maps them to one gRPC status code
(and the HTTP front to one status), so the mapping lives in one place per transport.
"""

from __future__ import annotations


class SpecmeshError(Exception):
    """Base class of every error specmesh raises on purpose."""


class InvalidRequestError(SpecmeshError, ValueError):
    """The caller sent something we refuse to run (maps to INVALID_ARGUMENT / HTTP 400)."""


class ModelReferenceError(SpecmeshError, ValueError):
    """A model reference (hub id, directory, GGUF file, short name) cannot be resolved or loaded."""


class TokenizerMismatchError(SpecmeshError, ValueError):
    """Drafter and verifier do not share a tokenizer, so draft token ids would mean nothing."""


class CacheMissError(SpecmeshError):
    """A drafter or verifier does not hold the state the caller believes it holds.

    Raised when a session was evicted, never seen, or its cached length differs from the
    caller's belief. The scheduler answers by resending the session's full history.
    """

    def __init__(self, session_id: str, message: str) -> None:
        super().__init__(f"session {session_id!r}: {message}")
        self.session_id = session_id


class CapacityError(SpecmeshError):
    """No room for another session or a longer context (maps to RESOURCE_EXHAUSTED)."""
