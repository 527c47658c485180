"""Embedded, instant oracle backends: EMT, Lennard-Jones, and any ASE calculator.

Registered names (see :func:`oracle_service.base.create_oracle`):

``emt``
    ASE's effective-medium theory (:class:`ase.calculators.emt.EMT`) for
    the elements it has parameters for (Al, Cu, Ag, Au, Ni, Pd, Pt, H, C, N, O).
    Settings: ``asap_cutoff`` (bool, default False), ``latency_s``.
``lj``
    Lennard-Jones with a smooth (C¹) cutoff, vectorised over a neighbour
    list.  Settings: ``epsilon`` (eV), ``sigma`` (Å), ``cutoff`` (Å, default
    3·max σ), ``onset`` (Å, where the switching starts, default
    0.66·cutoff), ``species`` (per-element ``{"Ar": {"epsilon": .., "sigma": ..}}``,
    Lorentz-Berthelot mixing; elements not listed use ``epsilon``/``sigma``).
    Defaults are argon (ε = 0.0104 eV, σ = 3.40 Å).  Also ``latency_s``.
``ase``
    Any ASE calculator given by import path, e.g.
    ``create_oracle("ase", calculator="ase.calculators.emt:EMT", parameters={...})``.

``latency_s`` (emt and lj; s, default 0) is a test and benchmark aid, not
physics: every calculation sleeps that long before computing, so these instant
backends occupy a worker like a DFT code would (the service's ``in_flight``
gauge, its worker pool and the coordinator's dispatch all see the calculation
as busy).  The labels are the same with or without it.  The sleep honours the
service's cancellation (``cancel`` set when no caller waits any more): it ends
at once with :class:`~oracle_service.base.CalculationCancelled`.  The
computation itself is not interruptible (it takes milliseconds); the generic
``ase`` adapter is not cancellable at all.

Units: energy eV, forces eV/Å, stress eV/Å³ (ASE Voigt order and sign).
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from protos.errors import CalculationFailed, EpicycleError, InvalidInput, SetupError

from ..base import ALL_PROPERTIES, CalculationCancelled, Labels, Oracle, register_backend

__all__ = [
    "AseCalculatorOracle",
    "EMTOracle",
    "LennardJonesOracle",
    "SimulatedLatency",
    "ase_calculator_backend",
    "load_object",
]


# ---------------------------------------------------------------------------
# generic ASE adapter


class AseCalculatorOracle(Oracle):
    """Adapter: an :class:`Oracle` backed by any ASE calculator.

    ``calc_factory()`` must return a *new* calculator.  ASE calculators keep
    per-structure state and are not thread-safe, so by default a fresh
    calculator is made for every call (``reuse="call"``); ``reuse="thread"``
    keeps one calculator per thread instead (for calculators with costly
    construction).  Either way this oracle is safe to call from several
    threads.  File-based calculators writing to a fixed directory are *not*
    safe to run concurrently: give them a unique directory in the factory,
    or run the service with one worker.

    properties: what to expose (default: what the calculator implements,
        restricted to energy/forces/stress).
    settings: what determines the labels, for the cache key and ``Describe``
        (default: the calculator class and its ``todict()`` parameters).
    supported_numbers: atomic numbers the calculator treats (default: any).
    energy_key: the ASE property reported as "energy"; ``"free_energy"`` is
        the one consistent with the forces for smeared DFT.
    """

    def __init__(
        self,
        calc_factory: Callable[[], Any],
        name: str = "ase",
        properties: Iterable[str] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        supported_numbers: Iterable[int] | None = None,
        version: str | None = None,
        reuse: str = "call",
        energy_key: str = "energy",
    ) -> None:
        if not callable(calc_factory):
            raise InvalidInput(f"calc_factory must be callable, got {calc_factory!r}")
        if reuse not in ("call", "thread"):
            raise InvalidInput(f"reuse must be 'call' or 'thread', got {reuse!r}")
        if energy_key not in ("energy", "free_energy"):
            raise InvalidInput(f"energy_key must be 'energy' or 'free_energy', got {energy_key!r}")
        self.name = name
        self._factory = calc_factory
        self._reuse = reuse
        self._energy_key = energy_key
        self._local = threading.local()

        probe = _make_calculator(calc_factory, name)
        declared = tuple(getattr(probe, "implemented_properties", ALL_PROPERTIES))
        if properties is None:
            props = tuple(p for p in ALL_PROPERTIES if p in declared)
        else:
            props = tuple(dict.fromkeys(properties))
            unknown = [p for p in props if p not in ALL_PROPERTIES]
            if unknown:
                raise InvalidInput(f"unknown properties {unknown}; allowed: {list(ALL_PROPERTIES)}")
            missing = [p for p in props if p not in declared]
            if missing:
                raise InvalidInput(
                    f"calculator {type(probe).__name__} does not implement {missing}; "
                    f"it implements {sorted(declared)}"
                )
            props = tuple(p for p in ALL_PROPERTIES if p in props)
        if not props:
            raise InvalidInput(f"calculator {type(probe).__name__} implements none of {list(ALL_PROPERTIES)}")
        self.implemented_properties = props

        self._numbers = None if supported_numbers is None else frozenset(int(z) for z in supported_numbers)
        if settings is None:
            params = probe.todict() if hasattr(probe, "todict") else {}
            settings = {"calculator": _qualified_name(type(probe)), "parameters": params}
        self._settings = _jsonable(dict(settings))
        self._version = version if version is not None else _version_of(type(probe))

    # -- Oracle interface ---------------------------------------------------

    def supported_numbers(self) -> frozenset[int] | None:
        return self._numbers

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def version(self) -> str:
        return self._version

    def calculate(self, atoms: Atoms, properties: tuple[str, ...]) -> Labels:
        if "stress" in properties and atoms.cell.rank < 3:
            raise InvalidInput("stress requested but the cell has fewer than three lattice vectors")
        calc = self._calculator()
        work = Atoms(
            numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
        )
        for extra in ("initial_magmoms", "initial_charges"):
            if extra in atoms.arrays:
                work.set_array(extra, atoms.arrays[extra].copy())
        work.calc = calc
        values: dict[str, Any] = {}
        try:
            for prop in properties:
                key = self._energy_key if prop == "energy" else prop
                values[prop] = np.array(calc.get_property(key, work), dtype=float, copy=True)
        except EpicycleError:
            self._forget_calculator()
            raise
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes a typed error
            self._forget_calculator()
            raise _translate_ase_error(exc, self.name) from exc
        return Labels(
            energy=float(values["energy"]) if "energy" in values else None,
            forces=values.get("forces"),
            stress=values.get("stress"),
            info={"backend": self.name},
        )

    # -- calculators --------------------------------------------------------

    def _calculator(self):
        if self._reuse == "call":
            return _make_calculator(self._factory, self.name)
        calc = getattr(self._local, "calc", None)
        if calc is None:
            calc = self._local.calc = _make_calculator(self._factory, self.name)
        return calc

    def _forget_calculator(self) -> None:
        self._local.calc = None  # a calculator that failed may be in a bad state


def _make_calculator(factory: Callable[[], Any], name: str):
    try:
        return factory()
    except EpicycleError:
        raise
    except TypeError as exc:
        raise InvalidInput(f"oracle backend {name!r}: cannot construct the calculator: {exc}") from None
    except ImportError as exc:
        raise SetupError(f"oracle backend {name!r}: a package is missing: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise SetupError(f"oracle backend {name!r}: cannot construct the calculator: {type(exc).__name__}: {exc}") from None


def _translate_ase_error(exc: Exception, name: str) -> EpicycleError:
    from ase.calculators import calculator as ase_calc

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ase_calc.CalculatorSetupError):
        return SetupError(f"oracle backend {name!r} is not set up: {text}")
    if isinstance(exc, ImportError):
        return SetupError(f"oracle backend {name!r}: a package is missing: {text}")
    if isinstance(exc, ase_calc.PropertyNotImplementedError):
        return CalculationFailed(f"oracle backend {name!r} did not produce a property: {text}")
    return CalculationFailed(f"oracle backend {name!r} failed: {text}")


# ---------------------------------------------------------------------------
# simulated latency (a test/benchmark aid)


#: how often a cancellable simulated-latency sleep checks whether the oracle was closed, s
CLOSE_POLL_SECONDS = 0.05


class SimulatedLatency:
    """A fixed sleep added to every calculation of an instant backend.

    ``latency_s`` (seconds, finite, >= 0; 0 = off) makes EMT or Lennard-Jones
    behave like an expensive oracle for tests and benchmarks of concurrency:
    the sleep runs inside ``calculate``, on the worker thread holding its
    slot, so the service counts it in flight and queues further requests
    behind it.  It never changes the labels.

    Like a cancellable DFT calculation, a sleep under way ends at once when
    the service sets the call's ``cancel`` event (nobody waits for the labels
    any more) with :class:`~oracle_service.base.CalculationCancelled`; and
    :meth:`close` (the oracle shutting down) ends it within
    :data:`CLOSE_POLL_SECONDS` with ``CalculationFailed``.
    """

    def __init__(self, backend: str, latency_s: Any = 0.0) -> None:
        self.backend = backend
        self.seconds = _latency_seconds(backend, latency_s)
        self._closed = threading.Event()

    def settings(self) -> dict[str, float]:
        """``{"latency_s": s}`` when set, else ``{}`` (so the default leaves the backend identity unchanged)."""
        return {"latency_s": self.seconds} if self.seconds > 0 else {}

    def wait(self, cancel: threading.Event | None = None) -> None:
        if self.seconds <= 0:
            return
        if cancel is None:
            closed = self._closed.wait(self.seconds)
        else:  # wake at once on cancel, check close now and then
            end = time.monotonic() + self.seconds
            closed = False
            while not closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                if cancel.wait(min(left, CLOSE_POLL_SECONDS)):
                    raise CalculationCancelled(
                        f"oracle backend {self.backend!r}: simulated latency (latency_s = {self.seconds:g} s) "
                        "cancelled, no caller waits for the labels any more"
                    )
                closed = self._closed.is_set()
        if closed:
            raise CalculationFailed(
                f"oracle backend {self.backend!r} was closed during its simulated latency "
                f"(latency_s = {self.seconds:g} s); no labels computed"
            )

    def close(self) -> None:
        self._closed.set()


def _latency_seconds(backend: str, value: Any) -> float:
    message = (f"{backend}: setting latency_s (simulated calculation time, seconds) must be a finite "
               f"number >= 0, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating, str)):
        raise InvalidInput(message)
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidInput(message) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(message)
    return seconds


# ---------------------------------------------------------------------------
# EMT


_EMT_NUMBERS: frozenset[int] | None = None


def _emt_numbers() -> frozenset[int]:
    global _EMT_NUMBERS
    if _EMT_NUMBERS is None:
        from ase.calculators.emt import parameters

        _EMT_NUMBERS = frozenset(atomic_numbers[s] for s in parameters)
    return _EMT_NUMBERS


@register_backend("emt")
class EMTOracle(AseCalculatorOracle):
    """ASE's effective-medium theory: Al, Cu, Ag, Au, Ni, Pd, Pt (+ H, C, N, O).

    asap_cutoff: use ASAP's cutoff convention (slightly different energies).
    latency_s: seconds every calculation sleeps (test/benchmark aid, see
        :class:`SimulatedLatency`; default 0).
    """

    def __init__(self, asap_cutoff: bool = False, latency_s: float = 0.0) -> None:
        from ase.calculators.emt import EMT

        flag = bool(asap_cutoff)
        self._latency = SimulatedLatency("emt", latency_s)
        super().__init__(
            lambda: EMT(asap_cutoff=flag),
            name="emt",
            properties=("energy", "forces", "stress"),
            settings={"asap_cutoff": flag, **self._latency.settings()},
            supported_numbers=_emt_numbers(),
        )

    cancellable = True  # the latency_s sleep ends when cancel is set

    def calculate(self, atoms: Atoms, properties: tuple[str, ...], cancel: threading.Event | None = None) -> Labels:
        if "stress" in properties and atoms.cell.rank < 3:  # a bad request fails at once, without the sleep
            raise InvalidInput("stress requested but the cell has fewer than three lattice vectors")
        self._latency.wait(cancel)
        return super().calculate(atoms, properties)

    def close(self) -> None:
        self._latency.close()
        super().close()


# ---------------------------------------------------------------------------
# Lennard-Jones


#: argon, the textbook Lennard-Jones element (eV, Å)
ARGON_EPSILON = 0.0104
ARGON_SIGMA = 3.40


@register_backend("lj")
class LennardJonesOracle(Oracle):
    """Lennard-Jones pair potential with a smooth cutoff, vectorised.

    u(r) = 4 ε_ij [(σ_ij/r)^12 - (σ_ij/r)^6] · f_c(r), with the C¹
    switching function of ASE's ``LennardJones(smooth=True)`` (from JAX-MD):
    f_c = 1 for r < onset, 0 for r > cutoff, and in between
    f_c = (rc² - r²)² (rc² + 2r² - 3ro²) / (rc² - ro²)³.
    Energy and forces are continuous at the cutoff, so forces are exactly
    -dE/dx.  For one species it equals ASE's smooth LennardJones.

    epsilon: eV, sigma: Å -- parameters for elements not in ``species``.
    cutoff: Å (default 3·max σ); onset: Å (default 0.66·cutoff).
    species: ``{"Ar": {"epsilon": 0.0104, "sigma": 3.40}, ...}``; unlike pairs
        use Lorentz-Berthelot mixing σ_ij = (σ_i + σ_j)/2, ε_ij = √(ε_i ε_j).
    latency_s: seconds every calculation sleeps (test/benchmark aid, see
        :class:`SimulatedLatency`; default 0).
    """

    name = "lj"
    implemented_properties = ("energy", "forces", "stress")
    thread_safe = True

    def __init__(
        self,
        epsilon: float = ARGON_EPSILON,
        sigma: float = ARGON_SIGMA,
        cutoff: float | None = None,
        onset: float | None = None,
        species: Mapping[str, Mapping[str, float]] | None = None,
        latency_s: float = 0.0,
    ) -> None:
        self._latency = SimulatedLatency("lj", latency_s)
        self.epsilon = _positive("epsilon", epsilon, allow_zero=True)
        self.sigma = _positive("sigma", sigma)
        self.species: dict[int, tuple[float, float]] = {}
        for symbol, params in (species or {}).items():
            if symbol not in atomic_numbers or atomic_numbers[symbol] == 0:
                raise InvalidInput(f"lj: unknown element {symbol!r} in species")
            if not isinstance(params, Mapping) or set(params) - {"epsilon", "sigma"}:
                raise InvalidInput(
                    f"lj: species[{symbol!r}] must be a mapping with keys 'epsilon' (eV) and 'sigma' (Å), got {params!r}"
                )
            self.species[atomic_numbers[symbol]] = (
                _positive(f"species[{symbol!r}].epsilon", params.get("epsilon", epsilon), allow_zero=True),
                _positive(f"species[{symbol!r}].sigma", params.get("sigma", sigma)),
            )
        max_sigma = max([self.sigma] + [s for _, s in self.species.values()])
        self.cutoff = _positive("cutoff", 3.0 * max_sigma if cutoff is None else cutoff)
        self.onset = 0.66 * self.cutoff if onset is None else _positive("onset", onset, allow_zero=True)
        if not self.onset < self.cutoff:
            raise InvalidInput(f"lj: onset ({self.onset} Å) must be smaller than cutoff ({self.cutoff} Å)")

    def settings(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "sigma": self.sigma,
            "cutoff": self.cutoff,
            "onset": self.onset,
            "species": {
                chemical_symbols[z]: {"epsilon": e, "sigma": s} for z, (e, s) in sorted(self.species.items())
            },
            **self._latency.settings(),
        }

    def close(self) -> None:
        self._latency.close()

    def version(self) -> str:
        import ase

        return f"epicycle-lj 1 (ase {ase.__version__} neighbour list)"

    cancellable = True  # the latency_s sleep ends when cancel is set

    def calculate(self, atoms: Atoms, properties: tuple[str, ...], cancel: threading.Event | None = None) -> Labels:
        from ase.neighborlist import neighbor_list

        n = len(atoms)
        if "stress" in properties and atoms.cell.rank < 3:
            raise InvalidInput("stress requested but the cell has fewer than three lattice vectors")
        self._latency.wait(cancel)
        i, j, D = neighbor_list("ijD", atoms, self.cutoff, self_interaction=False)
        eps_atom, sig_atom = self._per_atom(atoms.numbers)
        eps = np.sqrt(eps_atom[i] * eps_atom[j])
        sig = 0.5 * (sig_atom[i] + sig_atom[j])

        r2 = np.einsum("ij,ij->i", D, D)
        rc2, ro2 = self.cutoff**2, self.onset**2
        c6 = (sig * sig / r2) ** 3
        c12 = c6 * c6
        u = 4.0 * eps * (c12 - c6)  # pair energy without cutoff
        du_over_r = -24.0 * eps * (2.0 * c12 - c6) / r2  # (du/dr)/r
        inside = r2 > ro2
        fc = np.ones_like(r2)
        dfc = np.zeros_like(r2)  # d f_c / d(r²)
        x = r2[inside]
        fc[inside] = (rc2 - x) ** 2 * (rc2 + 2.0 * x - 3.0 * ro2) / (rc2 - ro2) ** 3
        dfc[inside] = 6.0 * (rc2 - x) * (ro2 - x) / (rc2 - ro2) ** 3
        g = du_over_r * fc + 2.0 * u * dfc  # (d[u f_c]/dr)/r
        pair_energy = u * fc

        energy = 0.5 * float(pair_energy.sum())  # every pair appears twice
        forces = None
        if "forces" in properties:
            gD = g[:, None] * D  # force on i from j
            forces = np.stack([np.bincount(i, weights=gD[:, k], minlength=n) for k in range(3)], axis=1)
        stress = None
        if "stress" in properties:
            virial = 0.5 * np.einsum("p,pa,pb->ab", g, D, D)
            s = virial / atoms.get_volume()
            stress = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        return Labels(
            energy=energy if "energy" in properties else None,
            forces=forces,
            stress=stress,
            info={"backend": self.name},
        )

    def _per_atom(self, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        eps = np.full(len(numbers), self.epsilon)
        sig = np.full(len(numbers), self.sigma)
        for z, (e, s) in self.species.items():
            mask = numbers == z
            eps[mask] = e
            sig[mask] = s
        return eps, sig


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"lj: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InvalidInput(f"lj: {name} must be finite and {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


# ---------------------------------------------------------------------------
# "ase": any calculator by import path


@register_backend("ase")
def ase_calculator_backend(
    calculator: str,
    parameters: Mapping[str, Any] | None = None,
    properties: Iterable[str] | None = None,
    elements: Iterable[str | int] | None = None,
    reuse: str = "call",
    energy_key: str = "energy",
    **calculator_kwargs: Any,
) -> AseCalculatorOracle:
    """Wrap the ASE calculator class at ``calculator`` (``"package.module:Class"``).

    It is constructed as ``Class(**parameters, **calculator_kwargs)`` for
    every call (or once per thread with ``reuse="thread"``).  ``elements``
    (symbols or numbers) restricts the elements accepted; default any.
    """
    if not isinstance(calculator, str):
        raise InvalidInput(f"ase backend: 'calculator' must be an import path string, got {calculator!r}")
    cls = load_object(calculator)
    params = dict(parameters or {})
    clash = sorted(set(params) & set(calculator_kwargs))
    if clash:
        raise InvalidInput(f"ase backend: {clash} given both in 'parameters' and as keywords")
    params.update(calculator_kwargs)
    numbers = None
    if elements is not None:
        numbers = [_atomic_number(e) for e in elements]
    settings = {"calculator": calculator, "parameters": params}
    return AseCalculatorOracle(
        lambda: cls(**params),
        name="ase",
        properties=properties,
        settings=settings,
        supported_numbers=numbers,
        reuse=reuse,
        energy_key=energy_key,
    )


def load_object(path: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``).

    A malformed path or a missing attribute is :class:`InvalidInput`; a
    module that cannot be imported is :class:`SetupError` (not installed).
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".") + attr.split(".")):
        raise InvalidInput(f"bad import path {path!r}; expected 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SetupError(f"cannot import {module_name!r} (for {path!r}): {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidInput(f"{module_name!r} has no attribute {attr!r} (import path {path!r})") from None
    return obj


def _atomic_number(element: str | int) -> int:
    if isinstance(element, (int, np.integer)) and 1 <= int(element) <= 118:
        return int(element)
    if isinstance(element, str) and atomic_numbers.get(element, 0) > 0:
        return atomic_numbers[element]
    raise InvalidInput(f"unknown element {element!r}")


# ---------------------------------------------------------------------------
# helpers


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _version_of(cls: type) -> str:
    import ase

    top = cls.__module__.split(".")[0]
    if top == "ase":
        return f"ase {ase.__version__}"
    try:
        from importlib.metadata import version

        return f"{top} {version(top)}; ase {ase.__version__}"
    except Exception:  # noqa: BLE001 - version is informational
        return f"ase {ase.__version__}"


def _jsonable(value: Any) -> Any:
    """Settings as JSON-friendly values (numpy scalars/arrays -> Python)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
