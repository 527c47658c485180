"""The Oracle interface: something that labels a structure with energy, forces, stress.

Units at this boundary (and on the wire): energy eV, forces eV/Å, stress eV/Å³
in ASE's Voigt order ``(xx, yy, zz, yz, xz, xy)`` and ASE's sign convention
(stress = (1/V) dE/dε, so a compressed cell has *negative* stress).

A backend is a class implementing :class:`Oracle`; it is made available by
name through :data:`REGISTRY` with :func:`register_backend`.  Backends never
see invalid input: :mod:`oracle_service.validation` checks every structure
before ``label`` is called.  A backend that runs but fails raises
:class:`protos.errors.CalculationFailed` (or ``CalculationTimeout``); one
that cannot run at all (program or data missing) raises
:class:`protos.errors.SetupError`.

Cancellation: a backend that sets :attr:`Oracle.cancellable` accepts
``calculate(atoms, properties, cancel=event)``; the service sets the
:class:`threading.Event` when no caller waits for the calculation any more
(every RPC waiting for it was cancelled or passed its deadline), and the
backend then stops as soon as it safely can and raises
:class:`CalculationCancelled` (never labels, never cached or quarantined).
Which backends honour it: ``qe`` and ``cp2k`` (pw.x or cp2k, and mpirun, in
their own process group: SIGTERM, then SIGKILL after a grace), ``gpaw`` and ``xtb`` (their
persistent worker process is killed the same way and restarted for the next
job), ``emt`` and ``lj`` (only their ``latency_s`` sleep is interruptible: the
computation itself takes milliseconds).  The generic ``ase`` adapter and
backends that do not set :attr:`~Oracle.cancellable` run to completion
(their result is then cached as usual).
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from ase import Atoms

from protos.errors import CalculationFailed, InvalidInput

#: Every property an oracle may implement.
ALL_PROPERTIES: tuple[str, ...] = ("energy", "forces", "stress")


@dataclass(frozen=True)
class Labels:
    """What an oracle returns for one structure.

    energy: total energy, eV (``None`` if not requested/implemented)
    forces: shape (n_atoms, 3), eV/Å
    stress: shape (6,), eV/Å³, ASE Voigt order and sign
    """

    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    #: free-form provenance (backend name, settings digest, timing, log path ...)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.forces is not None:
            f = np.ascontiguousarray(self.forces, dtype=np.float64)
            if f.ndim != 2 or f.shape[1] != 3:
                raise ValueError(f"forces must have shape (n_atoms, 3), got {f.shape}")
            object.__setattr__(self, "forces", f)
        if self.stress is not None:
            s = np.asarray(self.stress, dtype=np.float64)
            if s.shape == (3, 3):
                s = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
            if s.shape != (6,):
                raise ValueError(f"stress must have shape (6,) (Voigt) or (3, 3), got {s.shape}")
            object.__setattr__(self, "stress", s)
        if self.energy is not None:
            object.__setattr__(self, "energy", float(self.energy))

    def properties(self) -> tuple[str, ...]:
        return tuple(p for p in ALL_PROPERTIES if getattr(self, p) is not None)


class CalculationCancelled(CalculationFailed):
    """The calculation was stopped because nobody waits for its result any more.

    Not a property of the structure: the service neither caches nor
    quarantines it, and a later request for the same structure runs again.
    """


def raise_if_cancelled(cancel: threading.Event | None, what: str) -> None:
    """Raise :class:`CalculationCancelled` when ``cancel`` is set (for checks between steps)."""
    if cancel is not None and cancel.is_set():
        raise CalculationCancelled(f"{what}: cancelled, no caller waits for the result any more")


class Oracle(abc.ABC):
    """A labelling backend (EMT, Lennard-Jones, Quantum ESPRESSO, ...).

    Subclasses set :attr:`name` and :attr:`implemented_properties` and
    implement :meth:`calculate`.  They are expected to be *stateless between
    calls* (many replicas of the service run side by side) and safe to call
    from several threads unless :attr:`thread_safe` is ``False``, in which
    case the service serialises calls to this instance.
    """

    #: registry name, e.g. ``"emt"``
    name: str = ""
    #: subset of :data:`ALL_PROPERTIES`
    implemented_properties: tuple[str, ...] = ()
    #: whether ``calculate`` may run concurrently on one instance
    thread_safe: bool = True
    #: whether ``calculate`` accepts ``cancel=`` (a :class:`threading.Event`) and stops
    #: soon after it is set, raising :class:`CalculationCancelled` (see the module docstring)
    cancellable: bool = False

    def supported_numbers(self) -> frozenset[int] | None:
        """Atomic numbers this backend can treat, or ``None`` for "any element"."""
        return None

    def settings(self) -> dict[str, Any]:
        """The settings that determine the labels (for ``Describe`` and the cache key).

        Two instances with equal :meth:`settings` must give equal labels.
        Values should be JSON-serialisable.
        """
        return {}

    def version(self) -> str:
        """Version of the underlying code (e.g. ``"ase 3.29.0"``, ``"pw.x 7.1"``)."""
        return ""

    @abc.abstractmethod
    def calculate(self, atoms: Atoms, properties: tuple[str, ...]) -> Labels:
        """Label ``atoms`` (already validated) with ``properties``.

        ``properties`` is a non-empty subset of :attr:`implemented_properties`.
        The returned :class:`Labels` must contain at least those properties.
        Backends with :attr:`cancellable` take a keyword ``cancel: threading.Event | None``.
        """

    def close(self) -> None:
        """Release resources (scratch directories, subprocesses)."""


#: name -> factory(**settings) -> Oracle
REGISTRY: dict[str, Callable[..., Oracle]] = {}


def register_backend(name: str) -> Callable[[Callable[..., Oracle]], Callable[..., Oracle]]:
    """Class/function decorator adding a backend factory to :data:`REGISTRY`."""

    def decorator(factory: Callable[..., Oracle]) -> Callable[..., Oracle]:
        if name in REGISTRY and REGISTRY[name] is not factory:
            raise ValueError(f"oracle backend {name!r} is already registered")
        REGISTRY[name] = factory
        return factory

    return decorator


def available_backends() -> list[str]:
    _load_builtin_backends()
    return sorted(REGISTRY)


def create_oracle(name: str, **settings: Any) -> Oracle:
    """Build the backend registered as ``name`` with ``settings``.

    Raises :class:`InvalidInput` naming the known backends when ``name`` is
    unknown, or when the backend rejects a setting.
    """
    _load_builtin_backends()
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise InvalidInput(
            f"unknown oracle backend {name!r}; known backends: {', '.join(sorted(REGISTRY))}"
        ) from None
    try:
        return factory(**settings)
    except TypeError as exc:  # unexpected keyword
        raise InvalidInput(f"bad settings for oracle backend {name!r}: {exc}") from None


def _load_builtin_backends() -> None:
    """Import the modules whose import registers the built-in backends."""
    import importlib

    for module in _BUILTIN_BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a backend module not written yet
            if exc.name != module:
                raise


#: modules that register backends when imported; heavy optional codes
#: (GPAW, tblite, QE) must import their packages lazily inside the backend.
_BUILTIN_BACKEND_MODULES: list[str] = [
    "oracle_service.backends.analytic",
    "oracle_service.backends.qe",
    "oracle_service.backends.gpaw",
    "oracle_service.backends.xtb",
    "oracle_service.backends.cp2k",
]


def requested_properties(oracle: Oracle, properties: Iterable[str] | None) -> tuple[str, ...]:
    """Normalise a request's property list (empty/None = everything implemented)."""
    props = tuple(dict.fromkeys(properties or ()))
    if not props:
        return tuple(p for p in ALL_PROPERTIES if p in oracle.implemented_properties)
    unknown = [p for p in props if p not in ALL_PROPERTIES]
    if unknown:
        raise InvalidInput(f"unknown properties {unknown}; allowed: {list(ALL_PROPERTIES)}")
    missing = [p for p in props if p not in oracle.implemented_properties]
    if missing:
        raise InvalidInput(
            f"backend {oracle.name!r} does not implement {missing}; "
            f"it implements {list(oracle.implemented_properties)}"
        )
    return tuple(p for p in ALL_PROPERTIES if p in props)
