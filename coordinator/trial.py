"""The ``trial`` update policy: checkpoint → trial integration → accept, roll back, or reject.

seeds/000 ("Ensuring on-the-fly stability"), steps 1–6.  A model update can make the
potential stiffer than the time step Δt that was stable before; the first steps on the new
model then drift or explode.  With ``policy.update: trial`` every walker meets a new model
version through a *trial*:

1. the walker's durable checkpoint (where it stands when the update reaches it) is the
   rollback point;
2. it integrates ``policy.trial.window_steps`` steps on the new version (the learner holds
   that version, so a later update does not change the model under the trial) and streams
   every frame;
3. :func:`judge` watches the conserved quantity the engine reports (NVE: E_kin + E_pot;
   thermostats: minus the heat exchanged with the bath) and the forces;
4. within tolerance: the update is accepted for this walker, which goes on from the end of
   the trial (the trial steps are kept);
5. too much drift, non-finite or huge forces, or an engine failure (e.g. atoms pushed on top
   of each other): roll back to the checkpoint, multiply Δt by ``timestep_factor`` (not
   below ``min_timestep_fs``) and try again;
6. after ``max_retries`` failed retries (or at the Δt floor) the update is *rejected* for this
   walker: it goes on from the checkpoint with its previous Δt on the model version it ran on
   before (held by the learner), until a newer version arrives, which it trials again;
7. a version judged on fewer than ``window_steps`` steps from where the walker adopted it (the
   fallback after a rejection, or a trial cut short by an uncertainty stop) stays on probation:
   the walker's next chunks on it are judged the same way until the window is full (the cycle's
   ``WalkerState.judged_steps``).

A reduced Δt grows back by 1/``timestep_factor`` after every ``recover_steps`` steps
integrated without a failed trial, up to the configured Δt.

Everything here is pure (no gRPC, no files): the cycle owns the state and calls these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    steps: int                      # steps judged (frames on the model, after the reference)
    max_energy_change: float        # eV/atom, max |E_cons(t) - E_cons(t0)| over the frames judged
    max_force: float                # eV/Å, largest force norm seen
    reference: float | None = None  # E_cons(t0), eV: continues the judgement in the next chunk


def judge(frames: Sequence, config, reference: float | None = None) -> Verdict:
    """Judge (part of) a trial from its streamed frames (ASE Atoms from :func:`coordinator.cycle.frame_atoms`:
    ``info['conserved_eV']``, ``info['forces_from_oracle']``, forces on the calculator).

    The reference E_cons(t0) is the first frame integrated on the model (a frame whose forces were the
    oracle's override carries the other model's potential energy, so it cannot be compared), or
    ``reference`` when the trial window continues from an earlier chunk.  ``config`` is a
    :class:`coordinator.config.TrialConfig`.
    """
    on_model = [a for a in frames if not a.info.get("forces_from_oracle", False)]
    max_force = 0.0
    for a in on_model:
        f = a.calc.results.get("forces") if a.calc is not None else None
        if f is None:
            continue
        f = np.asarray(f)
        if not np.all(np.isfinite(f)):
            return Verdict(False, f"non-finite forces at step {a.info.get('step')}", len(on_model), math.inf, math.inf)
        max_force = max(max_force, float(np.linalg.norm(f, axis=1).max(initial=0.0)))
    if max_force > config.max_force_eV_A:
        return Verdict(False, f"a force of {max_force:.3g} eV/Å exceeds policy.trial.max_force_eV_A = "
                              f"{config.max_force_eV_A:g} eV/Å", len(on_model), math.nan, max_force)
    energies = [(a.info.get("conserved_eV"), len(a)) for a in on_model]
    energies = [(e, n) for e, n in energies if e is not None]
    if any(not math.isfinite(e) for e, _ in energies):
        # an ensemble without a conserved quantity (a barostat): only forces are watched
        return Verdict(True, "no conserved quantity in this ensemble: forces only", len(on_model), math.nan,
                       max_force)
    if reference is None:
        if len(energies) < 2:
            return Verdict(True, "too few steps on the model to measure drift", max(len(energies) - 1, 0), 0.0,
                           max_force, energies[0][0] if energies else None)
        reference, judged = energies[0][0], energies[1:]
    else:
        judged = energies
    if not judged:
        return Verdict(True, "no further steps on the model", 0, 0.0, max_force, reference)
    n_atoms = judged[0][1]
    change = max(abs(e - reference) for e, _ in judged) / n_atoms
    if change > config.max_energy_change_eV_per_atom:
        return Verdict(False, f"the conserved energy moved by {change:.3g} eV/atom in {len(judged)} steps "
                              f"(policy.trial.max_energy_change_eV_per_atom = "
                              f"{config.max_energy_change_eV_per_atom:g})", len(judged), change, max_force, reference)
    return Verdict(True, f"conserved energy within {change:.3g} eV/atom over {len(judged)} steps",
                   len(judged), change, max_force, reference)


def after_failure(attempt: int, timestep_fs: float, config) -> float | None:
    """Δt for retry number ``attempt`` (1-based) after a failed trial at ``timestep_fs``, or None:
    reject the update (retries used up, or Δt already at its floor)."""
    if attempt > config.max_retries:
        return None
    floor = config.min_timestep_fs
    if timestep_fs <= floor * (1 + 1e-12):
        return None
    return max(timestep_fs * config.timestep_factor, floor)


def recovered(timestep_fs: float, stable_steps: int, configured_fs: float, config) -> tuple[float, int]:
    """Δt after ``stable_steps`` steps without a failed trial: one step of 1/``timestep_factor`` per
    ``recover_steps`` stable steps, capped at the configured Δt.  Returns ``(Δt, steps left over)``."""
    dt = timestep_fs
    while stable_steps >= config.recover_steps and dt < configured_fs:
        dt = min(dt / config.timestep_factor, configured_fs)
        stable_steps -= config.recover_steps
    return dt, (0 if dt >= configured_fs else stable_steps)
