"""Typed errors for Prism calls, mapped from gRPC status codes (sync and ``grpc.aio`` alike).

Every failed call raises a :class:`PrismError` subclass chosen by the status code::

    try:
        client.complete("hi")
    except ResourceExhaustedError as e:       # the deployment is saturated
        time.sleep(e.retry_after_s or 1.0)
    except InvalidArgumentError as e:         # fix the request; e.message says what is wrong
        ...

``details`` holds the call's trailing metadata (keys lower-case; ``-bin`` keys as bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import grpc

#: Trailing-metadata key the server sets (milliseconds) when a retry makes sense later.
RETRY_AFTER_KEY = "retry-after-ms"


class PrismError(Exception):
    """A failed Prism call: gRPC status ``code``, the server's ``message`` and ``details``
    (trailing metadata). ``retry_after_s`` is the server's retry hint, when it sent one."""

    #: Whether retrying the same request later can succeed.
    retryable = False

    def __init__(self, code: grpc.StatusCode, message: str = "", details: Mapping[str, Any] | None = None):
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after_s = _retry_after(self.details)

    def __reduce__(self):  # picklable despite the custom __init__
        return (type(self), (self.code, self.message, self.details))


class CancelledError(PrismError):
    """The call was cancelled (by the caller or the server)."""


class UnknownError(PrismError):
    """The server failed without a specific status."""


class InvalidArgumentError(PrismError):
    """The request is invalid (bad parameters, undecodable media, too many tokens...)."""


class DeadlineExceededError(PrismError):
    """The deadline (client timeout or the request's ``deadline_ms``) passed first."""

    retryable = True


class NotFoundError(PrismError):
    """An unknown model (or other named resource)."""


class AlreadyExistsError(PrismError):
    """A request with this ``request_id`` is already running."""


class PermissionDeniedError(PrismError):
    """The caller may not do this."""


class ResourceExhaustedError(PrismError):
    """The deployment is saturated or a quota is spent; see ``retry_after_s``."""

    retryable = True


class FailedPreconditionError(PrismError):
    """The system is not in a state to serve this (e.g. the model is not loaded)."""


class AbortedError(PrismError):
    """The work was aborted (e.g. a worker was drained); retrying may succeed."""

    retryable = True


class OutOfRangeError(PrismError):
    """A value is past a valid range."""


class UnimplementedError(PrismError):
    """The server does not implement this."""


class InternalError(PrismError):
    """The server hit a bug."""


class UnavailableError(PrismError):
    """The server cannot be reached or is shutting down; retrying later may succeed."""

    retryable = True


class DataLossError(PrismError):
    """Unrecoverable data loss."""


class UnauthenticatedError(PrismError):
    """Missing or invalid credentials."""


_BY_CODE: dict[grpc.StatusCode, type[PrismError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_class(code: grpc.StatusCode) -> type[PrismError]:
    """The :class:`PrismError` subclass for a status code (``PrismError`` itself for OK)."""
    return _BY_CODE.get(code, PrismError)


def _retry_after(details: Mapping[str, Any]) -> float | None:
    raw = details.get(RETRY_AFTER_KEY)
    if raw is None:
        return None
    try:
        ms = float(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms >= 0 else None


def _metadata_dict(metadata) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        out[str(key).lower()] = value
    return out


def _call(method, default):
    try:
        return method() if callable(method) else default
    except Exception:  # noqa: BLE001 - some RpcError stand-ins lack a method
        return default


def from_rpc_error(err: grpc.RpcError) -> PrismError:
    """The typed error for a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError``."""
    code = _call(getattr(err, "code", None), None)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = _call(getattr(err, "details", None), None) or ""
    details = _metadata_dict(_call(getattr(err, "trailing_metadata", None), None))
    error = error_class(code)(code, message, details)
    error.__cause__ = err
    return error


__all__ = [
    "RETRY_AFTER_KEY",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PrismError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_class",
    "from_rpc_error",
]
