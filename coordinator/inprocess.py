"""In-process implementations of the cycle's ports (:mod:`coordinator.ports`): no servers, no sockets.

* :class:`InProcessLearner` — the learner service's own :class:`~learner_service.servicer.ModelStore`
  and :class:`~learner_service.servicer.LearnerServicer`, called directly with the same request
  messages the gRPC client sends: the same validation, the same replies (``ModelInfo``,
  ``AddDataResponse``, ``CheckpointResponse``, a prediction with ``.forces``/``.force_std``),
  checkpoints in a real model directory (so a run resumes as with the embedded learner).  It
  also remembers every model version it served (:attr:`InProcessLearner.history`), so a test can
  ask what the model of the time predicted.
* :class:`InProcessOracle` — an ASE calculator (EMT by default) behind ``OraclePool.label``'s
  result shape.
* :class:`ReplaySampler` — replays a recorded trajectory instead of integrating one.

**What replay tests, and what it does not.**  The trajectory is fixed: frame ``k`` of the
recording is "MD step ``k``" whatever the model predicts, and the oracle's forces supplied for a
stopped step change nothing downstream.  So a replay tests the *decisions* of the cycle and its
policies — when to call the oracle (the uncertainty gate, ``min_steps_between_calls``, the
threshold rule), which atoms enter the training set, which queued frames are labelled first or
dropped, when to re-optimise, resume — on realistic configurations, deterministically and in
seconds.  It does not test dynamics: no energy conservation, no temperature control, no
blow-up after a bad update (those need a real engine, e.g. the embedded gRPC run).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from coordinator.ports import Ports
from learner_service.client import (LearnerClient, RemotePrediction, kernel_distances_from_proto,
                                    kernel_distances_request, optimize_request, prediction_from_proto)
from oracle_service.base import Labels
from oracle_service.client import LabelResult
from protos import wire
from protos.epicycle.v1 import learner_pb2, sampler_pb2
from protos.errors import InvalidInput

# --------------------------------------------------------------------------- learner


class InProcessLearner:
    """The learner without gRPC: ``LearnerServicer`` methods called with request messages.

    ``model_dir``: the model directory (checkpoints; a learner built on a directory that has
    checkpoints serves the latest one, as the service does).  ``history``: {model version:
    GaussianProcess} of every model served by this object (models are immutable once served;
    they share their arrays, so this costs little).
    """

    def __init__(self, species: Iterable[int], cutoffs: tuple[float, float] = (6.0, 4.0),
                 hyperparameters: Mapping[str, float] | None = None, model_dir: str | Path | None = None,
                 keep_checkpoints: int = 5, predict_threads: int | None = 1, model: Mapping | None = None) -> None:
        from learner_service.server import LearnerServiceConfig, build_store
        from learner_service.servicer import LearnerServicer

        kwargs = {} if hyperparameters is None else {"hyperparameters": dict(hyperparameters)}
        kwargs.update(model or {})
        cfg = LearnerServiceConfig(species=tuple(int(z) for z in species), cutoffs=tuple(cutoffs),
                                   model_dir=None if model_dir is None else Path(model_dir),
                                   keep_checkpoints=keep_checkpoints, predict_threads=predict_threads,
                                   warm_up=False, **kwargs)
        self.store = build_store(cfg)
        self.servicer = LearnerServicer(self.store, cfg.max_iterations, min_distance=cfg.min_distance,
                                        max_atoms=cfg.max_atoms)
        self.history: dict[int, object] = {}
        self._lock = threading.Lock()
        self._remember()

    @classmethod
    def for_run(cls, config, run_dir, **kwargs) -> "InProcessLearner":
        """The learner an embedded run would start: the run's species, ``learner.cutoffs``,
        ``learner.hyperparameters`` and ``learner.model`` (kind or model file), its model
        directory ``<run dir>/learner``."""
        from coordinator.cycle import run_species
        from coordinator.services import learner_model_settings

        le = config.learner
        kwargs.setdefault("model", learner_model_settings(le))
        return cls(run_species(config), tuple(le.cutoffs), dict(le.hyperparameters),
                   model_dir=Path(run_dir.path) / "learner", **kwargs)

    def _remember(self) -> None:
        gp, version = self.store.snapshot()
        with self._lock:
            self.history[version] = gp

    # -- LearnerPort ------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 0.0) -> None:
        return None

    def info(self) -> learner_pb2.ModelInfo:
        return self.servicer.GetModelInfo(learner_pb2.GetModelInfoRequest(), None)

    def predict(self, atoms: Atoms, stress: bool = False,
                condition_on: Iterable[tuple[Atoms, Iterable[int]]] = (), model_version: int = 0) -> RemotePrediction:
        req = learner_pb2.PredictRequest(compute_stress=stress, model_version=int(model_version))
        wire.structure_to_proto(atoms, out=req.structure, velocities=False)
        for c_atoms, c_idx in condition_on:
            c = req.condition_on.add(atom_indices=[int(i) for i in c_idx])
            wire.structure_to_proto(c_atoms, out=c.structure, velocities=False)
        reply = self.servicer.Predict(req, None)
        return prediction_from_proto(reply.prediction, len(atoms))

    def add_data_batch(self, items: Iterable[Mapping]) -> learner_pb2.AddDataResponse:
        req = learner_pb2.AddDataBatchRequest()
        for k, item in enumerate(items):
            unknown = set(item) - {"atoms", "forces", "atom_indices", "energy", "stress", "use_energy", "use_stress"}
            if unknown or "atoms" not in item:
                raise InvalidInput(f"add_data_batch item {k}: needs 'atoms'; unknown keys {sorted(unknown)}")
            req.items.append(LearnerClient.add_data_request(**item))
        reply = self.servicer.AddDataBatch(req, None)
        self._remember()
        return reply

    def optimize(self, max_iterations: int = 0, tolerance: float = 0.0,
                 bounds: Mapping[str, tuple[float, float]] | None = None,
                 fixed: Iterable[str] = (), space: str = "", method: str = "", restarts: int | None = None,
                 seed: int = 0, holdout: float | None = None) -> learner_pb2.OptimizeResponse:
        req = optimize_request(max_iterations, tolerance, bounds, fixed, space, method, restarts, seed, holdout)
        reply = self.servicer.Optimize(req, None)
        self._remember()
        return reply

    def checkpoint(self) -> learner_pb2.CheckpointResponse:
        return self.servicer.Checkpoint(learner_pb2.CheckpointRequest(), None)

    def kernel_distances(self, atoms: Atoms, atom_indices: Iterable[int] | None = None,
                         rows: Iterable[int] | None = None, train: bool = True):
        """``(d_train (m,), d_within (r, m))`` in eV, as :meth:`LearnerClient.kernel_distances`."""
        reply = self.servicer.KernelDistances(kernel_distances_request(atoms, atom_indices, rows, train), None)
        return kernel_distances_from_proto(reply, train)

    def hold_versions(self, versions: Iterable[int]) -> learner_pb2.HoldVersionsResponse:
        req = learner_pb2.HoldVersionsRequest(model_versions=sorted({int(v) for v in versions if int(v) > 0}))
        return self.servicer.HoldVersions(req, None)

    def restore_checkpoint(self, checkpoint_id: str) -> learner_pb2.ModelInfo:
        reply = self.servicer.RestoreCheckpoint(learner_pb2.RestoreCheckpointRequest(checkpoint_id=checkpoint_id),
                                                None)
        self._remember()
        return reply

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- oracle


class InProcessOracle:
    """An ASE calculator as the oracle (default: EMT).  ``calls``: structures labelled so far.
    Labels: energy eV, forces (n, 3) eV/Å, stress (6,) eV/Å³ (Voigt), as requested."""

    failovers = 0   # read by the coordinator's metrics, as OraclePool.failovers

    def __init__(self, calculator=None, name: str = "inprocess") -> None:
        if calculator is None:
            from ase.calculators.emt import EMT

            calculator = EMT()
        self.calculator = calculator
        self.name = name
        self.calls = 0
        self._lock = threading.Lock()

    def wait_ready(self, timeout: float = 0.0) -> None:
        return None

    def label(self, atoms: Atoms, properties: tuple[str, ...] = ()) -> LabelResult:
        from oracle_service.core import content_hash

        props = tuple(properties) or ("energy", "forces")
        a = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        started = time.perf_counter()
        with self._lock:  # one ASE calculator is not thread-safe
            a.calc = self.calculator
            labels = Labels(energy=a.get_potential_energy() if "energy" in props else None,
                            forces=a.get_forces() if "forces" in props else None,
                            stress=a.get_stress(voigt=True) if "stress" in props else None)
            self.calls += 1
        seconds = time.perf_counter() - started
        return LabelResult(labels=labels, backend=type(self.calculator).__name__,
                           structure_hash=content_hash(a, props, self.name), cached=False,
                           compute_seconds=seconds, worker=self.name, request_id=f"{self.name}-{self.calls}")


# --------------------------------------------------------------------------- sampler


def read_trajectory(source: str | Path | Sequence[Atoms]) -> list[Atoms]:
    """Frames to replay: a list of Atoms, a trajectory file ASE reads (every frame), or a run
    directory / walker directory (its ``trajectory.xyz``; a run directory must have one walker)."""
    if not isinstance(source, (str, Path)):
        frames = list(source)
    else:
        import ase.io

        path = Path(source)
        if path.is_dir():
            candidates = [path / "trajectory.xyz"] if (path / "trajectory.xyz").is_file() else \
                sorted(path.glob("walkers/*/trajectory.xyz"))
            if len(candidates) != 1:
                raise InvalidInput(f"replay: {path} has {len(candidates)} walker trajectories; name one "
                                   f"(walkers/<name>/trajectory.xyz)")
            path = candidates[0]
        if not path.is_file():
            raise InvalidInput(f"replay: trajectory not found: {path}")
        frames = ase.io.read(path, index=":")
    if not frames:
        raise InvalidInput("replay: the trajectory has no frames")
    numbers = frames[0].numbers
    for k, a in enumerate(frames):
        if not np.array_equal(a.numbers, numbers):
            raise InvalidInput(f"replay: frame {k} has other atoms than frame 0 (a trajectory of one system is needed)")
    return frames


@dataclass(frozen=True)
class _Position:
    """Where a replay stands: the checkpoint blob of the ReplaySampler (JSON)."""

    step: int
    settings: bytes        # serialised sampler_pb2.MDSettings the run started with

    FORMAT = "epicycle-replay/1"

    def encode(self) -> bytes:
        return json.dumps({"format": self.FORMAT, "step": self.step,
                           "settings": base64.b64encode(self.settings).decode()}).encode()

    @classmethod
    def decode(cls, blob: bytes) -> "_Position":
        try:
            d = json.loads(blob)
            if d.get("format") != cls.FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            return cls(step=int(d["step"]), settings=base64.b64decode(d["settings"]))
        except Exception as exc:  # noqa: BLE001 - anything else is not our checkpoint
            raise InvalidInput(f"replay: the checkpoint is not a replay position ({exc}); a replay resumes only "
                               f"from its own checkpoints") from None


class ReplaySampler:
    """A sampler that replays ``trajectory`` (see :func:`read_trajectory`), one recorded frame per step.

    Each Run call starts at the step in the request's checkpoint (0 for ``new_run``), asks
    ``learner`` for the prediction of each recorded frame and stops with
    ``STOP_REASON_UNCERTAIN`` as soon as a force σ exceeds ``control.sigma_threshold`` (eV/Å;
    ≤ 0: never), else after ``control.max_steps`` steps; frames are streamed every
    ``control.frame_interval`` steps.  ``override_forces`` (the oracle's labels of the stopped
    frame) "integrate" the current step ungated, as a real engine does; ``control.timestep_fs``
    is kept in the settings (and the next checkpoint) but cannot change the recorded frames.  The
    checkpoint is the replay position.  ``new_run.structure`` must have the recording's atoms (frame 0 is what is
    replayed; give the run ``structure.file: <the trajectory>`` so that the first label is
    frame 0).  Time: a frame's ``info["time_fs"]`` if recorded, else step · ``timestep_fs`` of
    the settings (fs).  Temperature from recorded velocities (K, 3N − 3 degrees of freedom).
    """

    def __init__(self, trajectory: str | Path | Sequence[Atoms], learner) -> None:
        self.frames = read_trajectory(trajectory)
        self.learner = learner
        self.calls = 0

    def wait_ready(self, timeout: float = 0.0) -> None:
        return None

    def open_run(self, request: sampler_pb2.RunRequest, timeout: float | None = None) -> "ReplayCall":
        which = request.WhichOneof("start")
        if which == "new_run":
            numbers = wire.structure_from_proto(request.new_run.structure).numbers
            if not np.array_equal(numbers, self.frames[0].numbers):
                raise InvalidInput("replay: new_run.structure has other atoms than the recorded trajectory")
            pos = _Position(0, request.new_run.settings.SerializeToString())
        elif which == "checkpoint":
            pos = _Position.decode(request.checkpoint)
        else:
            raise InvalidInput("replay: the request needs new_run or checkpoint")
        if not np.isfinite(request.control.sigma_threshold):
            raise InvalidInput(f"control.sigma_threshold must be finite, got {request.control.sigma_threshold}")
        self.calls += 1
        return ReplayCall(self, request, pos)

    def close(self) -> None:
        return None


class ReplayCall:
    """One Run call of a :class:`ReplaySampler` (iterate for ``RunResponse`` messages)."""

    def __init__(self, sampler: ReplaySampler, request: sampler_pb2.RunRequest, pos: _Position) -> None:
        self.sampler = sampler
        self.request = request
        self.pos = pos
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self):
        from sampler_service.engine_interface import Frame, Observables, StopReport, uncertainty_crossing
        from sampler_service.force_providers import ForceResult, per_atom_sigma
        from sampler_service.servicer import frame_to_proto, stop_to_proto

        s = self.sampler
        settings = sampler_pb2.MDSettings.FromString(self.pos.settings)
        if self.request.control.HasField("timestep_fs"):
            # a changed Δt (e.g. after a rollback) is recorded, but the recording's frames stay what they are
            if not self.request.control.timestep_fs > 0:
                raise InvalidInput(f"control.timestep_fs must be > 0 fs, got {self.request.control.timestep_fs}")
            settings.timestep_fs = self.request.control.timestep_fs
        dt = settings.timestep_fs if settings.HasField("timestep_fs") else 1.0
        ctl = self.request.control
        threshold = ctl.sigma_threshold if ctl.sigma_threshold > 0 else None
        max_steps, interval = int(ctl.max_steps), int(ctl.frame_interval)
        supplied = None
        if self.request.HasField("override_forces"):
            n = len(s.frames[0])
            energy, forces, stress = wire.labels_from_proto(self.request.override_forces, n, name="override_forces")
            supplied = (energy, np.array(forces), stress)
        step, taken, last = self.pos.step, 0, None
        started = time.perf_counter()

        def time_of(k: int) -> float:
            return float(s.frames[k].info.get("time_fs", k * dt)) if k < len(s.frames) else k * dt

        def frame(k: int, pred, forces, energy, from_oracle: bool, with_velocities: bool) -> Frame:
            a = s.frames[k]
            masses = a.get_masses()
            vel = a.get_velocities() * wire.A_FS_PER_ASE_VELOCITY if a.has("momenta") else None
            obs = None
            if vel is not None:
                from sampler_service import dynamics as dyn

                ke = dyn.kinetic_energy(masses, vel)
                pe = float(energy) if energy is not None else float("nan")
                obs = Observables(temperature_K=dyn.temperature(masses, vel, True), kinetic_eV=ke, potential_eV=pe,
                                  total_eV=ke + pe, heat_eV=0.0, conserved_eV=ke + pe, volume_A3=float(a.get_volume()))
            return Frame(step=k, time_fs=time_of(k), positions=a.positions, numbers=a.numbers, cell=a.cell.array,
                         pbc=a.pbc, masses=masses, velocities=vel if with_velocities else None, forces=forces,
                         energy=energy, stress=None, force_std=None if pred is None else pred.force_std,
                         atom_std=None if pred is None else getattr(pred, "atom_std", None),
                         noise=None if pred is None else pred.noise,
                         model_version=-1 if pred is None else pred.model_version, forces_supplied=from_oracle,
                         observables=obs if with_velocities else None)

        def stop(report: StopReport, at: int) -> sampler_pb2.RunResponse:
            reply = sampler_pb2.RunResponse()
            rate = taken / max(time.perf_counter() - started, 1e-9)
            stop_to_proto(report, _Position(at, settings.SerializeToString()).encode(), None, rate, reply.stop)
            reply.stop.settings.CopyFrom(settings)
            if at < len(s.frames):
                wire.structure_to_proto(s.frames[at], out=reply.stop.state)
            return reply

        while taken < max_steps:
            if self.cancelled:
                return
            if step >= len(s.frames):
                raise InvalidInput(f"replay: step {step} was asked for, but the recording has {len(s.frames)} frames "
                                   f"(steps 0..{len(s.frames) - 1}); run fewer steps (sampler.steps)")
            if supplied is not None:
                energy, forces, _ = supplied
                supplied, pred, from_oracle = None, None, True
            else:
                pred = s.learner.predict(s.frames[step], model_version=int(ctl.model_version))
                energy, forces, from_oracle = pred.energy, pred.forces, False
                crossing = uncertainty_crossing(
                    ForceResult(energy=energy, forces=forces, force_std=pred.force_std,
                                atom_std=getattr(pred, "atom_std", None)), threshold)
                if crossing is not None:  # the same rule as the sampler's engines (per-atom σ)
                    comps, over_std = crossing
                    per_atom = per_atom_sigma(getattr(pred, "atom_std", None), pred.force_std)
                    report = StopReport(reason="uncertain", step=step, time_fs=time_of(step), steps_taken=taken,
                                        frame=frame(step, pred, forces, energy, False, False), threshold=threshold,
                                        max_std=float(per_atom.max()), uncertain_atoms=np.unique(comps[:, 0]),
                                        uncertain_components=comps, uncertain_std=over_std)
                    yield stop(report, step)
                    return
            want = interval > 0 and step % interval == 0
            last = frame(step, pred, forces, energy, from_oracle, True)
            if want:
                reply = sampler_pb2.RunResponse()
                frame_to_proto(last, reply.frame)
                yield reply
            step += 1
            taken += 1
        report = StopReport(reason="max_steps", step=step, time_fs=time_of(step), steps_taken=taken, frame=last,
                            threshold=threshold)
        yield stop(report, step)


def replay_ports(config, run_dir, trajectories, oracle: InProcessOracle | None = None,
                 learner: InProcessLearner | None = None) -> Ports:
    """In-process ports for ``config`` in ``run_dir``: an :class:`InProcessLearner` on the run's
    model directory, ``oracle`` (default EMT) and one :class:`ReplaySampler` per trajectory.
    ``trajectories``: one trajectory (a path or a list of Atoms; every walker replays it) or a
    list of them (walker ``i`` replays ``trajectories[i % len(trajectories)]``)."""
    if isinstance(trajectories, (str, Path)) or (isinstance(trajectories, Sequence) and trajectories
                                                 and isinstance(trajectories[0], Atoms)):
        trajectories = [trajectories]
    walkers = len(config.walker_list())
    if not trajectories or len(trajectories) > walkers:
        raise InvalidInput(f"replay: {len(trajectories)} trajectories for {walkers} walker(s); give one per walker "
                           f"(or one for all)")
    learner = learner or InProcessLearner.for_run(config, run_dir)
    samplers = [ReplaySampler(t, learner) for t in trajectories]
    return Ports(learner=learner, samplers=samplers, oracle=oracle or InProcessOracle(), learner_address="",
                 oracle_workers=1, describe={"learner": "in-process", "samplers": ["replay"] * len(samplers)})
