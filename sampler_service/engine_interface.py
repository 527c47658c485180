"""The :class:`MDEngine` interface and what it returns (frames, stop reports).

State machine of an engine (the FLARE loop of seed 004, Fig. 1b)::

                 run(max_steps, threshold)                  supply_forces(F_dft)
   READY ──────────────────────────────────▶ UNCERTAIN ──────────────────────────▶ SUPPLIED
     ▲   ◀── StopReport(reason="max_steps") ─┘   │  ▲                                  │
     │                                           │  └─ run() with the same model: the   │
     │                                           │     prediction is made again and     │
     │                                           │     (if still uncertain) stops again │
     └────────── run(): step n integrated with the supplied forces, then normal ───────┘
                 stepping resumes (StopReport "max_steps" or "uncertain" later)

* Step ``n`` starts at positions x_n.  Forces for x_n come from the provider
  together with σ.  If any σ_iα > ``threshold`` the engine stops *before using
  those forces*: the state is unchanged (still x_n, same velocities, same RNG),
  and the :class:`StopReport` carries the frame (x_n with the predicted forces
  and σ), the atoms and components that crossed and their σ.
* :meth:`MDEngine.supply_forces` stores forces (e.g. DFT labels of that frame)
  for the *current* positions; the next :meth:`MDEngine.run` integrates step n
  with them without gating and then continues with the provider.  Supplying
  forces is allowed in any state (e.g. the first DFT call at step 0).
* :meth:`MDEngine.checkpoint` is allowed in any state and captures everything,
  including supplied-but-unused forces; :meth:`MDEngine.restore` (or
  ``from_checkpoint``) brings back exactly that state.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from ase import Atoms, units

from protos.errors import InvalidInput
from sampler_service.force_providers import ForceProvider, ForceResult, per_atom_sigma
from sampler_service.settings import SamplerSettings


@dataclass(frozen=True)
class Observables:
    """Thermodynamic observables of one frame.

    temperature_K uses 3N−3 degrees of freedom when the ensemble conserves
    momentum (then the centre-of-mass kinetic energy is excluded), else 3N.
    ``heat_eV`` is the energy the thermostat, velocity rescaling and schedule
    have put into the system since the start; ``conserved_eV`` = E_kin +
    E_pot − heat is constant up to integration error in NVE and NVT
    (shadow-work bookkeeping); it is ``None`` with a barostat.
    """

    temperature_K: float
    kinetic_eV: float
    potential_eV: float
    total_eV: float
    heat_eV: float
    conserved_eV: float | None
    volume_A3: float
    pressure_GPa: float | None = None


@dataclass(frozen=True)
class Frame:
    """One MD frame: the configuration at step ``step`` and what was computed for it.

    positions (n, 3) Å, cell (3, 3) Å, velocities (n, 3) Å/fs at the same time
    as the positions (``None`` in an uncertainty stop, where the step has not
    been completed), forces/force_std (n, 3) eV/Å, energy eV, stress (6,) eV/Å³,
    atom_std (n,) eV/Å the rotation-invariant σ of each atom's force (``None`` when the
    force provider gives only component σ).
    ``forces_supplied``: the forces were supplied (DFT) rather than predicted.
    """

    step: int
    time_fs: float
    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    masses: np.ndarray
    velocities: np.ndarray | None
    forces: np.ndarray
    energy: float | None
    stress: np.ndarray | None
    force_std: np.ndarray | None
    noise: float | None
    model_version: int
    forces_supplied: bool
    observables: Observables | None = None
    images: np.ndarray | None = None
    atom_std: np.ndarray | None = None

    def to_atoms(self) -> Atoms:
        """The frame as ASE Atoms: forces/energy/stress in a SinglePointCalculator,
        ``force_std`` (n, 3) and ``atom_std`` (n,) as per-atom arrays, observables and
        step/time in ``info`` (``max_force_std``: largest component σ; ``max_atom_std``:
        largest per-atom σ, the quantity the threshold is applied to, eV/Å)."""
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc,
                      masses=self.masses)
        if self.velocities is not None:
            atoms.set_velocities(self.velocities / units.fs)  # Å/fs → ASE units
        if self.force_std is not None:
            atoms.arrays["force_std"] = np.array(self.force_std)
        if self.atom_std is not None:
            atoms.arrays["atom_std"] = np.array(self.atom_std)
        results: dict[str, Any] = {"forces": np.array(self.forces)}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.stress is not None:
            results["stress"] = np.array(self.stress)
        atoms.calc = SinglePointCalculator(atoms, **results)
        info = {"step": self.step, "time_fs": self.time_fs, "model_version": self.model_version,
                "forces_supplied": self.forces_supplied}
        if self.noise is not None:
            info["noise"] = self.noise
        if self.force_std is not None:
            info["max_force_std"] = float(np.max(self.force_std, initial=0.0))
        sigma = per_atom_sigma(self.atom_std, self.force_std)
        if sigma is not None:
            info["max_atom_std"] = float(np.max(sigma, initial=0.0))
        if self.observables is not None:
            for k, v in self.observables.__dict__.items():
                if v is not None:
                    info[k] = v
        atoms.info.update(info)
        return atoms


@dataclass(frozen=True)
class StopReport:
    """Why and where :meth:`MDEngine.run` returned.

    reason: ``"max_steps"`` (the requested steps are done), ``"uncertain"``
    (some atom's σ > threshold at step ``step``; nothing of step ``step`` has been
    integrated) or ``"cancelled"`` (:meth:`MDEngine.request_stop` was called;
    the state is the same kind as at an uncertainty stop).  ``uncertain_components`` is
    (k, 2) [atom, component]: component -1 when the provider gives the rotation-invariant
    per-atom σ (``atom_std``; the atom as a whole crossed), 0..2 (x, y, z) when it gives only
    component σ; ``uncertain_std`` (k,) their σ (eV/Å), ``uncertain_atoms`` the unique
    atoms, in increasing order; ``max_std`` the largest per-atom σ (eV/Å).  ``frame`` is the frame at the stop: the
    uncertain configuration with its prediction, or the last integrated frame.
    """

    reason: str
    step: int
    time_fs: float
    steps_taken: int
    frame: Frame | None = None
    threshold: float | None = None
    max_std: float | None = None
    uncertain_atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    uncertain_components: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    uncertain_std: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def uncertain(self) -> bool:
        return self.reason == "uncertain"


FrameCallback = Callable[[Frame], Any]


def uncertainty_crossing(result: ForceResult, threshold: float | None):
    """(components (k, 2), σ (k,)) over the threshold, or None if none/no σ/no threshold.

    With the rotation-invariant ``result.atom_std`` the rows are [atom, -1] for every atom
    whose σ > threshold; a provider with component σ only gives [atom, α] for every
    σ_iα > threshold (which depends on the orientation of the structure)."""
    if threshold is None:
        return None
    if result.atom_std is not None:
        mask = result.atom_std > threshold
        if not mask.any():
            return None
        atoms = np.flatnonzero(mask).astype(np.int64)
        return np.stack([atoms, np.full_like(atoms, -1)], axis=1), result.atom_std[mask]
    if result.force_std is None:
        return None
    mask = result.force_std > threshold
    if not mask.any():
        return None
    comps = np.argwhere(mask).astype(np.int64)
    return comps, result.force_std[mask]


def check_run_args(max_steps: int, threshold: float | None, frame_interval: int) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 0:
        raise InvalidInput(f"max_steps must be a non-negative integer, got {max_steps!r}")
    if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
        raise InvalidInput(f"threshold must be a positive number of eV/Å (or None), got {threshold!r}")
    if isinstance(frame_interval, bool) or not isinstance(frame_interval, (int, np.integer)) or frame_interval < 0:
        raise InvalidInput(f"frame_interval must be a non-negative integer (0: no frames), got {frame_interval!r}")


class DriftTracker:
    """Least-squares slope of the conserved energy against time, in O(1) memory.

    Restarted whenever the model version changes (a new model is a new
    potential-energy surface, so its energies are not comparable); frames
    with supplied (DFT) forces are not added.
    """

    FIELDS = ("n", "t0", "e0", "st", "se", "stt", "ste", "version")

    def __init__(self) -> None:
        self.reset(-(2**62))

    def reset(self, version: int) -> None:
        self.n = 0
        self.t0 = self.e0 = self.st = self.se = self.stt = self.ste = 0.0
        self.version = version

    def add(self, time_fs: float, energy: float, version: int) -> None:
        if version != self.version:
            self.reset(version)
        if self.n == 0:
            self.t0, self.e0 = time_fs, energy
        t, e = time_fs - self.t0, energy - self.e0
        self.n += 1
        self.st += t
        self.se += e
        self.stt += t * t
        self.ste += t * e

    def slope(self) -> float | None:
        """dE/dt in eV/fs, or None with fewer than 2 points."""
        if self.n < 2:
            return None
        den = self.n * self.stt - self.st * self.st
        if den <= 0:
            return None
        return (self.n * self.ste - self.st * self.se) / den

    def to_list(self) -> list[float]:
        return [float(getattr(self, f)) for f in self.FIELDS]

    def load(self, values) -> None:
        for f, v in zip(self.FIELDS, values):
            setattr(self, f, int(v) if f in ("n", "version") else float(v))


class MDEngine(abc.ABC):
    """An MD engine that takes its forces from a :class:`ForceProvider`.

    Construct with ``(settings, provider, atoms)``; ``atoms`` is an ASE
    ``Atoms`` (velocities in ASE units, as ``Atoms.get_velocities``) whose
    positions, numbers, cell, pbc, masses and velocities are copied.
    """

    #: registry name, e.g. ``"builtin"``
    name: str = ""

    settings: SamplerSettings
    provider: ForceProvider

    # State the shared methods below read: counters ``_step``, ``_time`` (fs); ``_numbers``,
    # ``_masses`` (amu), ``_pbc``; the engine's ``_rng``; observables of the last integrated
    # frame and the conserved-energy ``_drift`` tracker (engines that keep these elsewhere,
    # like the remote engine, override ``observables``/``energy_drift``).
    _step: int
    _time: float
    _numbers: np.ndarray
    _masses: np.ndarray
    _rng: np.random.Generator
    _last_observables: "Observables | None" = None
    _drift: "DriftTracker"

    @property
    def step(self) -> int:
        """Index of the current frame (number of completed steps since the start)."""
        return self._step

    @property
    def time_fs(self) -> float:
        """Simulation time of the current frame, fs."""
        return self._time

    @property
    def n_atoms(self) -> int:
        return len(self._numbers)

    @abc.abstractmethod
    def run(
        self,
        max_steps: int,
        threshold: float | None = None,
        frame_interval: int = 1,
        on_frame: FrameCallback | None = None,
        forces_for_current_step: ForceResult | None = None,
    ) -> StopReport:
        """Integrate up to ``max_steps`` steps; stop early if some σ_iα > ``threshold`` (eV/Å).

        ``on_frame(frame)`` is called for every integrated frame whose step is a
        multiple of ``frame_interval`` (0: never).  ``forces_for_current_step``
        is the same as calling :meth:`supply_forces` first.
        """

    @abc.abstractmethod
    def supply_forces(self, result: ForceResult) -> None:
        """Use ``result`` (forces for the current positions) for the next step instead of the provider."""

    def _checked_supplied(self, result: ForceResult) -> ForceResult:
        """``result`` checked for this engine (shape, finiteness); a bad one is the caller's fault."""
        if not isinstance(result, ForceResult):
            raise InvalidInput(f"supplied forces must be a ForceResult, got {type(result).__name__}")
        try:
            return result.checked(self.n_atoms, "supplied forces")
        except Exception as exc:  # noqa: BLE001 - CalculationFailed from checked() becomes the caller's error
            raise InvalidInput(str(exc)) from None

    @classmethod
    @abc.abstractmethod
    def from_checkpoint(cls, blob: bytes, provider: ForceProvider) -> "MDEngine":
        """A new engine in exactly the state of ``blob`` (settings included)."""

    @abc.abstractmethod
    def checkpoint(self) -> bytes:
        """The complete state as an opaque, versioned blob."""

    @abc.abstractmethod
    def restore(self, blob: bytes) -> None:
        """Replace the state (and settings) by a checkpoint of the same engine kind."""

    @abc.abstractmethod
    def positions(self) -> np.ndarray:
        """Current positions (n, 3) Å (wrapped if ``settings.wrap``)."""

    @abc.abstractmethod
    def velocities(self) -> np.ndarray:
        """Velocities (n, 3) Å/fs at the current time (completing a pending half kick if
        needed with the last known forces; informational)."""

    @abc.abstractmethod
    def cell(self) -> np.ndarray: ...

    @property
    @abc.abstractmethod
    def images(self) -> np.ndarray:
        """(n, 3) integer image shifts: unwrapped positions = positions + images @ cell."""

    def observables(self) -> Observables | None:
        """Observables of the last integrated frame (None before the first step)."""
        return self._last_observables

    @property
    def numbers(self) -> np.ndarray:
        """Atomic numbers (n,)."""
        return self._numbers.copy()

    @property
    def masses(self) -> np.ndarray:
        """Masses (n,), amu."""
        return self._masses.copy()

    @property
    def pbc(self) -> np.ndarray:
        return self._pbc.copy()

    def atoms(self) -> Atoms:
        """The current configuration as ASE Atoms (velocities converted to ASE units)."""
        a = Atoms(numbers=self.numbers, positions=self.positions(), cell=self.cell(), pbc=self.pbc,
                  masses=self.masses)
        a.set_velocities(self.velocities() / units.fs)
        return a

    @abc.abstractmethod
    def set_velocities(self, velocities: np.ndarray) -> None:
        """Replace the velocities (Å/fs) at the current time (the next step starts from them)."""

    @abc.abstractmethod
    def set_timestep(self, timestep_fs: float) -> None:
        """Change Δt from the next step on (e.g. after a rollback)."""

    def set_schedule(self, schedule) -> None:
        """Replace the temperature schedule ``((time_fs, temperature_K), ...)`` from now on; events at
        times already passed are not applied again.  Engines that keep a schedule implement it."""
        raise InvalidInput(f"engine {self.settings.engine!r} cannot change its temperature schedule mid-run")

    def energy_drift(self) -> float | None:
        """Drift of the conserved energy, eV/atom/ps, over the frames of the current model version."""
        s = self._drift.slope()
        return None if s is None else s * 1000.0 / self.n_atoms

    def request_stop(self) -> None:
        """Ask a running :meth:`run` (in another thread) to return ``"cancelled"`` before its next step.

        Thread-safe.  If no run is active, the next :meth:`run` returns at once.
        """
        self._cancel_event().set()

    def _cancel_event(self) -> threading.Event:
        ev = self.__dict__.get("_cancel")
        if ev is None:
            ev = self.__dict__.setdefault("_cancel", threading.Event())
        return ev

    def _take_cancel(self) -> bool:
        """True (once) if a stop was requested."""
        ev = self._cancel_event()
        if ev.is_set():
            ev.clear()
            return True
        return False

    def initialize_velocities(self, temperature_K: float, exact: bool = True) -> None:
        """Maxwell–Boltzmann velocities at ``temperature_K`` with zero momentum from the engine's RNG."""
        from sampler_service import dynamics as dyn

        if not (np.isfinite(temperature_K) and temperature_K >= 0):
            raise InvalidInput(f"initial temperature must be ≥ 0 K, got {temperature_K!r}")
        self.set_velocities(dyn.maxwell_boltzmann(self._masses, temperature_K, self._rng,
                                                  zero_momentum=True, exact=exact))

    def close(self) -> None:
        """Release resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
