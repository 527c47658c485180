"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from protos import errors

#: most specific first: the first matching class wins
STATUS_FOR_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.CalculationTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.CalculationFailed, grpc.StatusCode.ABORTED),
    (errors.SetupError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
)

#: client side: status code -> the domain error a client raises for it
ERROR_FOR_STATUS: dict[grpc.StatusCode, type[errors.EpicycleError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.CalculationTimeout,
    grpc.StatusCode.ABORTED: errors.CalculationFailed,
    grpc.StatusCode.FAILED_PRECONDITION: errors.SetupError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
    grpc.StatusCode.UNAVAILABLE: errors.NotReady,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
}

#: gRPC status messages travel in HTTP/2 trailers; keep them well under header limits
MAX_DETAILS_CHARS = 4000


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a domain error, or None if ``exc`` is not one."""
    for cls, code in STATUS_FOR_ERROR:
        if isinstance(exc, cls):
            return code
    return None


def details_for(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if len(text) > MAX_DETAILS_CHARS:
        head = MAX_DETAILS_CHARS // 4
        text = text[:head] + "\n[...]\n" + text[-(MAX_DETAILS_CHARS - head - 7):]
    return text


def error_from_rpc(exc: grpc.RpcError, what: str = "") -> errors.EpicycleError:
    """Turn a client-side RpcError into the matching domain error (message kept)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = ERROR_FOR_STATUS.get(code, errors.EpicycleError)
    prefix = f"{what}: " if what else ""
    name = code.name if code is not None else "UNKNOWN"
    err = cls(f"{prefix}{details} [{name}]")
    err.grpc_code = code  # type: ignore[attr-defined]
    return err
