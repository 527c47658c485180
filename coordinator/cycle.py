"""The on-the-fly epistemic cycle (FLARE, Vandermause et al. 2020, Fig. 1b) with many walkers, over gRPC.

1. Label the first walker's first frame with the oracle; train on ``policy.initial_atoms`` of its atoms.
2. Every walker runs MD on the shared GP (its own ``Sampler.Run`` calls, sampler replicas used
   round robin).  A walker stops as soon as some force σ exceeds the threshold (k·σn, or an
   absolute value) and *parks*: its uncertain frame goes into the durable queue in the run
   directory, the acquisition policy picks the atoms whose environments will enter the training
   set, and the other walkers keep running on the current model.
3. Up to ``oracle.max_in_flight`` queued frames are labelled at once across the oracle pool, the
   most uncertain first.  A new frame that the labels already queued or in flight make certain
   (the learner's σ *conditioned* on their environments is below the threshold) is not sent: its
   walker waits for the next model instead.
4. Labels are written to disk in arrival order the moment they arrive and applied to the learner
   together (one ``AddDataBatch``, one refactorisation), then hyperparameters are re-optimised on
   schedule and the learner writes its own checkpoint.  Parked walkers integrate their stopped step
   with the oracle's forces and go on; queued frames that the new model no longer finds uncertain
   are dropped (counted).  Running walkers pick up the new model at their next step — or, with
   ``policy.update: trial`` (coordinator/trial.py), every walker stays on the model version it is
   pinned to and meets each newer version through a trial window: accepted, rolled back with a
   smaller Δt, or rejected (the walker then goes on with its previous version).
5. The run ends when every walker has done its steps, or earlier by the ``stop:`` rules
   (converged, label budget, wall-time budget).

Durability: every label is written to the run directory before it is used; ``state.json``
records which labels the learner's checkpoint holds (and in which batches they were applied),
what is queued and in flight, and where each walker stands.  A run killed at any moment resumes
(``epicycle run --resume``) without losing a written label, recomputing at most the labels that
were in flight, applying labels in their recorded arrival order.  No RPC carries the model's
matrices: the learner keeps its own checkpoints.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from coordinator.acquisition import (AcquisitionContext, AcquisitionSettings, Candidate, LearnerModelView,
                                    ScaledModelView, per_atom_sigma)
from coordinator.config import RunConfig, SamplerConfig, StructureConfig, Walker
from coordinator import trial as trials
from coordinator.calibration import OnlineCalibration
from coordinator.policies import ACQUISITION, UPDATE, UpdateContext
from coordinator.rundir import QueuedFrame, RunDirectory, RunState, StoredLabel, WalkerState
from coordinator.ports import Ports, SamplerPort, grpc_ports
from coordinator.seed_data import seed_learner, seed_species
from coordinator.services import OracleUnavailable, Services
from protos import wire
from protos.epicycle.v1 import common_pb2, sampler_pb2
from protos.errors import CalculationFailed, EpicycleError, InvalidInput, ModelError, NotFound

log = logging.getLogger("epicycle.coordinator")


class RunStopped(EpicycleError):
    """The run stopped on purpose before its end (oracle outage, a frame no oracle could label);
    everything computed is on disk and ``epicycle run --resume`` continues it."""


def build_structure(config: RunConfig, structure: StructureConfig | None = None, seed: int | None = None) -> Atoms:
    """A walker's starting structure: a file, or a built-in crystal (rattled with the seed)."""
    s = structure or config.structure
    seed = config.seed if seed is None else seed
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
        rng = np.random.default_rng(seed)
        atoms.positions += rng.normal(scale=s.rattle, size=atoms.positions.shape)
    return atoms


def walker_structure(config: RunConfig, walker: Walker) -> Atoms:
    # the first walker's structure is rattled with the run seed (a one-walker run as before)
    return build_structure(config, walker.structure, config.seed if walker.index == 0 else walker.seed)


def run_species(config: RunConfig) -> list[int]:
    """Atomic numbers of every walker's starting structure and of ``learner.data``."""
    species: set[int] = seed_species(config)  # and of learner.data
    for w in config.walker_list():
        species.update(int(z) for z in walker_structure(config, w).numbers)
    return sorted(species)


def md_settings(sm: SamplerConfig, seed: int) -> sampler_pb2.MDSettings:
    msg = sampler_pb2.MDSettings(engine=sm.engine, ensemble=sm.ensemble, timestep_fs=sm.timestep_fs,
                                 temperature_k=sm.temperature_K, initial_temperature_k=sm.temperature_K,
                                 seed=seed)
    if sm.friction_per_fs is not None:
        msg.friction_per_fs = sm.friction_per_fs
    if sm.taut_fs is not None:
        msg.taut_fs = sm.taut_fs
    if sm.pressure_GPa is not None:
        msg.pressure_gpa = sm.pressure_GPa
    for t, temp in sm.schedule:
        msg.schedule.add(time_fs=t, temperature_k=temp)
    return msg


def atom_sigma(prediction, n: int) -> np.ndarray:
    """(n,) eV/Å: the σ of each atom's force that the coordinator decides with (threshold
    ratio, acquisition, deduplication, dropping queued frames).

    ``prediction``: a ``Prediction`` message or a decoded learner prediction (``atom_std``
    and ``force_std`` attributes).  Its rotation-invariant ``atom_std`` (sqrt of the largest
    eigenvalue of the atom's 3×3 epistemic force covariance) when present, else the largest
    component σ of each atom (a lower bound of it that depends on the orientation), else 0.
    """
    if isinstance(prediction, common_pb2.Prediction):
        std = wire.decode_atom_std(prediction, n)
        if std is not None:
            return np.array(std)
        if wire.has_array(prediction, "force_std"):
            return np.array(wire.decode_array(prediction.force_std, "force_std", (n, 3))).max(axis=1, initial=0.0)
        return np.zeros(n)
    std = getattr(prediction, "atom_std", None)
    if std is not None:
        return np.array(std, dtype=np.float64).reshape(n)
    comp = getattr(prediction, "force_std", None)
    if comp is not None:
        return np.asarray(comp, dtype=np.float64).reshape(n, 3).max(axis=1, initial=0.0)
    return np.zeros(n)


def frame_atoms(frame: sampler_pb2.Frame, threshold: float, walker: str = "") -> Atoms:
    """A streamed frame as ASE Atoms (extended XYZ-ready, σ as per-atom arrays).

    ``arrays["force_std"]`` (n, 3) the component σ, ``arrays["atom_std"]`` (n,) the per-atom σ
    of :func:`atom_sigma`; ``info["max_atom_std"]`` its largest value (the one compared with
    the threshold), ``info["max_force_std"]`` the largest component σ, all eV/Å."""
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
            "threshold": threshold, "noise": p.noise_std, "forces_from_oracle": bool(frame.forces_from_override),
            "walker": walker}
    if wire.has_array(p, "force_std"):
        std = np.array(wire.decode_array(p.force_std, "force_std", (n, 3)))
        atoms.arrays["force_std"] = std
        info["max_force_std"] = float(std.max(initial=0.0))
    if wire.has_array(p, "force_std") or wire.has_array(p, "atom_std"):
        sigma = atom_sigma(p, n)
        atoms.arrays["atom_std"] = sigma
        info["max_atom_std"] = float(sigma.max(initial=0.0))
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(info)
    return atoms


def _label_sigma(label) -> np.ndarray:
    """Per-atom σ (n,) eV/Å of a stored label's stop frame under the old model (see :func:`atom_sigma`)."""
    return atom_sigma(label, len(label.numbers))


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
    """Prints progress lines (frames, oracle calls, updates) to ``stream``; thread-safe."""

    total_steps: int
    timestep_fs: float
    stream: object = sys.stdout
    quiet: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _first: dict = field(default_factory=dict, repr=False)   # walker -> (monotonic time, step) of its first frame

    def line(self, text: str) -> None:
        if not self.quiet:
            with self._lock:
                print(text, file=self.stream, flush=True)

    def frame(self, step: int, time_fs: float, temperature: float, calls: int, ratio: float, n_env: int,
              walker: str = "", total: int | None = None) -> None:
        who = f"[{walker}] " if walker else ""
        total = total or self.total_steps
        self.line(f"{who}step {step:>7}/{total}  t = {time_fs / 1000:8.3f} ps  "
                  f"T = {temperature:8.1f} K  oracle calls {calls:>4}  max σ/threshold {ratio:5.2f}  "
                  f"training envs {n_env:>5}{self._rate(walker, step, total)}")

    def _rate(self, walker: str, step: int, total: int) -> str:
        """``  12.3 steps/s  ETA 4 min`` from this walker's steps since its first frame in this process
        (oracle waits included, so the ETA is what the user will wait)."""
        now = time.monotonic()
        with self._lock:
            seen = self._first.setdefault(walker, (now, step))
        dt, ds = now - seen[0], step - seen[1]
        if dt < 1.0 or ds <= 0:
            return ""
        rate = ds / dt
        left = max(0, total - step) / rate
        eta = f"{left:.0f} s" if left < 120 else (f"{left / 60:.0f} min" if left < 7200 else f"{left / 3600:.1f} h")
        return f"  {rate:7.1f} steps/s  ETA {eta}"


class _Walker:
    """Run-time companion of one walker: its spec, client, open call and convergence window."""

    def __init__(self, spec: Walker, sampler: SamplerPort, window_steps: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.sampler = sampler
        self.call = None                 # the open RunCall while a chunk runs
        self.running = False
        self.latest_step = 0
        self.window: deque = deque()     # (step, max σ below threshold) of recent frames
        self.window_steps = window_steps
        self._lock = threading.Lock()

    def observe(self, step: int, ok: bool) -> None:
        """A frame at ``step`` (walker thread)."""
        with self._lock:
            self.latest_step = max(self.latest_step, step)
            self.window.append((step, ok))
            while self.window and self.window[0][0] <= step - self.window_steps:
                self.window.popleft()

    def accurate(self) -> tuple[int, int]:
        """(frames below the threshold, frames) in the window."""
        with self._lock:
            return sum(ok for _, ok in self.window), len(self.window)


class OnTheFlyRun:
    """Drives one run through the services; see the module docstring."""

    def __init__(self, config: RunConfig, run_dir: RunDirectory, services: Services | None = None,
                 progress: Progress | None = None, metrics=None, repair: bool = False,
                 ports: Ports | None = None) -> None:
        """``ports``: the learner, samplers and oracle to use (:mod:`coordinator.ports`, e.g. the
        in-process ones of :mod:`coordinator.inprocess`); default: the gRPC clients of ``services``."""
        if ports is None and services is None:
            raise ValueError("OnTheFlyRun needs the services to connect to, or ports (coordinator.ports.Ports)")
        self.config = config
        self.repair = repair
        self.rd = run_dir
        self.services = services
        self.ports = ports = ports if ports is not None else grpc_ports(services)
        self.specs = config.walker_list()
        self.multi = len(self.specs) > 1
        self.progress = progress or Progress(config.sampler.steps, config.sampler.timestep_fs)
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_oracle_pool(ports.oracle)
            metrics.walkers([w.name for w in self.specs])
            for w in self.specs:
                metrics.timestep(w.name, w.sampler.timestep_fs)
        self.acquisition = ACQUISITION[config.policy.acquisition]()
        self.update_policy = UPDATE[config.policy.update]()
        #: policy.update: trial — walkers pinned to model versions, each new version tried first
        self.trial = config.policy.update == "trial"
        self.newest = 0                      # the learner's newest model version
        self._held: set[int] = set()          # versions the learner holds for pinned walkers
        self.learner = ports.learner
        self.samplers = ports.samplers
        self.oracle = ports.oracle
        self.walkers = {w.name: _Walker(w, self.samplers[w.index % len(self.samplers)], config.stop.window_steps)
                        for w in self.specs}
        self.max_in_flight = config.oracle.max_in_flight or ports.oracle_workers
        self.threshold = float("nan")      # on the model's raw σ (= threshold_raw / s with calibration.scale)
        self.threshold_raw = float("nan")  # the configured one: k·σn and/or absolute
        self.calibration = OnlineCalibration(config.calibration.prior_alpha)
        self.scale = 1.0                   # s of σ_cal = s·σ_ep, fitted at the oracle calls
        self.threshold_rule = ""         # "relative" or "absolute": which rule set the threshold
        self.n_environments = 0
        self.noise = float("nan")
        self.model_warnings: list[str] = []  # the learner's ModelInfo.warnings, as last reported
        self.events: queue.Queue = queue.Queue()
        self.queued: dict[int, QueuedFrame] = {}      # waiting for an oracle slot
        self.in_flight: dict[int, QueuedFrame] = {}   # sent to the oracle
        self.failures: dict[int, tuple[float, int]] = {}  # seq -> (first failure time, attempts)
        self.stopping = ""
        self.state: RunState | None = None
        self._started = time.monotonic()
        self._wall_before = 0.0
        self._walker_pool = ThreadPoolExecutor(max(1, len(self.specs)), thread_name_prefix="walker")
        self._oracle_pool = ThreadPoolExecutor(max(1, self.max_in_flight), thread_name_prefix="label")

    # -- small helpers ---------------------------------------------------------------------

    def _save(self) -> None:
        st = self.state
        st.wall_seconds = self._wall_before + (time.monotonic() - self._started)
        st.in_flight = sorted(self.in_flight)
        self.rd.save_state(st)

    def _refresh_model_info(self):
        info = self.learner.info()
        self.noise = info.noise_std
        self.n_environments = int(info.n_environments)
        self.newest = int(info.model_version)
        p = self.config.policy
        self.threshold_raw, rule = p.threshold(info.noise_std)
        self._apply_threshold()
        if rule != self.threshold_rule:  # which of k·σn and the absolute value decides (docs/configuration.md)
            self.threshold_rule = rule
            k = p.relative_factor
            self.rd.event("threshold", value=self.threshold_raw, rule=rule, noise=self.noise,
                          relative=None if k is None else k * self.noise, absolute=p.absolute_threshold)
        if self.metrics is not None:
            self.metrics.model(info, self.threshold)
        warnings = list(info.warnings)
        if warnings != self.model_warnings:  # loud once per change, not at every update
            self.model_warnings = warnings
            self.rd.event("model_warnings", warnings=warnings, n_environments=self.n_environments,
                          model_version=int(info.model_version))
            for w in warnings:
                self.progress.line(f"  WARNING (model): {w}")
        return info

    def _apply_threshold(self) -> None:
        """The threshold on the model's raw σ: the configured one, or — with ``calibration.scale`` — the
        configured one divided by s, so that s·σ_ep (σ_cal) is what it bounds."""
        scale = self.scale if self.config.calibration.scale else 1.0
        self.threshold = self.threshold_raw / scale

    def _properties(self) -> tuple[str, ...]:
        return ("energy", "forces") + (("stress",) if self.config.learner.use_stress else ())

    def _queue_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.queued), len(self.in_flight))

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> RunState:
        rd, cfg = self.rd, self.config
        self.state = st = rd.load_state()
        self._wall_before = st.wall_seconds
        self.learner.wait_ready(600)
        for s in self.samplers:
            s.wait_ready(60)
        self.oracle.wait_ready(60)
        if not cfg.oracle.max_in_flight and any(a.startswith(("dns:", "ipv4:", "ipv6:")) for a in cfg.oracle.addresses):
            self.progress.line(f"note: oracle.addresses is one balanced name, whose number of workers the coordinator "
                               f"cannot know: {self.max_in_flight} label(s) in flight at a time; set "
                               f"oracle.max_in_flight to the number of oracle workers")
        if self.repair:
            self._repair()
        written = rd.audit(st)
        resumed = written > 0
        try:
            if resumed:
                self._resume(written)
            else:
                rd.event("run_started", config=cfg.to_dict(), **dict(self.ports.describe or {}),
                         walkers=[w.name for w in self.specs], max_in_flight=self.max_in_flight)
                if self.learner.info().n_labels:
                    # a remote learner that holds another run's data: a new run starts from the empty model
                    self.learner.restore_checkpoint("initial")
                    self.progress.line(f"learner {self.ports.learner_address} held training data: reset to "
                                       f"its initial (empty) model for this new run")
                seed_learner(self.config, self.learner, rd, self.progress)  # learner.data, if any
                self._refresh_model_info()
                self._first_label()
            self._loop()
        finally:
            self._shutdown()
        return st

    def _first_label(self) -> None:
        """Label walker 0's starting structure and train the first model on ``initial_atoms`` of it."""
        spec = self.specs[0]
        atoms = walker_structure(self.config, spec)
        self.progress.line(f"labelling the first frame ({len(atoms)} atoms) with the oracle ...")
        started = time.perf_counter()
        result = self.oracle.label(atoms, self._properties())
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.oracle_latency(seconds)
        label = self._first_frame_label(atoms, result, seconds)
        self._record_label(label, self.rd.write_label(label))
        self.rd.event("oracle_call", label=0, walker=spec.name, step=0, time_fs=0.0,
                      temperature_K=spec.sampler.temperature_K, seconds=seconds, energy=label.energy,
                      max_sigma=None, threshold=None, worker=result.worker)
        if self.metrics is not None:
            self.metrics.oracle_call(spec.name, 0.0)
        self._save()
        self._apply([label])
        for w in self.walkers.values():
            self._start_chunk(w)

    def _resume(self, written: int) -> None:
        """Bring the learner, the queue and the walkers back to the state on disk; see the module docstring."""
        st, rd = self.state, self.rd
        # the learner: the checkpoint that holds exactly labels 0..labels_applied-1
        want = st.learner_checkpoint or "initial"
        info = self.learner.info()
        if info.checkpoint_id != want or (want == "initial" and info.n_labels):
            try:
                self.learner.restore_checkpoint(want)
                self.progress.line(f"learner restored to its checkpoint {want} ({st.labels_applied} labels)")
            except NotFound:
                self._rebuild_learner()
        self._refresh_model_info()
        # labels that arrived after the last state update are recorded now and applied below, in arrival order
        for i in range(st.oracle_calls, written):
            self._record_label(rd.read_label(i), rd.label_sha256(i))
        for i in range(1, written):  # the calibration points of the labels on disk
            self._calibrate(rd.read_label(i), log_event=False)
        if len(self.calibration):
            self.scale = self.calibration.scale()
            self._apply_threshold()
        labelled_seqs = set(st.label_seqs)
        for seq in rd.queued_seqs():
            if seq in labelled_seqs:
                rd.archive_queue_entry(seq)
        recompute = 0
        for seq in rd.queued_seqs():
            entry = rd.read_queue_entry(seq)
            self.queued[seq] = entry
            if seq in st.in_flight:
                recompute += 1
        if recompute:
            st.count("recomputed", recompute)
        if self.metrics is not None:
            self.metrics.resumed(written, max((w.get("time_fs", 0.0) for w in st.walkers.values()), default=0.0))
        for name in st.walkers:
            if name in self.walkers:
                rd.truncate_trajectory(name, st.walker(name).step)
        if self.trial:
            self._unpin_after_resume()
        rd.event("resumed", labels=written, labels_applied=st.labels_applied, queued=len(self.queued),
                 recomputed_in_flight=recompute, learner_checkpoint=st.learner_checkpoint,
                 walkers={n: {"step": w.get("step", 0), "parked": w.get("parked")} for n, w in st.walkers.items()})
        self.progress.line(f"resumed with {written} oracle label(s) on disk (none recomputed); "
                           f"{len(self.queued)} frame(s) queued, of which {recompute} were in flight and are "
                           f"labelled again")
        self._save()
        pending = [lab for lab in (rd.read_label(i) for i in range(st.labels_applied, written))]
        if pending:
            self.progress.line(f"applying {len(pending)} label(s) written before the interruption")
            self._apply(pending)
        for name, w in self.walkers.items():
            ws = st.walker(name)
            if ws.done or ws.parked is not None or w.running:
                continue
            if ws.waiting_update:
                ws.waiting_update = False
                st.set_walker(name, ws)
            self._start_chunk(w)
        self._save()
        self._dispatch()

    def _unpin_after_resume(self) -> None:
        """Model versions are numbered by a learner process and held in its memory, so pins do not
        survive a restart: every walker that was pinned trials the newest model again (a trial under
        way restarts from its rollback point, keeping its attempts); what it rejected is forgotten."""
        st = self.state
        for name in self.walkers:
            ws = st.walker(name)
            if ws.done or not (ws.model_version or ws.trial):
                continue
            if ws.trial is not None:
                ws.md_checkpoint, ws.pending_override = ws.trial["checkpoint"], ws.trial["override"]
                ws.step, ws.time_fs = ws.trial["step"], ws.trial["time_fs"]
                ws.trial["version"] = 0
                ws.trial["previous"] = 0
                ws.trial.pop("probation", None)  # it trials the newest version now
                ws.trial.pop("steps_done", None)
            ws.model_version = -1  # unknown: trial the newest at the next chunk, with nothing to fall back on
            ws.rejected_version = 0
            st.set_walker(name, ws)
            self.rd.event("trial_after_resume", walker=name, step=ws.step,
                          attempt=ws.trial["attempt"] if ws.trial else 0)

    def _repair(self) -> None:
        """``--repair``: label the structures of missing or damaged label files again, under the same index.

        The structure comes from the label's archived queue entry (``queue/labelled/``), or for label 0 from
        the first walker's starting structure; the file is rewritten with everything else as before, and
        its new SHA-256 recorded.  Nothing is renumbered.
        """
        st, rd = self.state, self.rd
        rd.remove_temporary_files()
        _, problems = rd.check(st)
        for index, problem in problems:
            if index >= st.oracle_calls:
                raise InvalidInput(f"cannot repair: {problem}. Remove the labels after the gap by hand only if you "
                                   f"know they were never applied (state.json: labels_applied = {st.labels_applied})")
            self.progress.line(f"repairing label {index}: {problem}")
            if index == 0:
                atoms, entry = walker_structure(self.config, self.specs[0]), None
            else:
                entry = rd.read_queue_entry(st.label_seqs[index], archived=True)
                atoms = entry.atoms()
            started = time.perf_counter()
            result = self.oracle.label(atoms, self._properties())
            seconds = time.perf_counter() - started
            label = (self._first_frame_label(atoms, result, seconds) if entry is None else
                     self._entry_label(index, entry, result, seconds))
            sha = rd.write_label(label)
            if index < len(st.label_sha256):
                st.label_sha256[index] = sha
            self._save()
            rd.event("label_repaired", label=index, problem=problem, seconds=seconds, worker=result.worker)

    def _rebuild_learner(self) -> None:
        """The learner lost its checkpoints (e.g. a new volume): rebuild from the run's labels, in the
        recorded batches and with the optimisation schedule the run followed."""
        st, rd = self.state, self.rd
        self.progress.line(f"the learner does not have checkpoint {st.learner_checkpoint}: rebuilding it from "
                           f"the {st.labels_applied} labels in {rd.labels_dir}")
        self.learner.restore_checkpoint("initial")
        seed_learner(self.config, self.learner, rd, self.progress, rebuilding=True)
        applied = 0
        for batch in st.apply_batches:
            labels = [rd.read_label(i) for i in batch]
            self.learner.add_data_batch([self._item(lab) for lab in labels])
            self._optimize_on_schedule(applied, applied + len(labels), log_event=False)
            applied += len(labels)
        ck = self.learner.checkpoint()
        st.learner_checkpoint = ck.checkpoint_id
        self._save()
        self.rd.event("learner_rebuilt", labels=applied, learner_checkpoint=ck.checkpoint_id)

    # -- the event loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            reason = self._stop_reason()
            if reason and not self.stopping:
                self._begin_stop(reason)
            if self.stopping and not self.in_flight and not any(w.running for w in self.walkers.values()):
                break
            if not self.stopping and self._all_done():
                halted = [n for n in self.walkers if self.state.walker(n).halted]
                self.stopping = ("every walker has done its steps" if not halted else
                                 f"every walker has stopped ({', '.join(halted)} halted: see walker_halted)")
                break
            try:
                first = self.events.get(timeout=1.0)
            except queue.Empty:
                continue
            batch = [first]
            while True:  # everything that has arrived meanwhile: labels are applied together
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            arrived: list[StoredLabel] = []
            for ev in batch:
                kind = ev[0]
                if kind == "chunk":
                    self._on_chunk(*ev[1:])
                elif kind == "label":
                    label = self._on_label(*ev[1:])
                    if label is not None:
                        arrived.append(label)
                elif kind == "retry":
                    self._send(ev[1])
            if arrived:
                self._apply(arrived)
            self._dispatch()
        self._finish()

    def _all_done(self) -> bool:
        st = self.state
        return (all(st.walker(n).done for n in self.walkers) and not self.queued and not self.in_flight
                and not any(w.running for w in self.walkers.values()))

    def _stop_reason(self) -> str:
        st, sc = self.state, self.config.stop
        if sc.max_labels and st.oracle_calls >= sc.max_labels:
            return f"label budget of {sc.max_labels} spent"
        if sc.max_wall_s and self._wall_before + (time.monotonic() - self._started) >= sc.max_wall_s:
            return f"wall-time budget of {sc.max_wall_s:g} s spent"
        if sc.window_steps and not self.queued and not self.in_flight:
            converged = True
            for name, w in self.walkers.items():
                ws = st.walker(name)
                if ws.done:
                    continue
                if ws.parked is not None or ws.waiting_update or w.latest_step - ws.last_call_step < sc.window_steps:
                    converged = False
                    break
                good, total = w.accurate()
                if not total or good < sc.accurate_ratio * total:
                    converged = False
                    break
            if converged:
                return (f"converged: no oracle call in the last {sc.window_steps} steps of every walker and "
                        f"≥ {sc.accurate_ratio:.0%} of their frames below the threshold")
        return ""

    def _begin_stop(self, reason: str) -> None:
        """No new chunks or labels; running chunks are cancelled (walkers keep their last durable
        checkpoint); labels in flight are awaited and applied, as they cost oracle time."""
        self.stopping = reason
        self.progress.line(f"stopping: {reason}")
        self.rd.event("stopping", reason=reason, in_flight=sorted(self.in_flight), queued=sorted(self.queued))
        for w in self.walkers.values():
            if w.call is not None:
                w.call.cancel()

    def _finish(self) -> None:
        st = self.state
        st.finished = True
        st.stop_reason = self.stopping
        self._save()
        self.rd.event("run_finished", step=st.step, time_fs=st.time_fs, oracle_calls=st.oracle_calls,
                      n_environments=self.n_environments, noise=self.noise, reason=self.stopping,
                      learner_checkpoint=st.learner_checkpoint, counters=dict(st.counters),
                      walkers={n: {"step": w.get("step", 0), "time_fs": w.get("time_fs", 0.0)}
                               for n, w in st.walkers.items()})
        self.progress.line(f"run finished: {self.stopping}")
        self._record_heldout()

    def _record_heldout(self) -> None:
        """The final model's predictions at the run's held-out labels, for the report's validation block
        (coordinator/validate.py); a failure here is logged, never a failed run."""
        from coordinator.validate import HELDOUT_XYZ, record_heldout

        energy, stress = self._trained_labels()
        try:
            kind, n = record_heldout(self.rd.path, self.learner.predict, use_energy=energy, use_stress=stress)
        except (EpicycleError, OSError) as exc:
            self.rd.event("heldout_failed", error=str(exc))
            self.progress.line(f"held-out validation not recorded: {exc}")
            return
        self.rd.event("heldout_recorded", selection=kind, frames=n, file=HELDOUT_XYZ)

    def _shutdown(self) -> None:
        self.stopping = self.stopping or "shutdown"
        for w in self.walkers.values():
            if w.call is not None:
                w.call.cancel()
        self._walker_pool.shutdown(wait=True, cancel_futures=True)
        self._oracle_pool.shutdown(wait=False, cancel_futures=True)
        for s in self.samplers:
            s.close()
        self.learner.close()

    # -- walkers ---------------------------------------------------------------------------

    def _start_chunk(self, w: _Walker) -> None:
        """Submit the walker's next MD chunk (up to its next checkpoint boundary)."""
        if self.stopping:
            return
        st, rd = self.state, self.rd
        ws = st.walker(w.name)
        sm = w.spec.sampler
        if ws.step >= sm.steps:
            ws.done = True
            st.set_walker(w.name, ws)
            self._save()
            return
        ci = sm.checkpoint_interval
        max_steps = min(ci - ws.step % ci, sm.steps - ws.step)
        threshold = self.threshold
        trial = None
        free = self.config.policy.min_steps_between_calls
        if free and (ws.pending_override is not None or (ws.md_checkpoint is None and w.spec.index == 0)):
            # the walker's oracle call (or the first frame's label) was at ws.step: steps ws.step .. +free ungated
            ws.ungated_until = ws.step + free
            st.set_walker(w.name, ws)
            self._save()
        ungated = ws.step <= ws.ungated_until
        if ungated:
            max_steps, threshold = min(max_steps, ws.ungated_until + 1 - ws.step), 0.0
        if ws.skip_gate:
            max_steps, threshold = 1, 0.0
        elif self.trial:
            trial = self._trial_for(w, ws)
            if trial is not None:
                # the rest of the trial window (a window cut by the end of an ungated stretch goes on next chunk)
                left = self.config.policy.trial.window_steps - trial.get("steps_done", 0)
                max_steps = min(left, sm.steps - ws.step,
                                ws.ungated_until + 1 - ws.step if ungated else sm.steps - ws.step)
        if ws.md_checkpoint is None:
            req = sampler_pb2.RunRequest(learner_address=self.ports.learner_address)
            wire.structure_to_proto(walker_structure(self.config, w.spec), out=req.new_run.structure)
            req.new_run.settings.CopyFrom(md_settings(sm, w.spec.seed))
        else:
            if ws.md_checkpoint.startswith("label:"):
                blob = rd.read_label(int(ws.md_checkpoint.split(":")[1])).checkpoint
            else:
                blob = rd.read_bytes(ws.md_checkpoint)
            req = sampler_pb2.RunRequest(checkpoint=blob, learner_address=self.ports.learner_address)
        req.control.sigma_threshold = threshold
        req.control.max_steps = max_steps
        req.control.frame_interval = sm.frame_interval
        if ws.resend_schedule and ws.md_checkpoint is not None:
            # the schedule changed on resume (--set): the checkpoint still carries the old one
            req.control.replace_schedule = True
            for t, temp in sm.schedule:
                req.control.schedule.add(time_fs=t, temperature_k=temp)
        if self.trial:
            req.control.model_version = trial["version"] if trial is not None else max(ws.model_version, 0)
            req.control.timestep_fs = ws.timestep_fs or sm.timestep_fs
            if trial is not None:
                req.control.frame_interval = 1  # the trial watches every step
        if ws.pending_override is not None:
            o = rd.read_label(ws.pending_override)
            wire.labels_to_proto(o.energy, o.forces, o.stress, out=req.override_forces)
        w.running = True
        self._walker_pool.submit(self._run_chunk, w, req, threshold, sm.frame_interval)

    def _run_chunk(self, w: _Walker, req: sampler_pb2.RunRequest, threshold: float, every: int = 1) -> None:
        """Walker thread: one Sampler.Run call; frames are logged here (those on the walker's frame
        interval; a trial streams every step), the result goes to the loop."""
        frames: list[Atoms] = []
        stop = None
        try:
            call = w.sampler.open_run(req)
            w.call = call
            if self.stopping:
                call.cancel()
            for reply in call:
                if reply.HasField("frame"):
                    self._on_frame(w, reply.frame, frames, threshold, reply.frame.step % every == 0)
                else:
                    stop = reply.stop
            self.events.put(("chunk", w, frames, stop, None, call.cancelled))
        except Exception as exc:  # noqa: BLE001 - reported to the loop, which stops the run
            self.events.put(("chunk", w, frames, None, exc, False))
        finally:
            w.call = None

    def _on_frame(self, w: _Walker, frame: sampler_pb2.Frame, frames: list, threshold: float,
                  log_it: bool = True) -> None:
        atoms = frame_atoms(frame, threshold, w.name)
        atoms.info["logged"] = log_it
        frames.append(atoms)
        if not log_it:
            return
        ratio = atoms.info.get("max_atom_std", 0.0) / self.threshold if self.threshold > 0 else 0.0
        w.observe(int(frame.step), ratio < 1.0)
        self.rd.event("frame", walker=w.name, step=int(frame.step), time_fs=frame.time_fs,
                      temperature_K=frame.temperature_k, potential_eV=frame.potential_energy,
                      conserved_eV=frame.conserved_energy, max_sigma=atoms.info.get("max_atom_std"),
                      threshold=self.threshold, noise=self.noise,
                      model_version=int(frame.prediction.model_version), n_environments=self.n_environments)
        self.progress.frame(int(frame.step), frame.time_fs, frame.temperature_k, self.state.oracle_calls, ratio,
                            self.n_environments, w.name if self.multi else "", w.spec.sampler.steps)
        if self.metrics is not None:
            self.metrics.frame(w.name, frame.time_fs, frame.temperature_k, ratio)

    def _on_chunk(self, w: _Walker, frames: list, stop, exc, cancelled: bool) -> None:
        w.running = False
        st, rd = self.state, self.rd
        if cancelled or (exc is not None and self.stopping):
            return  # stopped on purpose: the walker stays at its last durable checkpoint
        ws = st.walker(w.name)
        if ws.trial is not None:
            tr = ws.trial
            verdict = self._judge_trial(w, frames, stop, exc, tr.get("e0"))
            if not verdict.ok:
                self._trial_failed(w, ws, verdict)
                return
            tr["steps_done"] = tr.get("steps_done", 0) + verdict.steps
            tr["e0"] = verdict.reference
            tr["max_change"] = max(tr.get("max_change", 0.0), verdict.max_energy_change
                                   if verdict.max_energy_change == verdict.max_energy_change else 0.0)
            window_ended = (tr["steps_done"] >= self.config.policy.trial.window_steps
                            or stop.reason == sampler_pb2.STOP_REASON_UNCERTAIN
                            or int(stop.step) >= w.spec.sampler.steps)
            if window_ended:
                self._trial_passed(w, ws, verdict)
            # else: the window was cut (an ungated stretch ended); the trial goes on in the next chunk
        elif exc is not None:
            raise exc
        if stop is None:
            raise CalculationFailed(f"walker {w.name}: the sampler ended the run without a stop report")
        frames = [a for a in frames if a.info.pop("logged", True)]
        rd.append_frames(w.name, frames)
        ws.resend_schedule = False  # the new checkpoint carries the current schedule
        ws.skip_gate = False
        ws.pending_override = None
        ws.step, ws.time_fs = int(stop.step), float(stop.time_fs)
        if self.trial and ws.timestep_fs:
            self._recover_timestep(w, ws, int(stop.steps_taken))
        uncertain = stop.reason == sampler_pb2.STOP_REASON_UNCERTAIN
        ws.md_checkpoint = rd.write_walker_checkpoint(w.name, ws.step, stop.checkpoint, "stop" if uncertain else "md")
        if uncertain:
            ws.last_call_step = ws.step
            w.observe(ws.step, False)
            self._enqueue(w, ws, stop)
            return
        if ws.step >= w.spec.sampler.steps:
            ws.done = True
        st.set_walker(w.name, ws)
        self._save()
        keep = {ws.md_checkpoint} | ({ws.trial["checkpoint"]} if ws.trial and ws.trial["checkpoint"] else set())
        rd.prune_walker_checkpoints(w.name, keep)
        rd.event("md_checkpoint", walker=w.name, step=ws.step, time_fs=ws.time_fs,
                 drift=stop.energy_drift_ev_per_atom_ps, steps_per_second=stop.steps_per_second)
        if not ws.done:
            self._start_chunk(w)

    # -- policy.update: trial (coordinator/trial.py) ----------------------------------------

    def _trial_for(self, w: _Walker, ws: WalkerState) -> dict | None:
        """The trial this chunk of ``w`` runs, starting one if a model version newer than the walker's
        (and than the one it last rejected) exists; None: a normal chunk on ``ws.model_version``.
        Updates ``ws`` in the run state."""
        st = self.state
        if ws.trial is not None:
            if not ws.trial["version"]:  # resumed: the learner's versions were renumbered
                ws.trial["version"] = self.newest
                st.set_walker(w.name, ws)
                self._sync_holds()
            return ws.trial
        window = self.config.policy.trial.window_steps
        if ws.model_version == 0:  # the walker's first chunk: it starts on the newest model (nothing to compare)
            ws.model_version, ws.judged_steps = self.newest, window
            st.set_walker(w.name, ws)
            self._sync_holds()
            return None
        probation = False
        if ws.model_version > 0 and self.newest <= max(ws.model_version, ws.rejected_version):
            if ws.judged_steps >= window:
                return None
            # the walker's model was judged on fewer than W steps from where it adopted it (a trial cut
            # short by an uncertainty stop, or the fallback after a rejected update): judge on
            probation = True
        version = ws.model_version if probation else self.newest
        ws.trial = {"version": version, "previous": max(ws.model_version, 0), "attempt": 0,
                    "checkpoint": ws.md_checkpoint, "override": ws.pending_override, "step": ws.step,
                    "time_fs": ws.time_fs, "timestep_before": ws.timestep_fs}
        if probation:
            ws.trial.update(probation=True, steps_done=ws.judged_steps)
        st.set_walker(w.name, ws)
        self._sync_holds()
        self._save()
        self.rd.event("trial_started", walker=w.name, step=ws.step, time_fs=ws.time_fs, model_version=version,
                      previous_version=ws.model_version, timestep_fs=self._timestep(w, ws),
                      window_steps=window - (ws.judged_steps if probation else 0), probation=probation)
        return ws.trial

    def _timestep(self, w: _Walker, ws: WalkerState) -> float:
        return ws.timestep_fs or w.spec.sampler.timestep_fs

    def _judge_trial(self, w: _Walker, frames: list, stop, exc, reference: float | None = None) -> trials.Verdict:
        """The trial's verdict from its frames; an engine failure on the new model (e.g. atoms pushed
        together, which the learner refuses) is a failed trial, a transport failure is not."""
        if exc is not None:
            if isinstance(exc, OracleUnavailable) or not isinstance(exc, (InvalidInput, CalculationFailed, ModelError)):
                raise exc
            return trials.Verdict(False, f"the engine failed on the new model: {exc}", len(frames), float("nan"),
                                  float("nan"))
        if stop is None:
            raise CalculationFailed(f"walker {w.name}: the sampler ended the run without a stop report")
        return trials.judge(frames, self.config.policy.trial, reference)

    def _trial_failed(self, w: _Walker, ws: WalkerState, verdict: trials.Verdict) -> None:
        """Roll back to the trial's checkpoint: retry with a smaller Δt, or reject the update."""
        st, cfg = self.state, self.config.policy.trial
        tr = ws.trial
        tr["attempt"] += 1
        dt_now = self._timestep(w, ws)
        new_dt = trials.after_failure(tr["attempt"], dt_now, cfg)
        ws.md_checkpoint, ws.pending_override = tr["checkpoint"], tr["override"]
        ws.step, ws.time_fs = tr["step"], tr["time_fs"]
        ws.stable_steps = 0
        if tr.get("steps_done"):  # a trial window that went on over chunks wrote frames after its start
            self.rd.truncate_trajectory(w.name, ws.step)
        for key in ("steps_done", "e0", "max_change"):
            tr.pop(key, None)
        common = dict(walker=w.name, step=ws.step, time_fs=ws.time_fs, model_version=tr["version"],
                      previous_version=tr["previous"], attempt=tr["attempt"], reason=verdict.reason,
                      max_energy_change_eV_per_atom=verdict.max_energy_change, max_force_eV_A=verdict.max_force,
                      timestep_fs=dt_now)
        who = f"[{w.name}] " if self.multi else ""
        if new_dt is not None:
            ws.timestep_fs = new_dt
            st.set_walker(w.name, ws)
            self._save()
            self.rd.event("rollback", new_timestep_fs=new_dt, **common)
            self.progress.line(f"  {who}trial of model version {tr['version']} failed ({verdict.reason}): rolled back "
                               f"to step {ws.step}, Δt {dt_now:g} → {new_dt:g} fs")
            if self.metrics is not None:
                self.metrics.rollback(w.name, "retry", new_dt)
            self._start_chunk(w)
            return
        ws.trial = None
        ws.rejected_version = max(ws.rejected_version, tr["version"])
        ws.timestep_fs = tr["timestep_before"]
        ws.judged_steps = 0  # what the walker falls back on is judged again from the rollback point
        if self.metrics is not None:
            self.metrics.rollback(w.name, "rejected", self._timestep(w, ws))
        # the walker's own model failed its probation: go on only if a version it has not rejected exists
        probation_failed = tr.get("probation") and self.newest <= ws.rejected_version
        if ws.model_version <= 0 or probation_failed:
            ws.done = True
            ws.halted = (f"model version {tr['version']} failed {tr['attempt']} trial(s) ({verdict.reason}) and "
                         + ("no other model version is there to go on with" if probation_failed else
                            "no earlier model is held to go on with (the learner was restarted)"))
            st.set_walker(w.name, ws)
            self._save()
            self._sync_holds()
            self.rd.event("walker_halted", message=ws.halted, **common)
            self.progress.line(f"  {who}walker halted: {ws.halted}")
            return
        st.set_walker(w.name, ws)
        self._save()
        self._sync_holds()
        if tr.get("probation"):  # a newer version arrived meanwhile: the next chunk trials it
            self.rd.event("update_rejected", continue_on_version=self.newest, **common)
            self.progress.line(f"  {who}model version {tr['version']} failed {tr['attempt']} trial(s) "
                               f"({verdict.reason}): going on from step {ws.step} with a trial of version "
                               f"{self.newest}")
            self._start_chunk(w)
            return
        self.rd.event("update_rejected", continue_on_version=ws.model_version, **common)
        self.progress.line(f"  {who}model version {tr['version']} rejected after {tr['attempt']} failed trial(s) "
                           f"({verdict.reason}): going on from step {ws.step} on version {ws.model_version}, "
                           f"judged again over the next {self.config.policy.trial.window_steps} steps")
        self._start_chunk(w)

    def _trial_passed(self, w: _Walker, ws: WalkerState, verdict: trials.Verdict) -> None:
        """Adopt the trial's version.  A window cut short (an uncertainty stop, the end of the run) leaves
        the version judged on fewer than W steps: ``judged_steps`` records how many, and the walker's next
        chunk on it is judged for the rest (see :meth:`_trial_for`)."""
        tr = ws.trial
        ws.trial = None
        ws.model_version = tr["version"]
        ws.judged_steps = min(tr.get("steps_done", 0), self.config.policy.trial.window_steps)
        self.state.set_walker(w.name, ws)
        self._sync_holds()
        self.rd.event("trial_passed", walker=w.name, step=tr["step"], time_fs=tr["time_fs"],
                      model_version=tr["version"], attempts=tr["attempt"] + 1, reason=verdict.reason,
                      judged_steps=ws.judged_steps, probation=bool(tr.get("probation")),
                      max_energy_change_eV_per_atom=verdict.max_energy_change, max_force_eV_A=verdict.max_force,
                      timestep_fs=self._timestep(w, ws))
        if self.metrics is not None:
            self.metrics.timestep(w.name, self._timestep(w, ws))

    def _recover_timestep(self, w: _Walker, ws: WalkerState, steps: int) -> None:
        """A reduced Δt grows back after ``policy.trial.recover_steps`` stable steps."""
        configured = w.spec.sampler.timestep_fs
        before = ws.timestep_fs
        dt, left = trials.recovered(before, ws.stable_steps + steps, configured, self.config.policy.trial)
        ws.stable_steps = left
        if dt != before:
            ws.timestep_fs = None if dt >= configured else dt
            self.rd.event("timestep_recovered", walker=w.name, step=ws.step, time_fs=ws.time_fs,
                          timestep_fs=dt, previous_timestep_fs=before)
            if self.metrics is not None:
                self.metrics.timestep(w.name, dt)

    def _sync_holds(self) -> None:
        """Ask the learner to hold every model version a walker is pinned to or trials."""
        if not self.trial:
            return
        want = set()
        for name in self.walkers:
            ws = self.state.walker(name)
            if ws.done:
                continue
            want.add(ws.model_version)
            if ws.trial is not None:
                want.add(ws.trial["version"])
        want = {v for v in want if v > 0}
        if want != self._held:
            reply = self.learner.hold_versions(want)
            self._held = want
            if reply.missing:
                log.warning("learner no longer holds model version(s) %s", list(reply.missing))

    # -- the label queue -------------------------------------------------------------------

    def _acquisition_context(self, seq: int, call_index: int) -> AcquisitionContext:
        """What the acquisition may consult for queue entry ``seq``: the learner (kernel distances,
        conditional σ), σn, the threshold, which oracle call the frame would be, a generator seeded
        by (run seed, seq), and the ``policy:`` knobs."""
        scale = self.scale if self.config.calibration.scale else 1.0
        view = LearnerModelView(self.learner)
        z2 = None
        if len(self.calibration):
            out = self.calibration.summary()
            z2 = out["scaled" if self.config.calibration.scale else "raw"]["mean_squared_z"]
        # with calibration.scale the rules see σ_cal = s·σ and the threshold it is compared with
        return AcquisitionContext(model=ScaledModelView(view, scale) if scale != 1.0 else view, noise=self.noise,
                                  threshold=self.threshold * scale, call_index=call_index,
                                  rng=np.random.default_rng([self.config.seed, 1, seq]),
                                  settings=AcquisitionSettings.from_policy(self.config.policy), calibration_z2=z2)

    def _calibrated(self, sigma: np.ndarray) -> np.ndarray:
        """Per-atom σ as the acquisition sees it: s·σ with ``calibration.scale``."""
        return sigma * self.scale if self.config.calibration.scale else sigma

    def _frame_scores(self) -> dict[int, float]:
        """seq -> the acquisition's frame score of each queued frame (larger: labelled first), kept in
        memory; set when a frame is queued and after every model update, from the stored σ after a resume."""
        scores = self.__dict__.get("_frame_score_of")
        if scores is None:
            scores = self._frame_score_of = {}
        return scores

    def _frame_score(self, seq: int, sigma: np.ndarray | None = None) -> float:
        """Frame score of queued frame ``seq``: cached, or computed from ``sigma`` (per-atom σ, eV/Å;
        default the σ stored with the frame) under the current model."""
        scores = self._frame_scores()
        if sigma is None and seq in scores:
            return scores[seq]
        entry = self.queued[seq]
        if sigma is None:
            sigma = entry.atom_std if entry.atom_std is not None else per_atom_sigma(entry.force_std)
        cand = Candidate(entry.atoms(), self._calibrated(np.asarray(sigma)))
        score = self.acquisition.select(cand, self._acquisition_context(
            seq, self.state.oracle_calls + len(self.in_flight))).frame_score
        scores[seq] = score
        return score

    def _enqueue(self, w: _Walker, ws: WalkerState, stop: sampler_pb2.StopReport) -> None:
        """Park the walker at its uncertain frame; queue the frame unless pending labels cover it."""
        st, rd = self.state, self.rd
        frame = stop.frame
        atoms = wire.structure_from_proto(frame.structure)
        n = len(atoms)
        std = np.array(wire.decode_array(frame.prediction.force_std, "force_std", (n, 3)))
        sigma = atom_sigma(frame.prediction, n)
        forces = np.array(wire.decode_array(frame.prediction.forces, "forces", (n, 3)))
        seq = st.next_seq
        st.next_seq += 1
        entry = QueuedFrame(seq=seq, walker=w.name, step=int(frame.step), time_fs=frame.time_fs,
                            temperature_K=frame.temperature_k, positions=atoms.positions, numbers=atoms.numbers,
                            cell=atoms.cell.array, pbc=atoms.pbc, force_std=std, predicted_forces=forces,
                            selection=[], checkpoint=stop.checkpoint,
                            model_version=int(frame.prediction.model_version), max_sigma=float(stop.max_sigma),
                            threshold=float(stop.threshold), atom_std=sigma)
        entry.noise = float(frame.prediction.noise_std)  # σn of the predicting model: calibration at the call
        who = f"[{w.name}] " if self.multi else ""
        covered = self._covered_by_pending(entry)
        if covered is None:
            # the acquisition picks the atoms (only for a frame that is sent: its rules may ask the learner)
            chosen = self.acquisition.select(Candidate(atoms, self._calibrated(sigma)),
                                             self._acquisition_context(seq, st.oracle_calls + len(self.in_flight)
                                                                       + len(self.queued)))
            entry.selection = selection = [int(i) for i in chosen.atoms]
            self._frame_scores()[seq] = chosen.frame_score
        if covered is not None:
            ws.waiting_update = True
            st.set_walker(w.name, ws)
            st.count("deduplicated")
            self._save()
            rd.event("frame_deduplicated", walker=w.name, step=entry.step, seq=seq, max_sigma=entry.max_sigma,
                     conditioned_max_sigma=covered, threshold=self.threshold,
                     pending=sorted(set(self.queued) | set(self.in_flight)))
            self.progress.line(f"  {who}σ = {entry.max_sigma:.4f} eV/Å at step {entry.step}, but only "
                               f"{covered:.4f} eV/Å once the labels in flight are learnt: not sent, waiting for them")
            if self.metrics is not None:
                self.metrics.skipped_frame("deduplicated")
            return
        rd.write_queue_entry(entry)
        ws.parked = seq
        st.set_walker(w.name, ws)
        self.queued[seq] = entry
        self._save()
        rd.event("frame_queued", walker=w.name, seq=seq, step=entry.step, time_fs=entry.time_fs,
                 max_sigma=entry.max_sigma, threshold=entry.threshold, selection=selection,
                 acquisition=chosen.rule, selection_order=[int(i) for i in chosen.order],
                 selection_scores=[float(x) if np.isfinite(x) else None for x in chosen.scores],
                 frame_score=chosen.frame_score if np.isfinite(chosen.frame_score) else None,
                 uncertain_atoms=sorted({u.atom for u in stop.uncertain}), model_version=entry.model_version)
        self.progress.line(f"  {who}σ = {entry.max_sigma:.4f} eV/Å > threshold {entry.threshold:.4f} eV/Å at step "
                           f"{entry.step} ({len({u.atom for u in stop.uncertain})} atom(s)): queued for the oracle "
                           f"({len(self.queued)} queued, {len(self.in_flight)} in flight)")
        self._queue_gauges()

    def _covered_by_pending(self, entry: QueuedFrame) -> float | None:
        """The frame's largest σ conditioned on the pending labels' environments, if below the threshold.

        Deduplication by the learner's own uncertainty, not a descriptor distance: the GP variance
        does not depend on the labels, so σ after learning the queued/in-flight frames is known
        before their labels arrive, in the metric that decides oracle calls — no extra tolerance
        to tune, and two frames that differ in atoms the model already knows are not merged.
        """
        if not self.config.policy.dedupe:
            return None
        pending = list(self.in_flight.values()) + list(self.queued.values())
        if not pending:
            return None
        pred = self.learner.predict(entry.atoms(), condition_on=[(p.atoms(), p.selection) for p in pending])
        sigma = float(np.max(atom_sigma(pred, len(entry.numbers)), initial=0.0))
        return sigma if sigma < self.threshold else None

    def _dispatch(self) -> None:
        """Send the most uncertain queued frames to the oracle, up to ``max_in_flight`` at once."""
        if self.stopping:
            return
        budget = self.config.stop.max_labels
        while self.queued and len(self.in_flight) < self.max_in_flight:
            if budget and self.state.oracle_calls + len(self.in_flight) >= budget:
                break
            # the most informative first, by the acquisition's frame score (max_sigma: σ/threshold)
            seq = max(self.queued, key=lambda s: (self._frame_score(s), -s))
            self._frame_scores().pop(seq, None)
            self.in_flight[seq] = self.queued.pop(seq)
            self._save()
            self._send(seq)
        self._queue_gauges()

    def _send(self, seq: int) -> None:
        entry = self.in_flight.get(seq)
        if entry is None:
            return
        self.rd.event("label_requested", seq=seq, walker=entry.walker, in_flight=len(self.in_flight),
                      queued=len(self.queued))
        self._oracle_pool.submit(self._label_job, seq, entry.atoms())

    def _label_job(self, seq: int, atoms: Atoms) -> None:
        """Label thread: one oracle call (the pool fails over between workers)."""
        started = time.perf_counter()
        try:
            result = self.oracle.label(atoms, self._properties())
            self.events.put(("label", seq, result, time.perf_counter() - started, None))
        except Exception as exc:  # noqa: BLE001 - judged by the loop
            self.events.put(("label", seq, None, time.perf_counter() - started, exc))

    def _on_label(self, seq: int, result, seconds: float, exc) -> StoredLabel | None:
        """A label arrived: write it (arrival order = label index) before anything uses it."""
        st, rd = self.state, self.rd
        entry = self.in_flight.get(seq)
        if entry is None:
            return None
        if exc is not None:
            if self.metrics is not None:
                self.metrics.oracle_latency(seconds, ok=False)
            self._label_failed(seq, entry, exc)
            return None
        if self.metrics is not None:
            self.metrics.oracle_latency(seconds)
        self.failures.pop(seq, None)
        index = st.oracle_calls
        label = self._entry_label(index, entry, result, seconds)
        self._record_label(label, rd.write_label(label))  # durable before it is used
        del self.in_flight[seq]
        self._save()
        rd.archive_queue_entry(seq)
        err = np.abs(entry.predicted_forces - label.forces)
        rd.event("oracle_call", label=index, seq=seq, walker=entry.walker, step=label.step, time_fs=label.time_fs,
                 temperature_K=entry.temperature_K, seconds=seconds, energy=label.energy,
                 max_sigma=entry.max_sigma, threshold=entry.threshold, worker=result.worker,
                 selection=entry.selection, max_force_error=float(err.max()),
                 rmse_force_error=float(np.sqrt(np.mean(err ** 2))), model_version=entry.model_version)
        if self.metrics is not None:
            self.metrics.oracle_call(entry.walker, label.time_fs)
        self._queue_gauges()
        self._calibrate(label)
        return label

    def _calibrate(self, label: StoredLabel, log_event: bool = True) -> None:
        """Every oracle call is a calibration point: the old model's forces and σ at the frame against the
        oracle's forces (coordinator/calibration.py).  With ``calibration.scale`` the threshold follows."""
        if label.predicted_forces is None or label.force_std is None:
            return
        noise = label.noise if label.noise is not None else self.noise
        self.calibration.add(label.predicted_forces, label.forces, label.force_std, noise)
        if not log_event:
            return
        out = self.calibration.summary()
        self.scale = out["scale"]
        self.rd.event("calibration", label=label.index, labels=out["labels"], scale=out["scale"],
                      applied=self.config.calibration.scale, raw=out["raw"], scaled=out["scaled"],
                      levels=out["levels"])
        if self.metrics is not None:
            self.metrics.calibration(out)
        if self.config.calibration.scale:
            self._apply_threshold()

    def _first_frame_label(self, atoms: Atoms, result, seconds: float) -> StoredLabel:
        """Label 0: walker 0's starting structure, trained on ``policy.initial_atoms``."""
        spec = self.specs[0]
        return StoredLabel(index=0, step=0, time_fs=0.0, positions=atoms.positions, numbers=atoms.numbers,
                           cell=atoms.cell.array, pbc=atoms.pbc, energy=result.labels.energy,
                           forces=result.labels.forces, stress=result.labels.stress, force_std=None,
                           checkpoint=b"", structure_hash=result.structure_hash, oracle_seconds=seconds,
                           worker=result.worker, walker=spec.name, queue_seq=-1,
                           selection=initial_atoms(self.config, len(atoms)), temperature_K=spec.sampler.temperature_K)

    @staticmethod
    def _entry_label(index: int, entry: QueuedFrame, result, seconds: float) -> StoredLabel:
        """Label ``index``: the oracle's answer for queue entry ``entry``, with everything the entry held."""
        return StoredLabel(index=index, step=entry.step, time_fs=entry.time_fs, positions=entry.positions,
                           numbers=entry.numbers, cell=entry.cell, pbc=entry.pbc, energy=result.labels.energy,
                           forces=result.labels.forces, stress=result.labels.stress, force_std=entry.force_std,
                           atom_std=entry.atom_std,
                           checkpoint=entry.checkpoint, structure_hash=result.structure_hash,
                           oracle_seconds=seconds, worker=result.worker, walker=entry.walker, queue_seq=entry.seq,
                           selection=entry.selection, predicted_forces=entry.predicted_forces,
                           model_version=entry.model_version, temperature_K=entry.temperature_K,
                           noise=entry.noise)

    def _record_label(self, label: StoredLabel, sha256: str) -> None:
        st = self.state
        assert label.index == st.oracle_calls == len(st.label_sha256), (label.index, st.oracle_calls)
        st.oracle_calls = label.index + 1
        st.label_sha256.append(sha256)
        st.label_seqs.append(label.queue_seq)

    def _label_failed(self, seq: int, entry: QueuedFrame, exc: Exception) -> None:
        """An outage is retried with backoff up to ``oracle.outage_timeout_s``; a frame that cannot be
        labelled stops the run unless the user opted in to ``oracle.on_failure: skip``."""
        o = self.config.oracle
        first, attempts = self.failures.get(seq, (time.monotonic(), 0))
        attempts += 1
        self.failures[seq] = (first, attempts)
        waited = time.monotonic() - first
        self.rd.event("oracle_failed", seq=seq, walker=entry.walker, step=entry.step, message=str(exc),
                      outage=isinstance(exc, OracleUnavailable), attempts=attempts, waited_s=waited)
        if isinstance(exc, OracleUnavailable) and waited < o.outage_timeout_s and not self.stopping:
            delay = min(60.0, 2.0 ** min(attempts, 6), max(0.0, o.outage_timeout_s - waited))
            self.progress.line(f"  no oracle worker could label frame {seq} ({exc}); retrying in {delay:.0f} s "
                               f"(outage for {waited:.0f} s of at most {o.outage_timeout_s:g} s)")
            timer = threading.Timer(delay, self.events.put, args=(("retry", seq),))
            timer.daemon = True
            timer.start()
            return
        if o.on_failure == "skip" and not isinstance(exc, OracleUnavailable):
            st = self.state
            del self.in_flight[seq]
            self.rd.remove_queue_entry(seq)
            ws = st.walker(entry.walker)
            ws.parked, ws.skip_gate = None, True
            st.set_walker(entry.walker, ws)
            st.count("skipped")
            self._save()
            self.rd.event("frame_skipped", seq=seq, walker=entry.walker, step=entry.step, message=str(exc))
            self.progress.line(f"  the oracle cannot label frame {seq} ({exc}); oracle.on_failure: skip — "
                               f"integrating that step on the model")
            if self.metrics is not None:
                self.metrics.skipped_frame("skipped")
            self._start_chunk(self.walkers[entry.walker])
            return
        what = (f"every oracle worker has been unreachable for {waited:.0f} s (oracle.outage_timeout_s = "
                f"{o.outage_timeout_s:g})" if isinstance(exc, OracleUnavailable) else
                f"the oracle could not label frame {seq} of walker {entry.walker}")
        raise RunStopped(f"{what}: {exc}. Every label computed so far is in {self.rd.path}; fix the oracle and "
                         f"continue with: epicycle run --resume {self.rd.path}"
                         + ("" if isinstance(exc, OracleUnavailable) else
                            " (or set oracle.on_failure: skip in its config.yaml to integrate such frames on the "
                            "model)"))

    # -- training updates ------------------------------------------------------------------

    def _item(self, label: StoredLabel) -> dict:
        selection = label.selection if label.selection is not None else initial_atoms(self.config, len(label.numbers))
        energy, stress = self._trained_labels()
        return {"atoms": label.atoms(), "forces": label.forces, "atom_indices": selection, "energy": label.energy,
                "stress": label.stress, "use_energy": energy and label.energy is not None,
                "use_stress": stress and label.stress is not None}

    def _trained_labels(self) -> tuple[bool, bool]:
        """``(energy, stress)`` the learner trains on (:func:`coordinator.config.trained_labels`; a
        sparse learner takes every force of a call, and the energy and stress as
        ``learner.sparse.labels`` says).  Computed once: a model file's kind is read from the file."""
        got = getattr(self, "_trained", None)
        if got is None:
            from coordinator.config import trained_labels

            got = self._trained = trained_labels(self.config.learner)
        return got

    def _optimize_on_schedule(self, before: int, after: int, log_event: bool = True, label=None):
        """Re-optimise once if the schedule (every N-th label, up to until_calls) falls in (before, after]."""
        opt = self.config.learner.optimize
        if not opt.every or not any(k % opt.every == 0 and k <= opt.until_calls for k in range(before + 1, after + 1)):
            return None
        bounds = {k: tuple(v) for k, v in opt.bounds.items()}
        if opt.method == "map":  # prior, restarts, held-out check on the learner's own frames
            result = self.learner.optimize(max_iterations=opt.max_iterations, bounds=bounds, method="map",
                                           restarts=opt.restarts, holdout=opt.holdout, seed=self.config.seed)
        else:
            result = self.learner.optimize(max_iterations=opt.max_iterations, bounds=bounds, space=opt.space)
        if log_event:
            hyps = {h.name: h.value for h in result.hyperparameters}
            self.rd.event("optimize", label=label.index, step=label.step, time_fs=label.time_fs,
                          walker=label.walker, hyperparameters=hyps, log_likelihood=result.log_likelihood,
                          iterations=result.iterations, converged=result.converged, message=result.message,
                          seconds=result.seconds, at_bounds=list(result.at_bounds))
            if result.at_bounds:
                self.progress.line(f"  hyperparameter(s) {', '.join(result.at_bounds)} ended on a bound of their "
                                   f"box: the box decided them, not the data (learner.optimize.bounds)")
            if not result.converged:
                self.progress.line(f"  hyperparameter optimisation stopped after {result.iterations} iterations "
                                   f"without converging: {result.message}")
        return result

    def _apply(self, labels: list[StoredLabel]) -> None:
        """One AddDataBatch for the labels that arrived together; optimise on schedule; the learner
        checkpoints itself; parked walkers go on; queued frames the new model knows are dropped."""
        st, rd = self.state, self.rd
        started = time.perf_counter()
        labels = sorted(labels, key=lambda lab: lab.index)
        assert labels[0].index == st.labels_applied, (labels[0].index, st.labels_applied)
        items = [self._item(lab) for lab in labels]
        reply = self.learner.add_data_batch(items)
        before = st.labels_applied
        for lab, item in zip(labels, items):
            rd.event("training_update", label=lab.index, walker=lab.walker, step=lab.step, time_fs=lab.time_fs,
                     atoms=list(item["atom_indices"]), n_environments=reply.n_environments,
                     model_version=reply.model_version, batch=[x.index for x in labels])
        self._optimize_on_schedule(before, before + len(labels), label=labels[-1])
        ck = self.learner.checkpoint()
        st.labels_applied = before + len(labels)
        st.learner_checkpoint = ck.checkpoint_id
        st.apply_batches.append([lab.index for lab in labels])
        st.training_atoms.extend([list(item["atom_indices"]) for item in items])
        self._refresh_model_info()
        decision = self.update_policy.decide(UpdateContext(
            oracle_calls=st.labels_applied, step=labels[-1].step,
            max_sigma_before=max((float(_label_sigma(lab).max(initial=0.0)) for lab in labels
                                  if lab.force_std is not None or lab.atom_std is not None), default=0.0),
            threshold=self.threshold, n_environments=self.n_environments))
        rd.event("update_decision", label=labels[-1].index, labels=[lab.index for lab in labels],
                 accept=decision.accept, reason=decision.reason, threshold=self.threshold, noise=self.noise,
                 learner_checkpoint=ck.checkpoint_id, checkpoint_bytes=ck.bytes_written,
                 checkpoint_seconds=ck.seconds)
        resume: list[str] = []
        for lab in labels:
            if lab.queue_seq < 0:
                continue
            for name in self.walkers:
                ws = st.walker(name)
                if ws.parked == lab.queue_seq:
                    # the stopped step is integrated with this label's forces when the walker goes on
                    ws.parked = None
                    ws.pending_override = lab.index
                    ws.md_checkpoint = f"label:{lab.index}"
                    st.set_walker(name, ws)
                    resume.append(name)
        for name in self.walkers:
            ws = st.walker(name)
            if ws.waiting_update:
                ws.waiting_update = False
                st.set_walker(name, ws)
                resume.append(name)
        self._save()
        if self.metrics is not None:
            self.metrics.model_update(time.perf_counter() - started)
            self.metrics.update(decision)
        for name in resume:
            if not self.walkers[name].running:
                self._start_chunk(self.walkers[name])
        self._drop_known()

    def _drop_known(self) -> None:
        """Queued frames (not yet sent) that the newest model, conditioned on the labels in flight,
        no longer finds uncertain are dropped; their walkers redo the stopped step on the new model."""
        if not self.queued or self.stopping:
            return
        cond = [(p.atoms(), p.selection) for p in self.in_flight.values()]
        for seq in sorted(self.queued):
            entry = self.queued[seq]
            pred = self.learner.predict(entry.atoms(), condition_on=cond)
            sigma = float(np.max(atom_sigma(pred, len(entry.numbers)), initial=0.0))
            if sigma >= self.threshold:
                # still uncertain: rank it again under the new model
                self._frame_score(seq, per_atom_sigma(pred.force_std, getattr(pred, "atom_std", None)))
                continue
            del self.queued[seq]
            self._frame_scores().pop(seq, None)
            st = self.state
            ws = st.walker(entry.walker)
            ws.parked = None
            st.set_walker(entry.walker, ws)
            st.count("dropped")
            self._save()
            self.rd.remove_queue_entry(seq)
            self.rd.event("frame_dropped", seq=seq, walker=entry.walker, step=entry.step, max_sigma=entry.max_sigma,
                          new_max_sigma=sigma, threshold=self.threshold)
            if self.metrics is not None:
                self.metrics.skipped_frame("dropped")
            self._start_chunk(self.walkers[entry.walker])
        self._queue_gauges()
