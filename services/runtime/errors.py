"""One error taxonomy for the whole platform (ARCHITECTURE.md, house rules).

Every error our code raises on purpose is a :class:`StepAudio2Error` subclass carrying
a machine-readable ``code``. Transports (gRPC servicers, the FastAPI gateway, Triton
``model.py`` adapters) map the code through :data:`ERROR_TABLE` - the only place that
knows gRPC/HTTP/Triton numbers - so the same failure reads the same everywhere.

This module imports nothing heavy and no transport library: the mapping is by *name*
(``"INVALID_ARGUMENT"``), and the transport layer turns the name into its own enum.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorMapping:
    grpc: str      # grpc.StatusCode member name
    http: int      # HTTP status
    triton: str    # pb_utils.TritonError member name


# code -> how each transport reports it.
ERROR_TABLE: dict[str, ErrorMapping] = {
    "INVALID_ARGUMENT": ErrorMapping("INVALID_ARGUMENT", 400, "INVALID_ARG"),
    "UNSUPPORTED_MEDIA": ErrorMapping("INVALID_ARGUMENT", 415, "INVALID_ARG"),
    "TOO_LARGE": ErrorMapping("INVALID_ARGUMENT", 413, "INVALID_ARG"),
    "NOT_FOUND": ErrorMapping("NOT_FOUND", 404, "NOT_FOUND"),
    "UNAUTHENTICATED": ErrorMapping("UNAUTHENTICATED", 401, "INVALID_ARG"),
    "RESOURCE_EXHAUSTED": ErrorMapping("RESOURCE_EXHAUSTED", 429, "UNAVAILABLE"),
    "UNAVAILABLE": ErrorMapping("UNAVAILABLE", 503, "UNAVAILABLE"),
    "DEADLINE_EXCEEDED": ErrorMapping("DEADLINE_EXCEEDED", 504, "UNAVAILABLE"),
    "CANCELLED": ErrorMapping("CANCELLED", 499, "CANCELLED"),
    "FAILED_PRECONDITION": ErrorMapping("FAILED_PRECONDITION", 400, "INVALID_ARG"),
    "ALREADY_EXISTS": ErrorMapping("ALREADY_EXISTS", 409, "ALREADY_EXISTS"),
    "PERMISSION_DENIED": ErrorMapping("PERMISSION_DENIED", 403, "INVALID_ARG"),
    "INTERNAL": ErrorMapping("INTERNAL", 500, "INTERNAL"),
}


class StepAudio2Error(Exception):
    """Base class. ``reason`` is a human sentence naming what is wrong."""

    code: str = "INTERNAL"

    def __init__(self, reason: str, *, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field

    @property
    def mapping(self) -> ErrorMapping:
        return ERROR_TABLE[self.code]

    def __str__(self) -> str:  # "field: reason" when a field is known
        return f"{self.field}: {self.reason}" if self.field else self.reason


class InvalidArgument(StepAudio2Error):
    code = "INVALID_ARGUMENT"


class InvalidAudio(InvalidArgument):
    """Audio that cannot be decoded or used (empty, not audio, NaN, too long...)."""


class UnsupportedAudioFormat(InvalidAudio):
    """Bytes that are no container we decode (WAV/FLAC/OGG) - HTTP 415."""

    code = "UNSUPPORTED_MEDIA"


class AudioTooLarge(InvalidAudio):
    code = "TOO_LARGE"


class CheckpointError(StepAudio2Error):
    """A checkpoint folder that does not match the expected layout/tensors."""

    code = "FAILED_PRECONDITION"


class NotFound(StepAudio2Error):
    code = "NOT_FOUND"


class AlreadyExists(StepAudio2Error):
    """Creating something whose id is taken (a voice id, ...)."""

    code = "ALREADY_EXISTS"


class PermissionDenied(StepAudio2Error):
    """An authenticated caller may not do this (delete another tenant's voice, ...)."""

    code = "PERMISSION_DENIED"


class FailedPrecondition(StepAudio2Error):
    """The request is well-formed but the system is not in a state to run it (a chunk
    for a stream that ended or expired, ...)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(StepAudio2Error):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(StepAudio2Error):
    """No credentials, or credentials that match no configured API key."""

    code = "UNAUTHENTICATED"


class Unavailable(StepAudio2Error):
    """A dependency (the inference server) cannot be reached or is not ready; retryable."""

    code = "UNAVAILABLE"


class DeadlineExceeded(StepAudio2Error):
    """The caller's deadline passed before the work finished."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(StepAudio2Error):
    """The work was cancelled (by the caller, or by the server shutting down)."""

    code = "CANCELLED"


class InferenceError(StepAudio2Error):
    """The inference server failed a request for a reason that is not the caller's fault.

    The reason is safe to show to callers; the server's own message is logged, not sent.
    """

    code = "INTERNAL"
