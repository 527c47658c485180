"""Sampler: MD engines with uncertainty-gated stepping and exact checkpoints (no gRPC here).

The pure core that the gRPC servicer adapts::

    from sampler_service import SamplerSettings, AseCalculatorProvider, create_engine

    engine = create_engine(SamplerSettings(engine="builtin", ensemble="nve", timestep_fs=5.0,
                                           initial_temperature_K=300.0, schedule=((5000.0, 1e4),)),
                           provider, atoms)
    report = engine.run(1000, threshold=0.05, frame_interval=10, on_frame=writer)
    if report.uncertain:                      # σ > threshold at report.step: nothing integrated
        engine.supply_forces(dft_forces)      # labels of report.frame
        engine.run(...)                       # step n uses them, then the provider again
    blob = engine.checkpoint()                # bytes; engine_from_checkpoint(blob, provider)

Modules: :mod:`.settings` (frozen settings, units), :mod:`.force_providers`
(ForceProvider protocol, ForceResult, ASE and σ-function providers),
:mod:`.learner_stream_provider` (forces from the Learner service's gRPC stream),
:mod:`.engine_interface` (MDEngine interface, Frame, StopReport, state machine),
:mod:`.engine_registry` (engine name -> class), :mod:`.builtin_engine` (NumPy
integrators), :mod:`.lammps_engine` (LAMMPS via fix external, optional),
:mod:`.trajectory` (extended XYZ), :mod:`.dynamics` (pure MD formulas),
:mod:`.checkpoint` (blob format).  Per-step engine timings: ``benchmarks/bench_engines.py``.
"""

from sampler_service.engine_interface import Frame, MDEngine, Observables, StopReport
from sampler_service.engine_registry import create_engine, engine_from_checkpoint
from sampler_service.force_providers import (
    AseCalculatorProvider,
    ForceProvider,
    ForceResult,
    SigmaFunctionProvider,
    displacement_sigma,
)
from sampler_service.settings import ENSEMBLES, SamplerSettings
from sampler_service.trajectory import ExtXYZWriter, read_frames, write_frames

__all__ = [
    "AseCalculatorProvider", "ENSEMBLES", "ExtXYZWriter", "ForceProvider", "ForceResult", "Frame",
    "MDEngine", "Observables", "SamplerSettings", "SigmaFunctionProvider", "StopReport",
    "create_engine", "displacement_sigma", "engine_from_checkpoint", "read_frames", "write_frames",
]
