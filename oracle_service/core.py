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
times in a row is refused quickly afterwards).  Everything the backend
raises that is not a typed :class:`protos.errors.EpicycleError` becomes
:class:`CalculationFailed` with a one-line message, never a traceback.

Counters for metrics: :meth:`LabelService.stats` (and the ``in_flight`` /
``queued`` properties).
"""

from __future__ import annotations

import copy
import hashlib
import json
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

from .base import Labels, Oracle, create_oracle, requested_properties
from .validation import Limits, check_cheap, check_geometry

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
    "timeout",  # CalculationTimeout (backend wall-time, or waited past the caller's timeout)
    "setup_error",  # SetupError (backend not set up)
    "overloaded",  # Overloaded (workers and queue full)
    "cancelled",  # caller went away while queued
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
    poll_seconds: how often a waiting request checks ``cancelled()``.
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


class _Flight:
    """One backend calculation in progress; identical requests wait on it."""

    __slots__ = ("done", "labels", "error", "seconds", "abandoned")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.labels: Labels | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.abandoned = False  # leader left before computing; waiters retry


@dataclass
class _CacheEntry:
    labels: Labels
    seconds: float


class _Cancelled(Exception):
    pass


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

        timeout: seconds this call may wait (in the queue, or for an identical
            in-flight request) before giving up with CalculationTimeout; a
            calculation already running is never interrupted, its result is
            cached.  None waits as long as it takes.
        cancelled: polled while waiting; returning True abandons the request
            (e.g. the gRPC client went away: ``lambda: not context.is_active()``).

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
            }

    def add_compute_observer(self, observer: Callable[[str, float], None]) -> None:
        """Call ``observer(outcome, seconds)`` after every backend calculation
        (``outcome``: ``computed``, ``failed``, ``timeout`` or ``setup_error``), e.g. for a histogram."""
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
            if leader:
                return self._lead(atoms, props, key, flight, deadline, cancelled)
            try:
                self._wait(flight.done.wait, deadline, cancelled, "an identical request to finish")
            finally:
                with self._lock:
                    self._waiting_followers -= 1
            if flight.abandoned:
                continue  # the leader gave up before computing: try again (maybe as leader)
            if flight.error is not None:
                raise _copy_error(flight.error) from None
            return self._outcome(flight.labels, key, flight.seconds, cached=True, coalesced=True)

    def _lead(self, atoms, props, key, flight: _Flight, deadline, cancelled) -> LabelOutcome:
        got_slot = False
        try:
            check_geometry(atoms, self.config.limits)
            self._wait(lambda t: self._slots.acquire(timeout=t), deadline, cancelled, "a free worker")
            got_slot = True
            with self._lock:
                self._running += 1
            labels, seconds = self._compute(atoms, props, key)
            flight.labels, flight.seconds = labels, seconds
            return self._outcome(labels, key, seconds, cached=False)
        except (_Cancelled, _QueueTimeout):
            flight.abandoned = True  # not computed: identical waiters retry
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

    def _compute(self, atoms: Atoms, props: tuple[str, ...], key: str) -> tuple[Labels, float]:
        work = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        for name in ("initial_magmoms", "initial_charges"):
            if name in atoms.arrays:
                work.set_array(name, np.array(atoms.arrays[name], copy=True))
        start = time.perf_counter()
        try:
            try:
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
            with self._lock:
                self._compute_seconds_total += elapsed
                if isinstance(exc, CalculationFailed):
                    self._record_failure(key, str(exc).splitlines()[0])
            self._observe(_outcome_of(exc), elapsed)
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
