"""gRPC adapter for the Sampler service: proto <-> engine, frames streamed as they happen."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np

from protos import wire
from protos.epicycle.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc
from protos.errors import CalculationFailed, InvalidInput, SetupError
from sampler_service.engine import Frame, StopReport
from sampler_service.forces import ForceResult
from sampler_service.settings import ENGINES, ENSEMBLES, SamplerSettings

#: provider_factory(learner_address, want_stress) -> ForceProvider (with optional close())
ProviderFactory = Callable[[str, bool], object]


def settings_from_proto(msg: sampler_pb2.MDSettings) -> SamplerSettings:
    kwargs: dict = {}
    if msg.engine:
        kwargs["engine"] = msg.engine
    if msg.ensemble:
        kwargs["ensemble"] = msg.ensemble
    for field, key in (("timestep_fs", "timestep_fs"), ("temperature_k", "temperature_K"),
                       ("friction_per_fs", "friction"), ("taut_fs", "taut_fs"), ("pressure_gpa", "pressure_GPa"),
                       ("taup_fs", "taup_fs"), ("compressibility_per_gpa", "compressibility"),
                       ("initial_temperature_k", "initial_temperature_K"), ("wrap_positions", "wrap")):
        if msg.HasField(field):
            kwargs[key] = getattr(msg, field)
    kwargs["seed"] = int(msg.seed)
    if msg.schedule:
        kwargs["schedule"] = tuple((e.time_fs, e.temperature_k) for e in msg.schedule)
    return SamplerSettings(**kwargs)


def settings_to_proto(s: SamplerSettings) -> sampler_pb2.MDSettings:
    msg = sampler_pb2.MDSettings(engine=s.engine, ensemble=s.ensemble, timestep_fs=s.timestep_fs,
                                 temperature_k=s.temperature_K, friction_per_fs=s.friction, taut_fs=s.taut_fs,
                                 pressure_gpa=s.pressure_GPa, taup_fs=s.taup_fs,
                                 compressibility_per_gpa=s.compressibility, seed=s.seed, wrap_positions=s.wrap)
    if s.initial_temperature_K is not None:
        msg.initial_temperature_k = s.initial_temperature_K
    for t, temp in s.schedule:
        msg.schedule.add(time_fs=t, temperature_k=temp)
    return msg


def frame_to_proto(frame: Frame, out: sampler_pb2.Frame) -> sampler_pb2.Frame:
    out.step = int(frame.step)
    out.time_fs = float(frame.time_fs)
    s = out.structure
    wire.encode_array(frame.positions, "<f8", s.positions)
    wire.encode_array(frame.numbers, "<i4", s.numbers)
    wire.encode_array(frame.cell, "<f8", s.cell)
    s.pbc[:] = [bool(p) for p in frame.pbc]
    wire.encode_array(frame.masses, "<f8", s.masses)
    if frame.velocities is not None:
        wire.encode_array(frame.velocities, "<f8", s.velocities)  # Å/fs
    p = out.prediction
    wire.encode_array(frame.forces, "<f8", p.forces)
    if frame.force_std is not None:
        wire.encode_array(frame.force_std, "<f8", p.force_std)
    if frame.energy is not None:
        p.energy = float(frame.energy)
    if frame.stress is not None:
        wire.encode_array(frame.stress, "<f8", p.stress)
    p.noise_std = float(frame.noise or 0.0)
    p.model_version = max(int(frame.model_version), 0)
    obs = frame.observables
    if obs is not None:
        out.temperature_k = obs.temperature_K
        out.kinetic_energy = obs.kinetic_eV
        out.potential_energy = obs.potential_eV
        out.conserved_energy = obs.conserved_eV if obs.conserved_eV is not None else float("nan")
    out.forces_from_override = bool(frame.forces_supplied)
    return out


def stop_to_proto(report: StopReport, checkpoint: bytes, drift: float | None, steps_per_second: float,
                  out: sampler_pb2.StopReport) -> sampler_pb2.StopReport:
    out.reason = (sampler_pb2.STOP_REASON_UNCERTAIN if report.uncertain else sampler_pb2.STOP_REASON_MAX_STEPS)
    if report.frame is not None:
        frame_to_proto(report.frame, out.frame)
    for (atom, comp), sigma in zip(report.uncertain_components, report.uncertain_std):
        out.uncertain.add(atom=int(atom), component=int(comp), sigma=float(sigma))
    out.max_sigma = float(report.max_std) if report.max_std is not None else 0.0
    out.threshold = float(report.threshold) if report.threshold is not None else 0.0
    out.checkpoint = checkpoint
    out.energy_drift_ev_per_atom_ps = float(drift) if drift is not None else float("nan")
    out.steps_per_second = steps_per_second
    out.step = int(report.step)
    out.time_fs = float(report.time_fs)
    out.steps_taken = int(report.steps_taken)
    return out


class _Cancelled(Exception):
    pass


class _GuardedProvider:
    """Stops the engine between steps when the client has gone away."""

    def __init__(self, provider, is_active: Callable[[], bool]) -> None:
        self.provider = provider
        self.is_active = is_active

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        if not self.is_active():
            raise _Cancelled()
        return self.provider.compute(positions, cell, numbers, pbc)


class SamplerServicer(sampler_pb2_grpc.SamplerServicer):
    def __init__(self, provider_factory: ProviderFactory, default_learner: str = "",
                 engines: tuple[str, ...] = ENGINES) -> None:
        self.provider_factory = provider_factory
        self.default_learner = default_learner
        self.engines = engines
        self.steps_total = 0
        self.last_temperature_k = float("nan")
        self.last_drift = float("nan")
        self.last_steps_per_second = 0.0

    def Describe(self, request, context):
        return sampler_pb2.SamplerDescribeResponse(engines=list(self.engines), ensembles=list(ENSEMBLES),
                                                   default_learner=self.default_learner)

    def Run(self, request: sampler_pb2.RunRequest, context) -> Iterator[sampler_pb2.RunResponse]:
        from sampler_service.engines import create_engine, engine_from_checkpoint

        control = request.control
        threshold = control.sigma_threshold if control.sigma_threshold > 0 else None
        max_steps = int(control.max_steps)
        frame_interval = int(control.frame_interval)
        if not (np.isfinite(control.sigma_threshold)):
            raise InvalidInput(f"control.sigma_threshold must be finite, got {control.sigma_threshold}")
        learner = request.learner_address or self.default_learner
        start = request.WhichOneof("start")
        if start is None:
            raise InvalidInput("RunRequest needs new_run (structure + settings) or a checkpoint")
        if start == "new_run":
            settings = settings_from_proto(request.new_run.settings)
            if settings.engine not in self.engines:
                raise InvalidInput(f"engine {settings.engine!r} is not available on this sampler; "
                                   f"available: {', '.join(self.engines)}")
            atoms = wire.structure_from_proto(request.new_run.structure, "new_run.structure")
        if not learner:
            raise InvalidInput("no learner address: set RunRequest.learner_address (this sampler has no default)")
        want_stress = start == "new_run" and settings.ensemble.startswith("npt")
        provider = self.provider_factory(learner, want_stress)
        guarded = _GuardedProvider(provider, context.is_active)
        try:
            if start == "new_run":
                engine = create_engine(settings, guarded, atoms)
            else:
                if not request.checkpoint:
                    raise InvalidInput("checkpoint is empty")
                engine = engine_from_checkpoint(request.checkpoint, guarded)
                if engine.settings.ensemble.startswith("npt") and hasattr(provider, "want_stress"):
                    provider.want_stress = True
            if request.HasField("override_forces"):
                energy, forces, stress = wire.labels_from_proto(request.override_forces, engine.n_atoms,
                                                                "override_forces")
                if forces is None:
                    raise InvalidInput("override_forces.forces is required")
                wire.check_finite("override_forces.forces", forces)
                engine.supply_forces(ForceResult(energy=energy, forces=forces, stress=stress))
            yield from self._run(engine, max_steps, threshold, frame_interval, context)
        finally:
            close = getattr(provider, "close", None)
            if close is not None:
                close()

    def _run(self, engine, max_steps, threshold, frame_interval, context):
        frames: queue.Queue = queue.Queue(maxsize=64)
        outcome: dict = {}

        def on_frame(frame: Frame) -> None:
            while True:
                try:
                    frames.put(frame, timeout=0.5)
                    return
                except queue.Full:
                    if not context.is_active():
                        raise _Cancelled()

        def work() -> None:
            started = time.perf_counter()
            try:
                outcome["report"] = engine.run(max_steps, threshold=threshold, frame_interval=frame_interval,
                                               on_frame=on_frame if frame_interval else None)
                outcome["checkpoint"] = engine.checkpoint()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the RPC thread
                outcome["error"] = exc
            finally:
                outcome["seconds"] = time.perf_counter() - started
                frames.put(None)

        thread = threading.Thread(target=work, name="md-run", daemon=True)
        thread.start()
        while True:
            frame = frames.get()
            if frame is None:
                break
            reply = sampler_pb2.RunResponse()
            frame_to_proto(frame, reply.frame)
            yield reply
        thread.join()
        if "error" in outcome:
            exc = outcome["error"]
            if isinstance(exc, _Cancelled):
                return
            raise exc
        report: StopReport = outcome["report"]
        steps_per_second = report.steps_taken / outcome["seconds"] if outcome["seconds"] > 0 else 0.0
        drift = engine.energy_drift()
        self.steps_total += report.steps_taken
        self.last_steps_per_second = steps_per_second
        if report.frame is not None and report.frame.observables is not None:
            self.last_temperature_k = report.frame.observables.temperature_K
        self.last_drift = drift if drift is not None else float("nan")
        reply = sampler_pb2.RunResponse()
        stop_to_proto(report, outcome["checkpoint"], drift, steps_per_second, reply.stop)
        yield reply
