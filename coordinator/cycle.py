"""The on-the-fly epistemic cycle (FLARE, Vandermause et al. 2020, Fig. 1b), over gRPC.

1. Label the first frame with the oracle; train on ``policy.initial_atoms`` of its atoms.
2. Run MD on the GP (sampler ↔ learner stream).  The sampler stops as soon as
   some force σ exceeds the threshold (k·σn, or an absolute value).
3. Label that frame; the acquisition policy picks the atoms whose
   environments enter the training set; re-optimise hyperparameters on the
   configured schedule; the update policy decides whether to continue with
   the new model; integrate the stopped step with the oracle's forces.
4. Repeat until ``sampler.steps``.

Durability: every label is written to the run directory before it is used,
and ``state.json`` is rewritten after each durable step, so a run killed at
any moment resumes (``epicycle run --resume``) without recomputing or losing
a label, with the same training set.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from coordinator.config import RunConfig
from coordinator.policies import ACQUISITION, UPDATE, UpdateContext
from coordinator.rundir import RunDirectory, RunState, StoredLabel
from coordinator.services import Services
from learner_service.client import LearnerClient
from protos import wire
from protos.epicycle.v1 import sampler_pb2
from protos.errors import CalculationFailed, InvalidInput
from sampler_service.client import SamplerClient

log = logging.getLogger("epicycle.coordinator")


def build_structure(config: RunConfig) -> Atoms:
    """The starting structure: a file, or a built-in crystal (rattled with the run seed)."""
    s = config.structure
    if s.file is not None:
        import ase.io

        try:
            atoms = ase.io.read(s.file, index=s.index)
        except FileNotFoundError:
            raise InvalidInput(f"structure.file: not found: {s.file}") from None
        except Exception as exc:  # noqa: BLE001
            raise InvalidInput(f"structure.file: cannot read {s.file}: {exc}") from None
    else:
        from ase.build import bulk

        if s.generator == "l12":
            a_el, b_el = s.element
            from ase.lattice.compounds import L1_2

            atoms = L1_2(symbol=(b_el, a_el), latticeconstant=s.a, size=(1, 1, 1))
        else:
            kind = {"fcc": "fcc", "bcc": "bcc", "sc": "sc", "diamond": "diamond"}[s.generator]
            atoms = bulk(s.element, kind, a=s.a, cubic=True)
        atoms = atoms.repeat(tuple(s.repeat))
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if s.rattle > 0:
        rng = np.random.default_rng(config.seed)
        atoms.positions += rng.normal(scale=s.rattle, size=atoms.positions.shape)
    return atoms


def md_settings(config: RunConfig) -> sampler_pb2.MDSettings:
    sm = config.sampler
    msg = sampler_pb2.MDSettings(engine=sm.engine, ensemble=sm.ensemble, timestep_fs=sm.timestep_fs,
                                 temperature_k=sm.temperature_K, initial_temperature_k=sm.temperature_K,
                                 seed=config.seed)
    if sm.friction_per_fs is not None:
        msg.friction_per_fs = sm.friction_per_fs
    if sm.taut_fs is not None:
        msg.taut_fs = sm.taut_fs
    if sm.pressure_GPa is not None:
        msg.pressure_gpa = sm.pressure_GPa
    for t, temp in sm.schedule:
        msg.schedule.add(time_fs=t, temperature_k=temp)
    return msg


def frame_atoms(frame: sampler_pb2.Frame, threshold: float) -> Atoms:
    """A streamed frame as ASE Atoms (extended XYZ-ready, σ as a per-atom array)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = wire.structure_from_proto(frame.structure)
    n = len(atoms)
    p = frame.prediction
    forces = wire.decode_array(p.forces, "forces", (n, 3))
    results = {"forces": np.array(forces)}
    if p.HasField("energy"):
        results["energy"] = p.energy
    info = {"step": int(frame.step), "time_fs": frame.time_fs, "temperature_K": frame.temperature_k,
            "potential_eV": frame.potential_energy, "kinetic_eV": frame.kinetic_energy,
            "conserved_eV": frame.conserved_energy, "model_version": int(p.model_version),
            "threshold": threshold, "noise": p.noise_std, "forces_from_oracle": bool(frame.forces_from_override)}
    if wire.has_array(p, "force_std"):
        std = np.array(wire.decode_array(p.force_std, "force_std", (n, 3)))
        atoms.arrays["force_std"] = std
        info["max_force_std"] = float(std.max(initial=0.0))
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(info)
    return atoms


def initial_atoms(config: RunConfig, n_atoms: int) -> list[int]:
    """The atoms of the first frame whose environments train the first model.

    ``policy.initial_atoms`` is a count (drawn at random with the run seed) or explicit indices.
    """
    spec = config.policy.initial_atoms
    if isinstance(spec, int):
        rng = np.random.default_rng([config.seed, 0])
        return sorted(int(i) for i in rng.choice(n_atoms, size=min(spec, n_atoms), replace=False))
    bad = [i for i in spec if not 0 <= i < n_atoms]
    if bad:
        raise InvalidInput(f"policy.initial_atoms: indices {bad} out of range for {n_atoms} atoms")
    return sorted(set(int(i) for i in spec))


@dataclass
class Progress:
    """Prints one line per streamed frame (and per oracle call) to ``stream``."""

    total_steps: int
    timestep_fs: float
    stream: object = sys.stdout
    quiet: bool = False

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def frame(self, step: int, time_fs: float, temperature: float, calls: int, ratio: float, n_env: int) -> None:
        self.line(f"step {step:>7}/{self.total_steps}  t = {time_fs / 1000:8.3f} ps  T = {temperature:8.1f} K  "
                  f"oracle calls {calls:>4}  max σ/threshold {ratio:5.2f}  training envs {n_env:>5}")


class OnTheFlyRun:
    """Drives one run through the services; see the module docstring."""

    def __init__(self, config: RunConfig, run_dir: RunDirectory, services: Services,
                 progress: Progress | None = None, metrics=None) -> None:
        self.config = config
        self.rd = run_dir
        self.services = services
        self.progress = progress or Progress(config.sampler.steps, config.sampler.timestep_fs)
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_oracle_pool(services.oracle)
        self.acquisition = ACQUISITION[config.policy.acquisition]()
        self.update_policy = UPDATE[config.policy.update]()
        self.learner = LearnerClient(services.learner_address)
        self.sampler = SamplerClient(services.sampler_address)
        self.threshold = float("nan")
        self.n_environments = 0
        self.noise = float("nan")
        self._skip_gate_once = False

    # -- helpers ---------------------------------------------------------------------------

    def _refresh_model_info(self) -> None:
        info = self.learner.info()
        self.noise = info.noise_std
        self.n_environments = int(info.n_environments)
        p = self.config.policy
        self.threshold = p.absolute_threshold if p.absolute_threshold else p.sigma_factor * info.noise_std
        if self.metrics is not None:
            self.metrics.model(info, self.threshold)

    def _label(self, atoms: Atoms) -> tuple:
        props = ("energy", "forces") + (("stress",) if self.config.learner.use_stress else ())
        started = time.perf_counter()
        try:
            result = self.services.oracle.label(atoms, props)
        except CalculationFailed:
            if self.metrics is not None:
                self.metrics.oracle_latency(time.perf_counter() - started, ok=False)
            raise
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.oracle_latency(seconds)
        return result, seconds

    def _select(self, label: StoredLabel) -> list[int]:
        if label.index == 0 or label.force_std is None:
            return initial_atoms(self.config, len(label.numbers))
        rng = np.random.default_rng([self.config.seed, label.index])
        chosen = self.acquisition.select(label.force_std, label.numbers, self.config.policy.atoms_per_call, rng)
        return [int(i) for i in chosen]

    def _apply_label(self, label: StoredLabel, state: RunState) -> None:
        """AddData (+ optimise on schedule) for one stored label, then persist the model and state."""
        started = time.perf_counter()
        atoms_idx = self._select(label)
        le = self.config.learner
        reply = self.learner.add_data(label.atoms(), forces=label.forces, atom_indices=atoms_idx,
                                      energy=label.energy, stress=label.stress,
                                      use_energy=le.use_energy and label.energy is not None,
                                      use_stress=le.use_stress and label.stress is not None)
        self.rd.event("training_update", label=label.index, step=label.step, time_fs=label.time_fs,
                      atoms=atoms_idx, n_environments=reply.n_environments, model_version=reply.model_version)
        calls = label.index + 1
        opt = le.optimize
        if opt.every and calls % opt.every == 0 and calls <= opt.until_calls:
            result = self.learner.optimize(max_iterations=opt.max_iterations,
                                           bounds={k: tuple(v) for k, v in opt.bounds.items()},
                                           space=opt.space)
            hyps = {h.name: h.value for h in result.hyperparameters}
            self.rd.event("optimize", label=label.index, step=label.step, time_fs=label.time_fs,
                          hyperparameters=hyps, log_likelihood=result.log_likelihood,
                          iterations=result.iterations, converged=result.converged, message=result.message,
                          seconds=result.seconds, at_bounds=list(result.at_bounds))
            if result.at_bounds:
                self.progress.line(f"  hyperparameter(s) {', '.join(result.at_bounds)} ended on a bound of their "
                                   f"box: the box decided them, not the data (learner.optimize.bounds)")
            if not result.converged:
                self.progress.line(f"  hyperparameter optimisation stopped after {result.iterations} iterations "
                                   f"without converging: {result.message}")
        exported = self.learner.export_model()
        state.model_file = self.rd.write_model(label.index, exported.model)
        state.labels_applied = label.index + 1
        state.training_atoms.append(atoms_idx)
        self._refresh_model_info()
        decision = self.update_policy.decide(UpdateContext(
            oracle_calls=calls, step=label.step,
            max_sigma_before=float(label.force_std.max()) if label.force_std is not None else 0.0,
            threshold=self.threshold, n_environments=self.n_environments))
        self.rd.event("update_decision", label=label.index, accept=decision.accept, reason=decision.reason,
                      threshold=self.threshold, noise=self.noise)
        if self.metrics is not None:
            self.metrics.model_update(time.perf_counter() - started)
            self.metrics.update(decision)
        # the stopped step is integrated with this label's forces when MD continues
        if label.index == 0:
            state.md_checkpoint = None
        else:
            state.md_checkpoint = f"label:{label.index}"
        state.pending_override = label.index
        state.step, state.time_fs = label.step, label.time_fs
        self.rd.save_state(state)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> RunState:
        rd, cfg = self.rd, self.config
        state = rd.load_state()
        self.learner.wait_ready(300)
        self.sampler.wait_ready(60)
        self.services.oracle.wait_ready(60)
        written = rd.label_count()
        resumed = written > 0 or state.model_file is not None
        if resumed:
            if state.model_file:
                self.learner.load_model(rd.read_bytes(state.model_file))
            for i in range(state.labels_applied, written):
                self.progress.line(f"applying label {i} written before the interruption")
                self._apply_label(rd.read_label(i), state)
            state.oracle_calls = written
            if self.metrics is not None:
                self.metrics.resumed(written, state.time_fs)
            rd.truncate_trajectory(state.step)
            rd.event("resumed", step=state.step, labels=written, labels_applied=state.labels_applied)
            self.progress.line(f"resumed at step {state.step} with {written} oracle label(s) on disk "
                               f"(none recomputed)")
        else:
            rd.event("run_started", config=cfg.to_dict(), learner=self.services.learner_address,
                     sampler=self.services.sampler_address)
        self._refresh_model_info()
        if written == 0:
            atoms = build_structure(cfg)
            self.progress.line(f"labelling the first frame ({len(atoms)} atoms) with the oracle ...")
            result, seconds = self._label(atoms)
            label = StoredLabel(index=0, step=0, time_fs=0.0, positions=atoms.positions, numbers=atoms.numbers,
                                cell=atoms.cell.array, pbc=atoms.pbc, energy=result.labels.energy,
                                forces=result.labels.forces, stress=result.labels.stress, force_std=None,
                                checkpoint=b"", structure_hash=result.structure_hash, oracle_seconds=seconds,
                                worker=result.worker)
            rd.write_label(label)
            state.oracle_calls = 1
            rd.event("oracle_call", label=0, step=0, time_fs=0.0, temperature_K=cfg.sampler.temperature_K,
                     seconds=seconds, energy=label.energy, max_sigma=None, threshold=None, worker=result.worker)
            if self.metrics is not None:
                self.metrics.oracle_call(0.0)
            self._apply_label(label, state)
        total = cfg.sampler.steps
        while state.step < total:
            self._md_chunk(state)
        state.finished = True
        rd.save_state(state)
        final = self.learner.export_model()
        from coordinator.rundir import atomic_write

        atomic_write(rd.path / "model_final.npz", final.model)
        rd.event("run_finished", step=state.step, time_fs=state.time_fs, oracle_calls=state.oracle_calls,
                 n_environments=self.n_environments, noise=self.noise)
        return state

    def _md_chunk(self, state: RunState) -> None:
        cfg, rd = self.config, self.rd
        ci = cfg.sampler.checkpoint_interval
        max_steps = min(ci - state.step % ci, cfg.sampler.steps - state.step)
        threshold = 0.0 if self._skip_gate_once else self.threshold
        if self._skip_gate_once:
            max_steps = 1
            self._skip_gate_once = False
        frames: list[Atoms] = []
        calls = state.oracle_calls

        def on_frame(frame: sampler_pb2.Frame) -> None:
            atoms = frame_atoms(frame, self.threshold)
            frames.append(atoms)
            ratio = atoms.info.get("max_force_std", 0.0) / self.threshold if self.threshold > 0 else 0.0
            rd.event("frame", step=int(frame.step), time_fs=frame.time_fs, temperature_K=frame.temperature_k,
                     potential_eV=frame.potential_energy, conserved_eV=frame.conserved_energy,
                     max_sigma=atoms.info.get("max_force_std"), threshold=self.threshold, noise=self.noise,
                     model_version=int(frame.prediction.model_version), n_environments=self.n_environments)
            self.progress.frame(int(frame.step), frame.time_fs, frame.temperature_k, calls, ratio,
                                self.n_environments)
            if self.metrics is not None:
                self.metrics.frame(frame.time_fs, frame.temperature_k, ratio)

        override = None
        if state.pending_override is not None:
            override = rd.read_label(state.pending_override)
        if state.md_checkpoint is None:
            atoms = rd.read_label(0).atoms()
            req = sampler_pb2.RunRequest(learner_address=self.services.learner_address)
            wire.structure_to_proto(atoms, out=req.new_run.structure)
            req.new_run.settings.CopyFrom(md_settings(cfg))
        else:
            if state.md_checkpoint.startswith("label:"):
                blob = rd.read_label(int(state.md_checkpoint.split(":")[1])).checkpoint
            else:
                blob = rd.read_bytes(state.md_checkpoint)
            req = sampler_pb2.RunRequest(checkpoint=blob, learner_address=self.services.learner_address)
        req.control.sigma_threshold = threshold
        req.control.max_steps = max_steps
        req.control.frame_interval = cfg.sampler.frame_interval
        if override is not None:
            wire.labels_to_proto(override.energy, override.forces, override.stress, out=req.override_forces)
        result = self.sampler.run(req, on_frame=on_frame)
        stop = result.stop
        if stop is None:
            raise CalculationFailed("the sampler ended the run without a stop report")
        rd.append_frames(frames)
        if stop.reason == sampler_pb2.STOP_REASON_UNCERTAIN:
            self._oracle_step(stop, state)
        else:
            state.md_checkpoint = rd.write_md_checkpoint(stop.checkpoint)
            state.pending_override = None
            state.step, state.time_fs = int(stop.step), float(stop.time_fs)
            rd.save_state(state)
            rd.event("md_checkpoint", step=state.step, time_fs=state.time_fs,
                     drift=stop.energy_drift_ev_per_atom_ps, steps_per_second=stop.steps_per_second)

    def _oracle_step(self, stop: sampler_pb2.StopReport, state: RunState) -> None:
        rd = self.rd
        frame = stop.frame
        atoms = wire.structure_from_proto(frame.structure)
        n = len(atoms)
        std = np.array(wire.decode_array(frame.prediction.force_std, "force_std", (n, 3)))
        index = state.oracle_calls  # labels 0..index-1 are on disk (run() sets it from the files on resume)
        self.progress.line(f"  σ = {stop.max_sigma:.4f} eV/Å > threshold {stop.threshold:.4f} eV/Å at step "
                           f"{frame.step} ({len(stop.uncertain)} component(s)): calling the oracle")
        try:
            result, seconds = self._label(atoms)
        except CalculationFailed as exc:
            rd.event("oracle_failed", step=int(frame.step), time_fs=frame.time_fs, message=str(exc))
            self.progress.line(f"  oracle failed on this frame ({exc}); continuing one step on the model")
            state.md_checkpoint = rd.write_md_checkpoint(stop.checkpoint)
            state.pending_override = None
            state.step, state.time_fs = int(stop.step), float(stop.time_fs)
            rd.save_state(state)
            self._skip_gate_once = True
            return
        label = StoredLabel(index=index, step=int(frame.step), time_fs=frame.time_fs, positions=atoms.positions,
                            numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc,
                            energy=result.labels.energy, forces=result.labels.forces, stress=result.labels.stress,
                            force_std=std, checkpoint=stop.checkpoint, structure_hash=result.structure_hash,
                            oracle_seconds=seconds, worker=result.worker)
        rd.write_label(label)          # durable before it is used
        state.oracle_calls = index + 1
        err = np.abs(np.array(wire.decode_array(frame.prediction.forces, "f", (n, 3))) - label.forces)
        rd.event("oracle_call", label=index, step=label.step, time_fs=label.time_fs,
                 temperature_K=frame.temperature_k, seconds=seconds, energy=label.energy,
                 max_sigma=float(stop.max_sigma), threshold=float(stop.threshold), worker=result.worker,
                 uncertain_atoms=sorted({u.atom for u in stop.uncertain}), max_force_error=float(err.max()),
                 rmse_force_error=float(np.sqrt(np.mean(err ** 2))))
        if self.metrics is not None:
            self.metrics.oracle_call(label.time_fs)
        self._apply_label(label, state)
