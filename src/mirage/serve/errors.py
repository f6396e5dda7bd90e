"""Typed errors of the prediction service and the ONE table mapping them to HTTP status codes.

Every rejection raised anywhere in :mod:`mirage.serve` is a :class:`ServeError` subclass with a
machine-readable ``reason``; this module is the only place that knows HTTP: :func:`http_status`
maps errors to status codes and :func:`error_response` renders them; :func:`grpc_status` derives
the gRPC binding's codes from the same table.
"""

from __future__ import annotations

import math


class ServeError(Exception):
    """A request the service refuses; ``reason`` labels it in responses and metrics."""

    reason = "error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ServeError):
    reason = "bad_request"


class PayloadTooLarge(ServeError):
    reason = "payload_too_large"


class BatchTooLarge(ServeError):
    reason = "batch_too_large"


class UnknownModel(ServeError):
    reason = "unknown_model"


class UnknownVersion(ServeError):
    """A version path (``/v2/models/{name}/versions/{v}``) naming a version the model lacks."""

    reason = "unknown_version"


class MissingKey(ServeError):
    reason = "missing_key"


class InvalidKey(ServeError):
    reason = "invalid_key"


class QuotaExceeded(ServeError):
    reason = "quota_exceeded"


class RateLimited(ServeError):
    reason = "rate_limited"


class RequestTimeout(ServeError):
    """The body did not arrive in time (a stalled or slow-loris client)."""

    reason = "request_timeout"


class ClientGone(ServeError):
    """The client hung up before its request was read; nobody reads the answer."""

    reason = "client_disconnected"


class AuthThrottled(ServeError):
    """Too many failed authentications from one source address."""

    reason = "auth_throttled"


class Forbidden(ServeError):
    reason = "forbidden"


class QueryStreamRefused(ServeError):
    """The client's query stream raised the detector's alarm and ``detection.on_alarm`` is
    ``refuse`` (docs/design.md §detection); refused before anything is charged."""

    reason = "query_stream_refused"


class NotFound(ServeError):
    reason = "not_found"


class MethodNotAllowed(ServeError):
    reason = "method_not_allowed"


class NotReady(ServeError):
    reason = "not_ready"


class StorageUnavailable(ServeError):
    """Quotas, the audit log or the evidence store failed or did not answer within
    ``storage.timeout_s`` (a locked SQLite file, a stalled Redis, a full disk). Its message says
    truly what was charged (docs/design.md §service-errors). ``settled``: the failed call had no
    effect (false when it was given up on while it may still land)."""

    reason = "storage_unavailable"

    def __init__(
        self, message: str, *, retry_after: float | None = None, settled: bool = True
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.settled = settled


class InferenceFailed(ServeError):
    """The model or defense failed on a validated request (a server bug; the quota is refunded)."""

    reason = "inference_failed"


class InternalError(ServeError):
    """An exception nothing else mapped (a bug); answered as JSON all the same."""

    reason = "internal_error"


class UpstreamError(ServeError):
    """The upstream model server of a gateway (docs/design.md §gateway) answered an error
    status: a 5xx after the retries, or a 4xx (never retried: the request was valid here, so the
    gateway and the upstream disagree). Nothing is charged."""

    reason = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """The upstream refused or dropped the connection, also after the retries."""

    reason = "upstream_unreachable"


class UpstreamInvalidAnswer(UpstreamError):
    """The upstream answered 200 with something the gateway cannot serve: a body that does not
    decode, no such output, a wrong shape or datatype, NaN or infinite values, or rows that are
    not probability vectors when ``output = "probabilities"``."""

    reason = "upstream_invalid_answer"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within ``timeout_s``, also after the retries."""

    reason = "upstream_timeout"


HTTP_STATUS: dict[type[ServeError], int] = {
    BadRequest: 400,
    MissingKey: 401,
    InvalidKey: 401,
    Forbidden: 403,
    QueryStreamRefused: 403,
    NotFound: 404,
    UnknownModel: 404,
    UnknownVersion: 404,
    MethodNotAllowed: 405,
    RequestTimeout: 408,
    ClientGone: 400,
    PayloadTooLarge: 413,
    BatchTooLarge: 413,
    QuotaExceeded: 429,
    RateLimited: 429,
    AuthThrottled: 429,
    InferenceFailed: 500,
    InternalError: 500,
    UpstreamError: 502,
    UpstreamUnreachable: 502,
    UpstreamInvalidAnswer: 502,
    NotReady: 503,
    StorageUnavailable: 503,
    UpstreamTimeout: 504,
}


def http_status(error: ServeError) -> int:
    """The HTTP status of ``error`` (most specific class in the table wins)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


def from_http_status(status: int, message: str) -> ServeError:
    """The typed error for an HTTP error the framework raised itself (an unknown route: 404, a
    wrong method: 405; anything else is a bad request)."""
    return {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}.get(status, BadRequest)(
        message
    )


def error_response(error: ServeError) -> tuple[dict[str, str], int, dict[str, str] | None]:
    """(JSON body, HTTP status, headers) of a rejection: ``{"error", "reason"}``, the status of
    :func:`http_status`, and ``Retry-After`` when the client may retry later."""
    headers = (
        {"Retry-After": str(max(1, math.ceil(error.retry_after)))} if error.retry_after else None
    )
    return {"error": error.message, "reason": error.reason}, http_status(error), headers


GRPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
"""The gRPC status code name of each HTTP status above (the OIP gRPC binding's errors), so the one
table of :data:`HTTP_STATUS` decides both."""


def grpc_status(error: ServeError) -> str:
    """The name of the ``grpc.StatusCode`` of ``error``: a client that hung up is ``CANCELLED``,
    everything else follows its HTTP status."""
    if isinstance(error, ClientGone):
        return "CANCELLED"
    return GRPC_STATUS.get(http_status(error), "INVALID_ARGUMENT")
