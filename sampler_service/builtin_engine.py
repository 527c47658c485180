"""The built-in MD engine: small NumPy integrators with uncertainty gating and exact checkpoints.

One step n → n+1 (Δt from the settings; velocities in Å/fs)::

    F_n, σ_n  = provider(x_n)                  # or forces supplied for this step
    if max σ_n > threshold: stop (state untouched: x_n, v_{n−½}, RNG)
    v_n       = v_{n−½} + ½Δt' F_n/m           # completes the previous step (Δt' its Δt)
    schedule  : if t_n ≥ t_event, v_n rescaled to T_event, thermostat target = T_event
    thermostat: Berendsen λ or CSVR α on v_n     (nvt/npt_berendsen, nvt_csvr)
    frame n   = (x_n, v_n, F_n, σ_n, observables)
    barostat  : x_n, cell scaled by μ            (npt_*; F_n reused, as in Berendsen schemes)
    v_{n+½}   = v_n + ½Δt F_n/m
    NVE-like  : x_{n+1} = x_n + Δt v_{n+½}
    Langevin  : x += ½Δt v;  v ← e^{−γΔt} v + √(1−e^{−2γΔt}) √(kT/m) ξ;  x += ½Δt v   (BAOAB)
    wrap x_{n+1} into the cell; step += 1; t += Δt

Between steps the state is (x_n, v_{n−½}, pending kick Δt'); at the start
(and after :meth:`set_velocities`) the velocities are full-step (Δt' = 0).
This is velocity Verlet split at the force evaluation, so stopping before F_n
is used — the FLARE uncertainty stop — leaves a state that resumes exactly.

Randomness (Langevin ξ, CSVR, MB velocities) comes from one
``numpy.random.Generator(PCG64(seed))`` whose state is in the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ase import Atoms, units

from protos.errors import InvalidInput
from sampler_service import checkpoint as ckpt
from sampler_service import dynamics as dyn
from sampler_service.engine_interface import (
    DriftTracker,
    Frame,
    FrameCallback,
    MDEngine,
    Observables,
    StopReport,
    check_run_args,
    uncertainty_crossing,
)
from sampler_service.force_providers import ForceProvider, ForceResult, validate_structure
from sampler_service.settings import SamplerSettings

#: tolerance (fs) for "t_n ≥ t_event" so that accumulated round-off cannot delay an event by a step
SCHEDULE_EPS_FS = 1e-6


def applied_schedule_events(schedule, time_fs: float, step: int, timestep_fs: float) -> int:
    """How many events of ``schedule`` ((time fs, T K), sorted) an engine at ``step`` / ``time_fs``
    has applied: those due at the start of the last step integrated, at time - Δt (a schedule
    replaced mid-run keeps the events already past; ``set_schedule`` of every engine)."""
    last_start = time_fs - timestep_fs if step > 0 else -float("inf")
    return sum(1 for t, _ in schedule if t <= last_start + SCHEDULE_EPS_FS)


def atoms_arrays(atoms: Atoms) -> tuple[np.ndarray, ...]:
    """(positions, numbers, cell, pbc, masses, velocities Å/fs) of ASE Atoms, validated."""
    if not isinstance(atoms, Atoms):
        raise InvalidInput(f"structure must be ase.Atoms, got {type(atoms).__name__}")
    return validate_structure(
        atoms.get_positions(), atoms.get_atomic_numbers(), atoms.cell.array, atoms.pbc,
        atoms.get_masses(), atoms.get_velocities() * units.fs,
    )


class BuiltinEngine(MDEngine):
    """NumPy MD engine (see the module docstring for the integrator)."""

    name = "builtin"

    def __init__(self, settings: SamplerSettings, provider: ForceProvider, atoms: Atoms) -> None:
        if not isinstance(settings, SamplerSettings):
            raise InvalidInput(f"settings must be SamplerSettings, got {type(settings).__name__}")
        self.settings = settings
        self.provider = provider
        pos, self._numbers, self._cell, self._pbc, self._masses, vel = atoms_arrays(atoms)
        self._positions = pos
        self._velocities = vel
        self._images = np.zeros(pos.shape, dtype=np.int64)
        self._step = 0
        self._time = 0.0
        self._pending_kick_fs = 0.0  # Δt' of the half kick that completes the previous step
        self._supplied: ForceResult | None = None
        self._last: ForceResult | None = None  # forces of the last integrated frame
        self._heat = 0.0
        self._target_T = settings.temperature_K
        self._schedule_index = 0
        self._rng = np.random.Generator(np.random.PCG64(settings.seed))
        self._drift = DriftTracker()
        self._last_observables: Observables | None = None
        if settings.wrap:
            self._wrap()
        if settings.initial_temperature_K is not None:
            self.initialize_velocities(settings.initial_temperature_K, settings.exact_initial_temperature)

    @classmethod
    def from_checkpoint(cls, blob: bytes, provider: ForceProvider) -> "BuiltinEngine":
        doc, arrays = ckpt.unpack(blob, cls.name)
        settings = SamplerSettings.from_dict(doc["settings"])
        atoms = Atoms(numbers=arrays["numbers"], positions=arrays["positions"], cell=arrays["cell"],
                      pbc=arrays["pbc"], masses=arrays["masses"])
        engine = cls(settings.replace(initial_temperature_K=None), provider, atoms)
        engine._load(doc, arrays)
        return engine

    # -- properties ----------------------------------------------------------------
    @property
    def images(self) -> np.ndarray:
        """Integer image shifts: unwrapped positions = positions + images @ cell (fixed cell)."""
        return self._images.copy()

    @property
    def target_temperature_K(self) -> float:
        return self._target_T

    @property
    def forces_pending(self) -> bool:
        """Whether forces have been supplied for the current step."""
        return self._supplied is not None

    def positions(self) -> np.ndarray:
        return self._positions.copy()

    def cell(self) -> np.ndarray:
        return self._cell.copy()

    def velocities(self) -> np.ndarray:
        if self._pending_kick_fs == 0.0 or self._last is None:
            return self._velocities.copy()
        # estimate v_n with the last forces (exact v_n needs F_n, not yet known)
        return self._velocities + 0.5 * self._pending_kick_fs * self._last.forces / self._masses[:, None] * dyn.ACCEL

    # -- state changes -------------------------------------------------------------
    def set_velocities(self, velocities: np.ndarray) -> None:
        v = np.array(velocities, dtype=np.float64, copy=True)
        if v.shape != (self.n_atoms, 3) or not np.all(np.isfinite(v)):
            raise InvalidInput(f"velocities must be a finite ({self.n_atoms}, 3) array in Å/fs")
        self._velocities = v
        self._pending_kick_fs = 0.0

    def set_timestep(self, timestep_fs: float) -> None:
        self.settings = self.settings.replace(timestep_fs=timestep_fs)

    def set_schedule(self, schedule) -> None:
        schedule = tuple((float(t), float(temp)) for t, temp in schedule)
        self.settings = self.settings.replace(schedule=schedule)
        self._schedule_index = applied_schedule_events(schedule, self._time, self._step, self.settings.timestep_fs)

    def supply_forces(self, result: ForceResult) -> None:
        self._supplied = self._checked_supplied(result)

    # -- the loop ------------------------------------------------------------------
    def run(self, max_steps: int, threshold: float | None = None, frame_interval: int = 1,
            on_frame: FrameCallback | None = None,
            forces_for_current_step: ForceResult | None = None) -> StopReport:
        check_run_args(max_steps, threshold, frame_interval)
        if forces_for_current_step is not None:
            self.supply_forces(forces_for_current_step)
        taken = 0
        frame: Frame | None = None
        while taken < max_steps:
            if self._take_cancel():
                return StopReport(reason="cancelled", step=self._step, time_fs=self._time, steps_taken=taken,
                                  frame=frame, threshold=threshold)
            if self._supplied is not None:
                result, supplied = self._supplied, True
            else:
                result = self.provider.compute(self._positions.copy(), self._cell.copy(),
                                               self._numbers.copy(), self._pbc.copy())
                result = result.checked(self.n_atoms)
                supplied = False
                crossing = uncertainty_crossing(result, threshold)
                if crossing is not None:
                    comps, std = crossing
                    stop_frame = self._frame(result, False, velocities=None, observables=None)
                    return StopReport(
                        reason="uncertain", step=self._step, time_fs=self._time, steps_taken=taken,
                        frame=stop_frame, threshold=threshold, max_std=result.max_std,
                        uncertain_atoms=np.unique(comps[:, 0]), uncertain_components=comps,
                        uncertain_std=std,
                    )
            want = frame_interval > 0 and self._step % frame_interval == 0
            frame = self._advance(result, supplied, want or taken == max_steps - 1)
            self._supplied = None
            taken += 1
            if want and on_frame is not None:
                on_frame(frame)
        return StopReport(reason="max_steps", step=self._step, time_fs=self._time, steps_taken=taken,
                          frame=frame, threshold=threshold)

    def _advance(self, result: ForceResult, supplied: bool, make_frame: bool) -> Frame | None:
        """Integrate step n → n+1 with forces ``result`` for x_n; return frame n if asked."""
        s = self.settings
        m = self._masses
        acc = result.forces / m[:, None] * dyn.ACCEL
        v = self._velocities
        if self._pending_kick_fs != 0.0:
            v = v + (0.5 * self._pending_kick_fs) * acc
        cm = s.conserves_momentum

        # schedule: instantaneous rescale to the event temperature
        while (self._schedule_index < len(s.schedule)
               and self._time >= s.schedule[self._schedule_index][0] - SCHEDULE_EPS_FS):
            t_event = s.schedule[self._schedule_index][1]
            self._schedule_index += 1
            if self._schedule_index < len(s.schedule) and self._time >= s.schedule[self._schedule_index][0] - SCHEDULE_EPS_FS:
                continue  # a later event is also due: only the last one counts
            ke0 = dyn.kinetic_energy(m, v)
            v = dyn.rescale_to_temperature(m, v, t_event, cm)
            self._heat += dyn.kinetic_energy(m, v) - ke0
            self._target_T = t_event

        dt = s.timestep_fs
        thermostat = s.thermostat
        if thermostat == "berendsen":
            lam = dyn.berendsen_lambda(dyn.temperature(m, v, cm), self._target_T, dt, s.taut_fs)
            ke0 = dyn.kinetic_energy(m, v)
            v = v * lam
            self._heat += dyn.kinetic_energy(m, v) - ke0
        elif thermostat == "csvr":
            dof = dyn.degrees_of_freedom(len(m), cm)
            alpha = dyn.csvr_alpha(dyn.internal_kinetic_energy(m, v, cm), self._target_T, dof, dt,
                                   s.taut_fs, self._rng)
            ke0 = dyn.kinetic_energy(m, v)
            v = v * alpha
            self._heat += dyn.kinetic_energy(m, v) - ke0

        ke = dyn.kinetic_energy(m, v)
        volume = abs(float(np.linalg.det(self._cell))) if np.any(self._pbc) else 0.0
        p_eva3 = None
        if result.stress is not None and volume > 0:
            p_eva3 = dyn.pressure(result.stress, ke, volume)
        pe = result.energy if result.energy is not None else math.nan
        conserved = None if s.barostat else ke + pe - self._heat
        obs = Observables(
            temperature_K=dyn.temperature(m, v, cm), kinetic_eV=ke, potential_eV=pe, total_eV=ke + pe,
            heat_eV=self._heat, conserved_eV=conserved, volume_A3=volume,
            pressure_GPa=None if p_eva3 is None else p_eva3 / units.GPa,
        )
        self._last_observables = obs
        if conserved is not None and not supplied and math.isfinite(conserved):
            self._drift.add(self._time, conserved, result.model_version)
        frame = self._frame(result, supplied, velocities=v, observables=obs) if make_frame else None

        if s.barostat == "berendsen":
            if p_eva3 is None:
                raise InvalidInput(
                    f"ensemble {s.ensemble!r} needs stress from the force provider (got none) and a periodic cell"
                )
            mu = dyn.berendsen_mu(p_eva3, s.pressure_GPa * units.GPa, s.compressibility / units.GPa,
                                  dt, s.taup_fs)
            self._positions = self._positions * mu
            self._cell = self._cell * mu

        v = v + (0.5 * dt) * acc
        x = self._positions
        if thermostat == "langevin":
            x = x + (0.5 * dt) * v
            ke0 = dyn.kinetic_energy(m, v)
            v = dyn.langevin_o_step(v, m, self._target_T, s.friction, dt, self._rng)
            self._heat += dyn.kinetic_energy(m, v) - ke0
            x = x + (0.5 * dt) * v
        else:
            x = x + dt * v
        self._positions = x
        self._velocities = v
        if s.wrap:
            self._wrap()
        self._pending_kick_fs = dt
        self._last = result
        self._step += 1
        self._time += dt
        return frame

    def _wrap(self) -> None:
        self._positions, shift = dyn.wrap(self._positions, self._cell, self._pbc)
        self._images += shift

    def _frame(self, result: ForceResult, supplied: bool, velocities, observables) -> Frame:
        return Frame(
            step=self._step, time_fs=self._time, positions=self._positions.copy(),
            numbers=self._numbers.copy(), cell=self._cell.copy(), pbc=self._pbc.copy(),
            masses=self._masses.copy(), velocities=None if velocities is None else velocities.copy(),
            forces=result.forces.copy(), energy=result.energy,
            stress=None if result.stress is None else result.stress.copy(),
            force_std=None if result.force_std is None else result.force_std.copy(),
            noise=result.noise, model_version=result.model_version, forces_supplied=supplied,
            observables=observables, images=self._images.copy(),
            atom_std=None if result.atom_std is None else result.atom_std.copy(),
        )

    # -- checkpoint ------------------------------------------------------------------
    def checkpoint(self) -> bytes:
        meta: dict[str, Any] = {
            "settings": self.settings.to_dict(),
            "step": self._step, "time_fs": self._time, "pending_kick_fs": self._pending_kick_fs,
            "heat_eV": self._heat, "target_T": self._target_T, "schedule_index": self._schedule_index,
            "rng": self._rng.bit_generator.state, "drift": self._drift.to_list(),
            "observables": None if self._last_observables is None else self._last_observables.__dict__,
        }
        arrays = {
            "positions": self._positions, "velocities": self._velocities, "images": self._images,
            "numbers": self._numbers, "cell": self._cell, "pbc": self._pbc, "masses": self._masses,
        }
        ckpt.result_to_arrays("supplied", self._supplied, meta, arrays)
        ckpt.result_to_arrays("last", self._last, meta, arrays)
        return ckpt.pack(self.name, meta, arrays)

    def restore(self, blob: bytes) -> None:
        doc, arrays = ckpt.unpack(blob, self.name)
        self._load(doc, arrays)

    def _load(self, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        try:
            self.settings = SamplerSettings.from_dict(doc["settings"])
            self._positions = arrays["positions"].copy()
            self._velocities = arrays["velocities"].copy()
            self._images = arrays["images"].copy()
            self._numbers = arrays["numbers"].copy()
            self._cell = arrays["cell"].copy()
            self._pbc = arrays["pbc"].copy()
            self._masses = arrays["masses"].copy()
            self._step = int(doc["step"])
            self._time = float(doc["time_fs"])
            self._pending_kick_fs = float(doc["pending_kick_fs"])
            self._heat = float(doc["heat_eV"])
            self._target_T = float(doc["target_T"])
            self._schedule_index = int(doc["schedule_index"])
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = doc["rng"]
            self._rng = rng
            self._drift = DriftTracker()
            self._drift.load(doc["drift"])
            self._last_observables = None if doc["observables"] is None else Observables(**doc["observables"])
            self._supplied = ckpt.result_from_arrays("supplied", doc, arrays)
            self._last = ckpt.result_from_arrays("last", doc, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"corrupt sampler checkpoint: {exc!r}") from None
