"""gRPC adapter for the Sampler service: proto <-> engine, frames streamed as they happen."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np

from protos import wire
from protos.epicycle.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc
from protos.errors import InvalidInput
from protos.structures import StructureLimits, check_structure
from sampler_service.engine_interface import Frame, StopReport
from sampler_service.force_providers import ForceResult
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
    if frame.atom_std is not None:
        wire.encode_array(frame.atom_std, "<f8", p.atom_std)
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


def state_to_proto(state: "EngineState", out: common_pb2.Structure) -> common_pb2.Structure:
    wire.encode_array(state.positions, "<f8", out.positions)
    wire.encode_array(state.numbers, "<i4", out.numbers)
    wire.encode_array(state.cell, "<f8", out.cell)
    out.pbc[:] = [bool(p) for p in state.pbc]
    wire.encode_array(state.masses, "<f8", out.masses)
    wire.encode_array(state.velocities, "<f8", out.velocities)  # Å/fs
    return out


class EngineState:
    """What an engine is at the end of a call (where its checkpoint resumes); read on the MD thread."""

    def __init__(self, engine) -> None:
        self.positions = engine.positions()
        self.velocities = engine.velocities()
        self.cell = engine.cell()
        self.numbers = engine.numbers
        self.masses = engine.masses
        self.pbc = engine.pbc
        self.images = engine.images
        self.settings = engine.settings


def stop_to_proto(report: StopReport, checkpoint: bytes, drift: float | None, steps_per_second: float,
                  out: sampler_pb2.StopReport, state: EngineState | None = None) -> sampler_pb2.StopReport:
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
    if state is not None:
        state_to_proto(state, out.state)
        wire.encode_array(state.images, "<i8", out.images)
        out.settings.CopyFrom(settings_to_proto(state.settings))
    return out


class _ClientGone(Exception):
    """The client cancelled or disconnected while a frame was waiting to be sent."""


class SamplerServicer(sampler_pb2_grpc.SamplerServicer):
    def __init__(self, provider_factory: ProviderFactory, default_learner: str = "",
                 engines: tuple[str, ...] = ENGINES,
                 structure_limits: StructureLimits = StructureLimits()) -> None:
        self.provider_factory = provider_factory
        #: a new run's structure is checked with these (min distance, atom limit), the shared
        #: rules of :func:`protos.structures.check_structure`
        self.structure_limits = structure_limits
        self.default_learner = default_learner
        self.engines = engines
        self._lock = threading.Lock()
        self._steps_finished = 0  # steps of Run calls that have ended
        self._running: dict[int, tuple[object, int]] = {}  # id -> (engine, its step when the call began)
        self.runs_cancelled_total = 0
        self.active_runs = 0
        self.last_temperature_k = float("nan")
        self.last_drift = float("nan")
        self.last_steps_per_second = 0.0

    @property
    def steps_total(self) -> int:
        """MD steps integrated by all Run calls, those still running included (read live from their engines)."""
        with self._lock:
            return self._steps_finished + sum(max(0, e.step - start) for e, start in self._running.values())

    def Describe(self, request, context):
        return sampler_pb2.SamplerDescribeResponse(engines=list(self.engines), ensembles=list(ENSEMBLES),
                                                   default_learner=self.default_learner)

    def Run(self, request: sampler_pb2.RunRequest, context) -> Iterator[sampler_pb2.RunResponse]:
        from sampler_service.engine_registry import create_engine, engine_from_checkpoint

        control = request.control
        if not np.isfinite(control.sigma_threshold):
            raise InvalidInput(f"control.sigma_threshold must be finite, got {control.sigma_threshold}")
        threshold = control.sigma_threshold if control.sigma_threshold > 0 else None
        max_steps = int(control.max_steps)
        frame_interval = int(control.frame_interval)
        timestep = control.timestep_fs if control.HasField("timestep_fs") else None
        if timestep is not None and not (np.isfinite(timestep) and timestep > 0):
            raise InvalidInput(f"control.timestep_fs must be > 0 fs, got {timestep}")
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
            check_structure(atoms, self.structure_limits, "new_run.structure")
        elif not request.checkpoint:
            raise InvalidInput("checkpoint is empty")
        if not learner:
            raise InvalidInput("no learner address: set RunRequest.learner_address (this sampler has no default)")
        want_stress = start == "new_run" and settings.ensemble.startswith("npt")
        provider = self.provider_factory(learner, want_stress)
        if control.model_version:
            if not hasattr(provider, "model_version"):
                close = getattr(provider, "close", None)
                if close is not None:
                    close()
                raise InvalidInput(f"control.model_version = {control.model_version}: this sampler's force provider "
                                   f"cannot pin a model version (only a learner's PredictStream can)")
            provider.model_version = int(control.model_version)
        engine = None
        try:
            if start == "new_run":
                engine = create_engine(settings, provider, atoms)
            else:
                engine = engine_from_checkpoint(request.checkpoint, provider)
                if engine.settings.engine not in self.engines:
                    raise InvalidInput(f"checkpoint is from engine {engine.settings.engine!r}, which is not "
                                       f"available on this sampler; available: {', '.join(self.engines)}")
                if engine.settings.ensemble.startswith("npt") and hasattr(provider, "want_stress"):
                    provider.want_stress = True
            if control.replace_schedule:  # before a new Δt: events up to the last step's start are past
                engine.set_schedule(tuple((e.time_fs, e.temperature_k) for e in control.schedule))
            if timestep is not None:
                engine.set_timestep(timestep)
            if request.HasField("override_forces"):
                energy, forces, stress = wire.labels_from_proto(request.override_forces, engine.n_atoms,
                                                                "override_forces")
                if forces is None:
                    raise InvalidInput("override_forces.forces is required")
                wire.check_finite("override_forces.forces", forces)
                engine.supply_forces(ForceResult(energy=energy, forces=forces, stress=stress))
            # the client going away (cancel, deadline, disconnect) stops the engine before its next step
            if not context.add_callback(engine.request_stop):
                engine.request_stop()
            yield from self._run(engine, max_steps, threshold, frame_interval, context)
        finally:
            if engine is not None:
                engine.close()
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
                        raise _ClientGone()

        def work() -> None:
            started = time.perf_counter()
            try:
                report = engine.run(max_steps, threshold=threshold, frame_interval=frame_interval,
                                    on_frame=on_frame if frame_interval else None)
                outcome["report"] = report
                if report.reason != "cancelled":
                    outcome["checkpoint"] = engine.checkpoint()
                    outcome["state"] = EngineState(engine)
                    outcome["drift"] = engine.energy_drift()
                    outcome["observables"] = engine.observables()  # of the last integrated step
            except BaseException as exc:  # noqa: BLE001 - re-raised on the RPC thread
                outcome["error"] = exc
            finally:
                outcome["seconds"] = time.perf_counter() - started

        def work_then_end_stream() -> None:
            work()
            frames.put(None)

        with self._lock:
            self.active_runs += 1
            self._running[id(engine)] = (engine, engine.step)
        thread = None
        try:
            if not frame_interval:
                # nothing to stream while the engine runs: run it on this thread (no thread start,
                # no hand-off; the client going away still stops it through context's callback)
                work()
            else:
                thread = threading.Thread(target=work_then_end_stream, name="md-run", daemon=True)
                thread.start()
                while True:
                    frame = frames.get()
                    if frame is None:
                        break
                    if frame.observables is not None:  # the temperature gauge follows MD frame by frame
                        self.last_temperature_k = frame.observables.temperature_K
                    reply = sampler_pb2.RunResponse()
                    frame_to_proto(frame, reply.frame)
                    yield reply
        finally:
            if thread is not None and thread.is_alive():  # the generator was closed early: the client went away
                engine.request_stop()
                while thread.is_alive():
                    try:
                        frames.get(timeout=0.1)  # unblock a pending put
                    except queue.Empty:
                        pass
            if thread is not None:
                thread.join()
            with self._lock:
                self.active_runs -= 1
                report = outcome.get("report")
                if isinstance(outcome.get("error"), _ClientGone) or (report is not None
                                                                     and report.reason == "cancelled"):
                    self.runs_cancelled_total += 1
                # what the engine integrated, also in a call that failed (a counter never goes back)
                _, start = self._running.pop(id(engine))
                self._steps_finished += max(0, engine.step - start)
        if "error" in outcome:
            exc = outcome["error"]
            if isinstance(exc, _ClientGone):
                return
            raise exc
        report: StopReport = outcome["report"]
        if report.reason == "cancelled":
            return  # only the client going away stops an engine here: nobody is listening
        steps_per_second = report.steps_taken / outcome["seconds"] if outcome["seconds"] > 0 else 0.0
        drift = outcome["drift"]
        self.last_steps_per_second = steps_per_second
        # an uncertain stop frame is not integrated yet (no observables): the last integrated step's count
        observables = (report.frame.observables if report.frame is not None and report.frame.observables is not None
                       else outcome.get("observables"))
        if observables is not None:
            self.last_temperature_k = observables.temperature_K
        if drift is not None:  # too few frames on one model version to measure: keep the last measurement
            self.last_drift = drift
        reply = sampler_pb2.RunResponse()
        stop_to_proto(report, outcome["checkpoint"], drift, steps_per_second, reply.stop, outcome["state"])
        yield reply
