"""The labelling core of the Oracle service (no gRPC here).

:class:`LabelService` wraps one :class:`~oracle_service.base.Oracle` and adds
what a shared, expensive oracle needs::

    label(atoms, properties)
      1. normalise the property list; cheap O(n) checks      -> InvalidInput
      2. content hash (structure + properties + backend settings/version)
      3. LRU cache hit?                                        -> cached outcome
         same hash already being computed?                    -> wait for it (single flight)
         workers + queue full?                                -> Overloaded
      4. minimum-distance check under PBC                     -> InvalidInput
      5. wait for a worker slot, run the backend               -> CalculationFailed/Timeout/SetupError
      6. check the labels (shapes, finite) and cache them      -> CalculationFailed

Failures are never cached (a structure that fails ``quarantine_after``
times in a row is refused quickly afterwards).

Cancellation: every call waiting for a calculation (the one that runs it and
the identical ones that joined it) is a *waiter*.  A waiter leaves when its
``cancelled()`` returns True (the RPC was cancelled, the client died) or its
``timeout`` passes (the caller's deadline), also while the calculation runs
(a watcher thread checks the running call's waiter every ``poll_seconds``).
While one waiter is left the calculation goes on for it.  When the last one
leaves, the calculation is cancelled: a backend with
:attr:`~oracle_service.base.Oracle.cancellable` gets its ``cancel`` event set
and stops (QE/GPAW/xTB kill their process group, the ``latency_s`` sleep of
EMT/LJ ends), the worker slot is freed, and nothing is cached or counted
towards quarantine (``calculations_cancelled`` in :meth:`LabelService.stats`).
A backend that is not cancellable runs to the end and its labels are cached.
The backend's own wall-time limit (its ``timeout`` setting ->
CalculationTimeout) is independent of all this.  Everything the backend
raises that is not a typed :class:`protos.errors.EpicycleError` becomes
:class:`CalculationFailed` with a one-line message, never a traceback.

Counters for metrics: :meth:`LabelService.stats` (and the ``in_flight`` /
``queued`` properties).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from protos.errors import (
    CalculationFailed,
    CalculationTimeout,
    EpicycleError,
    InvalidInput,
    Overloaded,
    SetupError,
)

from .base import CalculationCancelled, Labels, Oracle, create_oracle, requested_properties
from .validation import Limits, check_cheap, check_geometry

log = logging.getLogger(__name__)

__all__ = [
    "HASH_VERSION",
    "LabelOutcome",
    "LabelService",
    "OUTCOMES",
    "ServiceConfig",
    "backend_identity",
    "check_labels",
    "content_hash",
]

#: bump when the hashed content changes, so old cache keys never collide
HASH_VERSION = "epicycle-oracle-hash-v1"

#: outcome names counted by :meth:`LabelService.stats` (``calls[outcome]``)
OUTCOMES: tuple[str, ...] = (
    "computed",  # the backend ran and succeeded
    "cached",  # served from the cache
    "coalesced",  # waited for an identical in-flight request
    "invalid",  # InvalidInput (bad request)
    "failed",  # CalculationFailed (backend failed, bad labels, quarantined)
    "timeout",  # CalculationTimeout (backend wall-time, or the caller's timeout passed while it waited)
    "setup_error",  # SetupError (backend not set up)
    "overloaded",  # Overloaded (workers and queue full)
    "cancelled",  # caller went away while it waited (queued, or for a running calculation)
)


@dataclass(frozen=True)
class ServiceConfig:
    """How the labelling core runs one backend.

    workers: calculations at a time (forced to 1 if the backend is not thread-safe).
    queue_limit: requests that may wait for a worker; one more -> Overloaded.
    cache_size: labelled structures kept (LRU, by entries); 0 disables the cache.
    quarantine_after: refuse a structure after this many consecutive
        failures of the backend on it (0 = never).
    limits: input limits (minimum distance, maximum atoms, ...).
    poll_seconds: how often a waiting request (and the watcher of a running
        calculation) checks ``cancelled()`` and the caller's timeout.
    """

    workers: int = 1
    queue_limit: int = 16
    cache_size: int = 1024
    quarantine_after: int = 3
    limits: Limits = field(default_factory=Limits)
    poll_seconds: float = 0.05

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.queue_limit < 0 or self.cache_size < 0 or self.quarantine_after < 0:
            raise ValueError(f"queue_limit, cache_size and quarantine_after must be >= 0: {self}")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")


@dataclass(frozen=True)
class LabelOutcome:
    """The answer to one :meth:`LabelService.label` call.

    labels: exactly the requested properties (arrays are the caller's own copies).
    cached: True if this call did not run the backend (cache hit, or it
        waited for an identical in-flight request: then ``coalesced`` too).
    structure_hash: hex content hash used as the cache key.
    seconds: wall time of the backend calculation that produced the labels
        (for a cached answer: of the original calculation).
    """

    labels: Labels
    cached: bool
    structure_hash: str
    seconds: float
    coalesced: bool = False


# ---------------------------------------------------------------------------
# hashing


def backend_identity(oracle: Oracle) -> str:
    """Canonical JSON of what makes a backend's labels what they are."""
    return json.dumps(
        {
            "name": oracle.name,
            "settings": oracle.settings(),
            "version": oracle.version(),
        },
        sort_keys=True,
        separators=(",", ":"),
        default=repr,
    )


def content_hash(atoms: Atoms, properties: Iterable[str], identity: str) -> str:
    """SHA-256 (hex) over the structure, the properties and the backend identity.

    Numbers are hashed as little-endian int64/float64 bytes with their
    shapes (so dtype and layout of the input do not matter, and -0.0 == 0.0):
    atomic numbers, positions (not wrapped: exact content), cell, pbc, and
    initial magnetic moments / charges when present and non-zero.
    Velocities and other per-atom arrays do not affect labels and are ignored.
    """
    h = hashlib.sha256()

    def put(tag: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        h.update(f"{tag}{arr.shape}".encode())
        h.update(arr.tobytes())

    h.update(HASH_VERSION.encode())
    put("numbers", np.asarray(atoms.numbers).astype("<i8"))
    put("positions", np.asarray(atoms.positions, dtype="<f8") + 0.0)
    put("cell", np.asarray(atoms.cell.array, dtype="<f8") + 0.0)
    put("pbc", np.asarray(atoms.pbc, dtype=np.uint8))
    for name in ("initial_magmoms", "initial_charges"):
        if name in atoms.arrays and np.any(atoms.arrays[name]):
            put(name, np.asarray(atoms.arrays[name], dtype="<f8") + 0.0)
    h.update(("properties" + ",".join(sorted(properties))).encode())
    h.update(("backend" + identity).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# label checks


def check_labels(labels: Any, properties: tuple[str, ...], n_atoms: int, backend: str = "") -> Labels:
    """Return ``labels`` restricted to ``properties``, or raise CalculationFailed.

    Checks that every requested property is present, forces are (n_atoms, 3),
    stress is (6,), and every number is finite.
    """
    who = f"backend {backend!r}" if backend else "backend"
    if not isinstance(labels, Labels):
        raise CalculationFailed(f"{who} returned {type(labels).__name__}, not Labels")
    missing = [p for p in properties if getattr(labels, p) is None]
    if missing:
        raise CalculationFailed(f"{who} did not return {missing}")
    energy = labels.energy if "energy" in properties else None
    forces = labels.forces if "forces" in properties else None
    stress = labels.stress if "stress" in properties else None
    if energy is not None and not np.isfinite(energy):
        raise CalculationFailed(f"{who} returned a non-finite energy: {energy!r}")
    if forces is not None:
        if forces.shape != (n_atoms, 3):
            raise CalculationFailed(f"{who} returned forces of shape {forces.shape}, expected ({n_atoms}, 3)")
        bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
        if bad.size:
            raise CalculationFailed(
                f"{who} returned non-finite forces on {bad.size} atom(s), first atom {int(bad[0])}: "
                f"{forces[bad[0]].tolist()}"
            )
    if stress is not None and not np.all(np.isfinite(stress)):
        raise CalculationFailed(f"{who} returned a non-finite stress: {stress.tolist()}")
    return Labels(energy=energy, forces=forces, stress=stress, info=dict(labels.info))


# ---------------------------------------------------------------------------
# the service


class _Waiter:
    """One call waiting for a flight; ``gone`` says why it left (None while it waits)."""

    __slots__ = ("deadline", "cancelled", "gone")

    def __init__(self, deadline: float | None, cancelled: Callable[[], bool] | None) -> None:
        self.deadline = deadline
        self.cancelled = cancelled
        self.gone: str | None = None

    def check(self) -> str | None:
        """``"cancelled"`` or ``"deadline"`` once the caller went away, else None."""
        if self.gone is None:  # the deadline first: a gRPC call past its deadline is also inactive
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.gone = "deadline"
            elif self.cancelled is not None and self.cancelled():
                self.gone = "cancelled"
        return self.gone


class _Flight:
    """One backend calculation in progress; identical requests wait on it."""

    __slots__ = ("done", "labels", "error", "seconds", "abandoned", "waiters", "computing", "cancel")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.labels: Labels | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.abandoned = False  # not computed (leader left before, or cancelled): waiters retry
        self.waiters: set[_Waiter] = set()  # calls still waiting for the result (the leader's included)
        self.computing = False  # the backend is running
        self.cancel = threading.Event()  # set when the last waiter left a running calculation


@dataclass
class _CacheEntry:
    labels: Labels
    seconds: float


class _Cancelled(Exception):
    pass


class _Dropped(Exception):
    """The leader's caller went away while its calculation ran (``reason``: cancelled / deadline)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LabelService:
    """Validation, content-hash cache, single flight and bounded concurrency
    around one oracle backend.  Thread-safe; one instance per process.

    ``label`` runs the calculation on the calling thread (the gRPC worker
    thread) once a worker slot is free.
    """

    def __init__(self, oracle: Oracle, config: ServiceConfig | None = None) -> None:
        self.oracle = oracle
        self.config = config or ServiceConfig()
        self.workers = self.config.workers if oracle.thread_safe else 1
        self.queue_limit = self.config.queue_limit
        self.identity = backend_identity(oracle)
        #: whether the backend gets the cancel event (it says it honours one and its calculate takes it)
        self.cancellable = bool(getattr(oracle, "cancellable", False)) and _takes_cancel(oracle.calculate)

        self._lock = threading.Lock()
        self._slots = threading.Semaphore(self.workers)
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self._failures: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._admitted = 0  # leaders between admission and completion
        self._running = 0  # leaders holding a worker slot
        self._waiting_followers = 0
        self._calls = dict.fromkeys(OUTCOMES, 0)
        self._compute_seconds_total = 0.0
        self._calculations_cancelled = 0
        self._compute_observers: list[Callable[[str, float], None]] = []

    @classmethod
    def from_backend(
        cls, backend: str, settings: Mapping[str, Any] | None = None, config: ServiceConfig | None = None
    ) -> "LabelService":
        """Build the backend registered as ``backend`` and wrap it."""
        return cls(create_oracle(backend, **dict(settings or {})), config)

    # -- public API -----------------------------------------------------------

    def label(
        self,
        atoms: Atoms,
        properties: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> LabelOutcome:
        """Label ``atoms`` with ``properties`` (None/empty: all implemented).

        timeout: seconds this call may wait (in the queue, for an identical
            in-flight request, or for its own running calculation) before
            giving up with CalculationTimeout (the caller's deadline; the call
            that runs the calculation returns once the backend has stopped).
            None waits as long as it takes.
        cancelled: polled while waiting; returning True abandons the request
            (e.g. the gRPC client went away: ``lambda: not context.is_active()``).

        A running calculation that no call waits for any more is cancelled
        (see the module docstring); one that some call still waits for goes on.

        Raises InvalidInput, Overloaded, CalculationFailed, CalculationTimeout,
        SetupError.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if isinstance(properties, str):
                properties = (properties,)
            props = requested_properties(self.oracle, properties)
            check_cheap(atoms, self.config.limits, self.oracle, props)
            key = content_hash(atoms, props, self.identity)
            outcome = self._label(atoms, props, key, deadline, cancelled)
        except EpicycleError as exc:
            self._count(_outcome_of(exc))
            raise
        except _Cancelled:
            self._count("cancelled")
            raise CalculationFailed("request cancelled by the caller while it waited") from None
        except _QueueTimeout as exc:
            self._count("timeout")
            raise CalculationTimeout(str(exc)) from None
        except _Dropped as exc:
            if exc.reason == "deadline":
                self._count("timeout")
                raise CalculationTimeout(
                    f"oracle {self.oracle.name!r}: the caller's timeout passed while the calculation ran"
                ) from None
            self._count("cancelled")
            raise CalculationFailed("request cancelled by the caller while its calculation ran") from None
        self._count("computed" if not outcome.cached else "coalesced" if outcome.coalesced else "cached")
        return outcome

    def describe(self) -> dict[str, Any]:
        """What this service computes and how (for ``Describe``)."""
        numbers = self.oracle.supported_numbers()
        return {
            "backend": self.oracle.name,
            "implemented_properties": list(self.oracle.implemented_properties),
            "supported_numbers": None if numbers is None else sorted(numbers),
            "supported_elements": None if numbers is None else [chemical_symbols[z] for z in sorted(numbers)],
            "settings": self.oracle.settings(),
            "version": self.oracle.version(),
            "limits": self.config.limits.as_dict(),
            "workers": self.workers,
            "queue_limit": self.queue_limit,
            "cache_size": self.config.cache_size,
            "quarantine_after": self.config.quarantine_after,
            "thread_safe": self.oracle.thread_safe,
            "cancellable": self.cancellable,
        }

    @property
    def in_flight(self) -> int:
        """Calculations running on a worker now."""
        return self._running

    @property
    def queued(self) -> int:
        """Admitted calculations not (yet) running: waiting for a worker or being checked."""
        return self._admitted - self._running

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for metrics (a consistent snapshot)."""
        with self._lock:
            return {
                "in_flight": self._running,
                "queued": self._admitted - self._running,
                "waiting_for_identical": self._waiting_followers,
                "workers": self.workers,
                "queue_limit": self.queue_limit,
                "cache_entries": len(self._cache),
                "cache_size": self.config.cache_size,
                "cache_hits": self._calls["cached"] + self._calls["coalesced"],
                "quarantined": sum(
                    1 for n, _ in self._failures.values() if self.config.quarantine_after and n >= self.config.quarantine_after
                ),
                "calls": dict(self._calls),
                "compute_seconds_total": self._compute_seconds_total,
                "calculations_cancelled": self._calculations_cancelled,
            }

    def add_compute_observer(self, observer: Callable[[str, float], None]) -> None:
        """Call ``observer(outcome, seconds)`` after every backend calculation
        (``outcome``: ``computed``, ``failed``, ``timeout``, ``setup_error`` or ``cancelled``), e.g. for a histogram."""
        self._compute_observers.append(observer)

    def clear_cache(self) -> None:
        """Forget cached labels and failure counts (not in-flight work)."""
        with self._lock:
            self._cache.clear()
            self._failures.clear()

    def close(self) -> None:
        self.oracle.close()

    # -- internals ------------------------------------------------------------

    def _label(self, atoms, props, key, deadline, cancelled) -> LabelOutcome:
        while True:
            waiter = _Waiter(deadline, cancelled)
            with self._lock:
                entry = self._cache.get(key)
                if entry is not None:
                    self._cache.move_to_end(key)
                    return self._outcome(entry.labels, key, entry.seconds, cached=True)
                self._raise_if_quarantined(key)
                flight = self._flights.get(key)
                if flight is None:
                    if self._admitted >= self.workers + self.queue_limit:
                        raise Overloaded(
                            f"oracle {self.oracle.name!r} is busy: {self._running} calculation(s) running, "
                            f"{self._admitted - self._running} waiting (limit {self.workers} + {self.queue_limit}); "
                            "retry later or on another worker"
                        )
                    flight = self._flights[key] = _Flight()
                    self._admitted += 1
                    leader = True
                else:
                    self._waiting_followers += 1
                    leader = False
                flight.waiters.add(waiter)
            if leader:
                return self._lead(atoms, props, key, flight, waiter)
            try:
                self._wait(flight.done.wait, deadline, cancelled, "an identical request to finish")
            except _Cancelled:
                self._leave(key, flight, waiter, "cancelled")
                raise
            except _QueueTimeout:
                self._leave(key, flight, waiter, "deadline")
                raise
            finally:
                with self._lock:
                    self._waiting_followers -= 1
            if flight.abandoned:
                continue  # not computed (the leader gave up before computing, or cancelled): try again
            if flight.error is not None:
                raise _copy_error(flight.error) from None
            return self._outcome(flight.labels, key, flight.seconds, cached=True, coalesced=True)

    def _leave(self, key: str, flight: _Flight, waiter: _Waiter, reason: str) -> None:
        """``waiter`` stops waiting for ``flight``; cancel a running calculation nobody waits for any more."""
        with self._lock:
            if waiter.gone is None:
                waiter.gone = reason
            flight.waiters.discard(waiter)
            if flight.waiters or not flight.computing or flight.cancel.is_set():
                return
            flight.cancel.set()
        log.info("oracle %r: no caller waits for structure %s any more (last one: %s); cancelling its calculation%s",
                 self.oracle.name, key[:12], "RPC cancelled" if reason == "cancelled" else "deadline passed",
                 "" if self.cancellable else " (this backend cannot be interrupted: it runs to the end)")

    def _watch(self, key: str, flight: _Flight, waiter: _Waiter) -> None:
        """While the leader's thread runs the backend, notice when the leader's caller goes away."""
        poll = self.config.poll_seconds
        while not flight.done.wait(poll):
            if not flight.computing:
                return
            try:
                reason = waiter.check()
            except Exception:  # noqa: BLE001 - a broken cancelled() must not kill the watcher silently
                log.exception("oracle %r: cancelled() raised; treating the caller as gone", self.oracle.name)
                reason = "cancelled"
            if reason is not None:
                self._leave(key, flight, waiter, reason)
                return

    def _lead(self, atoms, props, key, flight: _Flight, waiter: _Waiter) -> LabelOutcome:
        got_slot = False
        try:
            check_geometry(atoms, self.config.limits)
            self._wait(lambda t: self._slots.acquire(timeout=t), waiter.deadline, waiter.cancelled, "a free worker")
            got_slot = True
            with self._lock:
                self._running += 1
                flight.computing = True
            if waiter.deadline is not None or waiter.cancelled is not None:
                threading.Thread(target=self._watch, args=(key, flight, waiter), daemon=True,
                                 name=f"oracle-watch-{key[:8]}").start()
            try:
                labels, seconds = self._compute(atoms, props, key, flight)
            finally:
                with self._lock:
                    flight.computing = False
            flight.labels, flight.seconds = labels, seconds
            if waiter.gone is not None:  # labels are cached and given to the identical waiters
                raise _Dropped(waiter.gone)
            return self._outcome(labels, key, seconds, cached=False)
        except (_Cancelled, _QueueTimeout):
            flight.abandoned = True  # not computed: identical waiters retry
            raise
        except _Dropped:
            raise
        except CalculationCancelled as exc:
            flight.abandoned = True  # identical requests that arrived meanwhile run it again
            if waiter.gone is not None:
                raise _Dropped(waiter.gone) from None
            flight.error = exc
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                if got_slot:
                    self._running -= 1
                self._admitted -= 1
                del self._flights[key]
            if got_slot:
                self._slots.release()
            flight.done.set()

    def _compute(self, atoms: Atoms, props: tuple[str, ...], key: str, flight: _Flight) -> tuple[Labels, float]:
        work = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        for name in ("initial_magmoms", "initial_charges"):
            if name in atoms.arrays:
                work.set_array(name, np.array(atoms.arrays[name], copy=True))
        start = time.perf_counter()
        try:
            try:
                if self.cancellable:
                    raw = self.oracle.calculate(work, props, cancel=flight.cancel)
                else:
                    raw = self.oracle.calculate(work, props)
            except EpicycleError:
                raise
            except Exception as exc:  # noqa: BLE001 - never let a raw traceback reach the client
                raise CalculationFailed(
                    f"backend {self.oracle.name!r} raised {type(exc).__name__}: {_one_line(exc)}"
                ) from exc
            seconds = time.perf_counter() - start
            labels = check_labels(raw, props, len(atoms), self.oracle.name)
        except (CalculationFailed, SetupError) as exc:
            elapsed = time.perf_counter() - start
            # a failure after the cancel request is the kill's doing, not the structure's: no quarantine
            aborted = isinstance(exc, CalculationCancelled) or flight.cancel.is_set()
            with self._lock:
                self._compute_seconds_total += elapsed
                if aborted:
                    self._calculations_cancelled += 1
                elif isinstance(exc, CalculationFailed):
                    self._record_failure(key, str(exc).splitlines()[0])
            self._observe("cancelled" if aborted else _outcome_of(exc), elapsed)
            if aborted and not isinstance(exc, CalculationCancelled):
                raise CalculationCancelled(f"oracle {self.oracle.name!r}: calculation cancelled "
                                           f"({_one_line(exc)})") from None
            raise
        info = dict(labels.info)
        info.update(backend=self.oracle.name, structure_hash=key, compute_seconds=seconds)
        labels = replace(labels, info=info)
        with self._lock:
            self._compute_seconds_total += seconds
            self._failures.pop(key, None)
            if self.config.cache_size:
                self._cache[key] = _CacheEntry(labels, seconds)
                self._cache.move_to_end(key)
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        self._observe("computed", seconds)
        return labels, seconds

    def _observe(self, outcome: str, seconds: float) -> None:
        for observer in self._compute_observers:
            observer(outcome, seconds)

    def _wait(self, wait: Callable[[float | None], bool], deadline, cancelled, what: str) -> None:
        """Call ``wait(timeout)`` until it returns True, honouring deadline and cancellation.

        ``timeout=None`` blocks; raises _Cancelled or _QueueTimeout.
        """
        poll = self.config.poll_seconds
        while True:
            if cancelled is not None and cancelled():
                raise _Cancelled()
            step = poll if cancelled is not None else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _QueueTimeout(
                        f"oracle {self.oracle.name!r}: gave up waiting for {what} (caller's timeout reached)"
                    )
                step = left if step is None else min(step, left)
            if wait(step):
                return

    def _raise_if_quarantined(self, key: str) -> None:
        limit = self.config.quarantine_after
        if not limit:
            return
        count, last = self._failures.get(key, (0, ""))
        if count >= limit:
            raise CalculationFailed(
                f"structure {key[:16]} is quarantined: the backend failed on it {count} times "
                f"(last error: {last})"
            )

    def _record_failure(self, key: str, message: str) -> None:
        count, _ = self._failures.get(key, (0, ""))
        self._failures[key] = (count + 1, message)
        self._failures.move_to_end(key)
        while len(self._failures) > max(1024, self.config.cache_size):
            self._failures.popitem(last=False)

    def _outcome(self, labels: Labels, key: str, seconds: float, cached: bool, coalesced: bool = False) -> LabelOutcome:
        own = Labels(
            energy=labels.energy,
            forces=None if labels.forces is None else labels.forces.copy(),
            stress=None if labels.stress is None else labels.stress.copy(),
            info=dict(labels.info),
        )
        return LabelOutcome(own, cached=cached, structure_hash=key, seconds=seconds, coalesced=coalesced)

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._calls[outcome] += 1


class _QueueTimeout(Exception):
    pass


def _takes_cancel(calculate: Callable[..., Any]) -> bool:
    import inspect

    try:
        params = inspect.signature(calculate).parameters
    except (TypeError, ValueError):
        return False
    return "cancel" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, InvalidInput):
        return "invalid"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, CalculationTimeout):
        return "timeout"
    if isinstance(exc, SetupError):
        return "setup_error"
    return "failed"


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh instance of ``exc`` for another waiting thread (tracebacks are per raise)."""
    try:
        return copy.copy(exc)
    except Exception:  # noqa: BLE001
        return CalculationFailed(_one_line(exc))


def _one_line(exc: BaseException, limit: int = 500) -> str:
    """The first non-empty line of an exception's message (the rest is often a dump)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else repr(exc)
    if len(lines) > 1:
        text += " [...]"
    return text if len(text) <= limit else text[: limit - 3] + "..."
