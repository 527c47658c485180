"""An :class:`MDEngine` that integrates on a Sampler service, through :class:`SamplerClient`.

:class:`RemoteEngine` is the sampler's gRPC API seen through the engine
interface, so the engine contract suite (``tests/sampler/contract.py``) runs
unchanged against a real server (``tests/sampler/test_grpc_contract.py``),
and a script can drive a remote sampler as if it were local.

State on the client: the last checkpoint blob (opaque; the server's engine
wrote it), forces supplied for the current step but not yet sent, and what
the last stop report said about the engine (step, time, positions,
velocities, cell, images, settings, energy drift).  Every :meth:`run` is one
``Run`` call: ``new_run`` for the first, then ``checkpoint`` (+
``override_forces``); construction and :meth:`restore` are zero-step calls,
so the server validates settings, structure and blobs.

What differs from a local engine, because of the wire:

* :meth:`request_stop` cancels the call.  A cancelled call returns no
  checkpoint, so the engine stays where the call started (the report says
  ``"cancelled"`` with ``steps_taken=0``); the frames already received stay
  valid.  The same holds when the learner fails or ``on_frame`` raises.
* :meth:`set_velocities` and :meth:`initialize_velocities` are not offered
  by the API (give velocities in the structure of a new run, or
  ``initial_temperature_K``); :meth:`set_timestep` applies to the next call
  (``RunControl.timestep_fs``).
* Run arguments the wire cannot carry (``max_steps < 0``, a threshold ≤ 0,
  which the API reads as "no threshold") are rejected here with the same
  :class:`InvalidInput` as a local engine.
* :meth:`observables` is that of the last frame received (``None`` right after
  construction or :meth:`restore`); ``pressure_GPa`` is not on the wire.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from protos import wire
from protos.epicycle.v1 import sampler_pb2
from protos.errors import CalculationFailed, InvalidInput
from sampler_service.client import SamplerClient
from sampler_service.engine_interface import Frame, FrameCallback, MDEngine, Observables, StopReport, check_run_args
from sampler_service.force_providers import ForceResult
from sampler_service.settings import SamplerSettings

__all__ = ["RemoteEngine", "RemoteForces", "md_settings", "frame_from_proto", "stop_from_proto"]


@dataclass(frozen=True)
class RemoteForces:
    """Where a remote engine's forces come from: the sampler that integrates and the learner it asks
    (``""``: the sampler's default learner; ``"oracle:emt"``: EMT in the sampler's process)."""

    client: SamplerClient
    learner: str = ""


#: SamplerSettings keyword -> MDSettings field (the inverse of servicer.settings_from_proto)
_FIELDS = {
    "engine": "engine", "ensemble": "ensemble", "timestep_fs": "timestep_fs", "temperature_K": "temperature_k",
    "friction": "friction_per_fs", "taut_fs": "taut_fs", "pressure_GPa": "pressure_gpa", "taup_fs": "taup_fs",
    "compressibility": "compressibility_per_gpa", "initial_temperature_K": "initial_temperature_k",
    "wrap": "wrap_positions", "seed": "seed",
}


def md_settings(**kw: Any) -> sampler_pb2.MDSettings:
    """``MDSettings`` from :class:`SamplerSettings` keywords, *without* validating the values: the
    sampler does that.  Only what the message cannot represent is refused here (a negative seed:
    ``uint64``; an unknown keyword)."""
    msg = sampler_pb2.MDSettings()
    for key, value in kw.items():
        if value is None:
            continue
        if key == "schedule":
            for t, temp in value:
                msg.schedule.add(time_fs=float(t), temperature_k=float(temp))
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InvalidInput(f"sampler setting seed must be a non-negative integer, got {value!r}")
            msg.seed = int(value)
        elif key in _FIELDS:
            setattr(msg, _FIELDS[key], value)
        else:
            raise InvalidInput(f"unknown sampler setting {key!r}; allowed: {sorted([*_FIELDS, 'schedule'])}")
    return msg


def _copy(arr):
    return None if arr is None else np.array(arr)


def _array(msg, field: str, name: str, shape, dtype="<f8"):
    if not wire.has_array(msg, field):
        return None
    return wire.decode_array(getattr(msg, field), name, shape, dtype, writable=True)


def frame_from_proto(msg: sampler_pb2.Frame) -> Frame:
    """The engine :class:`Frame` of a streamed ``Frame`` message.

    Supplied (oracle) forces have no model: their ``model_version`` is −1, as
    in :class:`ForceResult`.  Observables are present when the frame was
    integrated (it has velocities); ``heat_eV`` = E_kin + E_pot − conserved.
    """
    s, p = msg.structure, msg.prediction
    positions = _array(s, "positions", "frame.positions", (None, 3))
    n = len(positions)
    cell = _array(s, "cell", "frame.cell", (3, 3))
    pbc = np.array(list(s.pbc) if len(s.pbc) == 3 else [False] * 3, dtype=bool)
    velocities = _array(s, "velocities", "frame.velocities", (n, 3))
    obs = None
    if velocities is not None:
        ke, pe = msg.kinetic_energy, msg.potential_energy
        conserved = None if math.isnan(msg.conserved_energy) else msg.conserved_energy
        obs = Observables(temperature_K=msg.temperature_k, kinetic_eV=ke, potential_eV=pe, total_eV=ke + pe,
                          heat_eV=(ke + pe - conserved) if conserved is not None else math.nan,
                          conserved_eV=conserved,
                          volume_A3=abs(float(np.linalg.det(cell))) if pbc.any() else 0.0)
    return Frame(
        step=int(msg.step), time_fs=float(msg.time_fs), positions=positions,
        numbers=_array(s, "numbers", "frame.numbers", (n,), "<i8"), cell=cell, pbc=pbc,
        masses=_array(s, "masses", "frame.masses", (n,)), velocities=velocities,
        forces=_array(p, "forces", "frame.forces", (n, 3)),
        energy=p.energy if p.HasField("energy") else None,
        stress=_array(p, "stress", "frame.stress", (6,)),
        force_std=_array(p, "force_std", "frame.force_std", (n, 3)),
        noise=p.noise_std if p.noise_std > 0 else None,
        model_version=-1 if msg.forces_from_override else int(p.model_version),
        forces_supplied=bool(msg.forces_from_override), observables=obs,
        atom_std=_copy(wire.decode_atom_std(p, n, "frame")),
    )


def stop_from_proto(msg: sampler_pb2.StopReport) -> StopReport:
    uncertain = msg.reason == sampler_pb2.STOP_REASON_UNCERTAIN
    comps = np.array([(u.atom, u.component) for u in msg.uncertain], dtype=np.int64).reshape(-1, 2)
    std = np.array([u.sigma for u in msg.uncertain], dtype=np.float64)
    return StopReport(
        reason="uncertain" if uncertain else "max_steps", step=int(msg.step), time_fs=float(msg.time_fs),
        steps_taken=int(msg.steps_taken), frame=frame_from_proto(msg.frame) if msg.HasField("frame") else None,
        threshold=msg.threshold if msg.threshold > 0 else None, max_std=msg.max_sigma if uncertain else None,
        uncertain_atoms=np.unique(comps[:, 0]), uncertain_components=comps, uncertain_std=std,
    )


class RemoteEngine(MDEngine):
    """The engine of a Sampler service behind the :class:`MDEngine` interface (see the module docstring).

    ``RemoteEngine(settings, RemoteForces(client, learner), atoms)``: ``settings`` is a
    :class:`SamplerSettings` or an ``MDSettings`` message (validated by the server).
    """

    name = "remote"

    def __init__(self, settings: SamplerSettings | sampler_pb2.MDSettings, provider: RemoteForces,
                 atoms: Atoms | None, *, _blob: bytes | None = None) -> None:
        if not isinstance(provider, RemoteForces):
            raise InvalidInput(f"a remote engine's provider is RemoteForces(client, learner), "
                               f"got {type(provider).__name__}")
        self.provider = provider
        self._lock = threading.Lock()
        self._call = None
        self._pending: ForceResult | None = None
        self._observables: Observables | None = None
        self._timestep: float | None = None
        self._schedule: tuple | None = None   # a replaced schedule, sent with the next call
        if _blob is not None:
            req = sampler_pb2.RunRequest(checkpoint=bytes(_blob))
        else:
            if isinstance(settings, SamplerSettings):
                from sampler_service.servicer import settings_to_proto

                settings = settings_to_proto(settings)
            if not isinstance(settings, sampler_pb2.MDSettings):
                raise InvalidInput(f"settings must be SamplerSettings or MDSettings, got {type(settings).__name__}")
            if not isinstance(atoms, Atoms):
                raise InvalidInput(f"structure must be ase.Atoms, got {type(atoms).__name__}")
            req = sampler_pb2.RunRequest()
            req.new_run.settings.CopyFrom(settings)
            wire.structure_to_proto(atoms, out=req.new_run.structure)
        self._call_run(req, 0, None, 0, None)

    @classmethod
    def from_checkpoint(cls, blob: bytes, provider: RemoteForces) -> "RemoteEngine":
        """A remote engine in the state of ``blob`` (checked by the sampler)."""
        if not blob:
            raise InvalidInput("checkpoint is empty")
        return cls(None, provider, None, _blob=blob)

    # -- the wire ------------------------------------------------------------------
    def _call_run(self, req: sampler_pb2.RunRequest, max_steps: int, threshold: float | None,
                  frame_interval: int, on_frame: FrameCallback | None) -> StopReport | None:
        """One Run call; on success the state is the stop report's.  None if cancelled by request_stop."""
        req.learner_address = self.provider.learner
        req.control.max_steps = int(max_steps)
        req.control.sigma_threshold = float(threshold) if threshold is not None else 0.0
        req.control.frame_interval = int(frame_interval) if on_frame is not None else 0
        if self._timestep is not None:
            req.control.timestep_fs = self._timestep
        if self._schedule is not None:
            req.control.replace_schedule = True
            for t, temp in self._schedule:
                req.control.schedule.add(time_fs=t, temperature_k=temp)
        if self._pending is not None:
            r = self._pending
            wire.labels_to_proto(r.energy, r.forces, r.stress, out=req.override_forces)
        call = self.provider.client.open_run(req)
        with self._lock:
            self._call = call
        stop = None
        try:
            for reply in call:
                if reply.HasField("frame"):
                    frame = frame_from_proto(reply.frame)
                    self._observables = frame.observables
                    if on_frame is not None:
                        on_frame(frame)
                else:
                    stop = reply.stop
        except BaseException:
            call.cancel()
            raise
        finally:
            with self._lock:
                self._call = None
        if call.cancelled:
            return None
        if stop is None:
            raise CalculationFailed(f"sampler {self.provider.client.address} ended the run without a stop report")
        report = stop_from_proto(stop)
        self._apply(stop, report)
        return report

    def _apply(self, stop: sampler_pb2.StopReport, report: StopReport) -> None:
        from sampler_service.servicer import settings_from_proto

        s = stop.state
        self._blob = bytes(stop.checkpoint)
        self._step = int(stop.step)
        self._time = float(stop.time_fs)
        self._positions = _array(s, "positions", "state.positions", (None, 3))
        n = len(self._positions)
        self._velocities = _array(s, "velocities", "state.velocities", (n, 3))
        self._cell = _array(s, "cell", "state.cell", (3, 3))
        self._numbers = _array(s, "numbers", "state.numbers", (n,), "<i8")
        self._masses = _array(s, "masses", "state.masses", (n,))
        self._pbc = np.array(list(s.pbc), dtype=bool)
        self._images = _array(stop, "images", "images", (n, 3), "<i8")
        self.settings = settings_from_proto(stop.settings)
        drift = stop.energy_drift_ev_per_atom_ps
        self._drift = None if math.isnan(drift) else float(drift)
        if report.frame is not None and report.frame.observables is not None:
            self._observables = report.frame.observables
        self._pending = None
        self._timestep = None
        self._schedule = None

    # -- MDEngine ------------------------------------------------------------------
    def run(self, max_steps: int, threshold: float | None = None, frame_interval: int = 1,
            on_frame: FrameCallback | None = None,
            forces_for_current_step: ForceResult | None = None) -> StopReport:
        check_run_args(max_steps, threshold, frame_interval)
        if forces_for_current_step is not None:
            self.supply_forces(forces_for_current_step)
        if self._take_cancel():
            return StopReport(reason="cancelled", step=self._step, time_fs=self._time, steps_taken=0,
                              threshold=threshold)
        report = self._call_run(sampler_pb2.RunRequest(checkpoint=self._blob), max_steps, threshold,
                                frame_interval, on_frame)
        if report is None:
            self._take_cancel()
            return StopReport(reason="cancelled", step=self._step, time_fs=self._time, steps_taken=0,
                              threshold=threshold)
        return report

    def request_stop(self) -> None:
        """Cancel the running call (thread-safe); with none running, the next :meth:`run` returns at once."""
        super().request_stop()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def supply_forces(self, result: ForceResult) -> None:
        """Forces for the current positions, sent with the next call (``override_forces``)."""
        self._pending = self._checked_supplied(result)

    def checkpoint(self) -> bytes:
        """The sampler's last checkpoint; pending supplied forces (or Δt) are folded in by a zero-step call."""
        if self._pending is not None or self._timestep is not None or self._schedule is not None:
            self._call_run(sampler_pb2.RunRequest(checkpoint=self._blob), 0, None, 0, None)
        return self._blob

    def restore(self, blob: bytes) -> None:
        if not blob:
            raise InvalidInput("checkpoint is empty")
        self._pending = None
        self._timestep = None
        self._schedule = None
        self._call_run(sampler_pb2.RunRequest(checkpoint=bytes(blob)), 0, None, 0, None)
        self._observables = None

    def positions(self) -> np.ndarray:
        return self._positions.copy()

    def velocities(self) -> np.ndarray:
        return self._velocities.copy()

    def cell(self) -> np.ndarray:
        return self._cell.copy()

    @property
    def images(self) -> np.ndarray:
        return self._images.copy()

    def observables(self) -> Observables | None:
        return self._observables

    def energy_drift(self) -> float | None:
        return self._drift

    def set_schedule(self, schedule) -> None:
        """The schedule from the next call on (sent as ``RunControl.schedule``)."""
        self._schedule = tuple((float(t), float(temp)) for t, temp in schedule)
        self.settings = self.settings.replace(schedule=self._schedule)

    def set_timestep(self, timestep_fs: float) -> None:
        """Δt from the next call on (sent as ``RunControl.timestep_fs``; the sampler validates it)."""
        self._timestep = float(timestep_fs)
        self.settings = self.settings.replace(timestep_fs=self._timestep)

    def set_velocities(self, velocities: np.ndarray) -> None:
        raise NotImplementedError("the Sampler API sets velocities only through the structure of a new run "
                                  "(or MDSettings.initial_temperature_k)")

    def initialize_velocities(self, temperature_K: float, exact: bool = True) -> None:
        raise NotImplementedError("use MDSettings.initial_temperature_k when starting a remote run")
