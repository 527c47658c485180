"""Typed domain errors shared by every Epicycle service.

The numerical cores raise these; nothing here imports grpc.  The one place
that turns them into gRPC status codes is :mod:`protos.status`
(``STATUS_FOR_ERROR``); servicers never pick a status code themselves.

Which one to raise:

``InvalidInput``
    The request itself is wrong (NaN coordinates, singular cell, unknown
    element, wrong array shape, bad setting).  Retrying the same request
    cannot help.  -> ``INVALID_ARGUMENT``.
``SetupError``
    The service is not set up to do this (a DFT executable or a
    pseudopotential is missing, an optional package is not installed).
    -> ``FAILED_PRECONDITION``.
``CalculationFailed``
    The backend ran and failed on this input (SCF not converged, the
    executable crashed, output missing).  Carries the tail of the log.
    -> ``ABORTED``.
``CalculationTimeout``
    The backend exceeded its wall-time limit.  -> ``DEADLINE_EXCEEDED``.
``Overloaded``
    All workers are busy and the queue is full; retry later or elsewhere.
    -> ``RESOURCE_EXHAUSTED``.
``NotReady``
    The service cannot answer yet (model not loaded, JIT still warming).
    -> ``UNAVAILABLE``.
``NotFound``
    A named thing (run, checkpoint, model version) does not exist.
    -> ``NOT_FOUND``.
``ModelError``
    The model cannot do what was asked in its current state, e.g. a
    covariance matrix that is not positive definite.  -> ``FAILED_PRECONDITION``.
"""

from __future__ import annotations


class EpicycleError(Exception):
    """Base class of every error Epicycle raises on purpose."""


class InvalidInput(EpicycleError, ValueError):
    """The request is malformed or physically invalid."""


class SetupError(EpicycleError):
    """A required program, file or package is missing or misconfigured."""


class CalculationFailed(EpicycleError):
    """A backend calculation ran but did not produce trustworthy results.

    ``log_tail`` holds the last lines of the backend's output, for the user.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail

    def __str__(self) -> str:
        base = super().__str__()
        if self.log_tail:
            return f"{base}\n--- last lines of the log ---\n{self.log_tail}"
        return base


class CalculationTimeout(CalculationFailed):
    """A backend calculation exceeded its wall-time limit."""


class Overloaded(EpicycleError):
    """Every worker is busy and the wait queue is full."""


class NotReady(EpicycleError):
    """The service is not ready to answer (yet)."""


class NotFound(EpicycleError):
    """A requested object does not exist."""


class ModelError(EpicycleError):
    """The model is in a state that cannot satisfy the request."""
