"""Sampler settings: one frozen dataclass, validated once.

Units (the same at every boundary of the sampler):

====================  =========================================================
``timestep_fs``       fs
``temperature_K``     K (thermostat target; also the MB temperature if drawn)
``friction``          1/fs (Langevin γ; 0.01/fs = 100 fs relaxation time)
``taut_fs``           fs (Berendsen / CSVR thermostat time constant)
``pressure_GPa``      GPa (barostat target)
``taup_fs``           fs (Berendsen barostat time constant)
``compressibility``   1/GPa (isothermal compressibility β in the Berendsen
                      barostat; Al ≈ 1/76 GPa⁻¹ ≈ 0.013, Cu ≈ 0.0073)
``schedule``          ((time_fs, T_K), ...): at the first step whose time is
                      ≥ time_fs the velocities are rescaled to exactly T_K and
                      the thermostat target (if any) becomes T_K
====================  =========================================================

Ensembles (what each integrator is, so results can be compared with other codes):

``nve``
    velocity Verlet (the ensemble of the FLARE paper).
``nvt_langevin``
    Langevin dynamics, BAOAB splitting (Leimkuhler & Matthews 2013) with the
    exact Ornstein–Uhlenbeck step; does not conserve momentum (3N dof).
``nvt_berendsen``
    velocity Verlet + Berendsen weak-coupling velocity scaling each step.
``nvt_csvr``
    velocity Verlet + canonical stochastic velocity rescaling (Bussi,
    Donadio & Parrinello 2007) each step.
``npt_berendsen``
    ``nvt_berendsen`` + isotropic Berendsen barostat (positions and cell
    scaled by μ = 1 − β Δt/(3 τ_P) (P₀ − P), as ASE's ``NPTBerendsen``).
    Needs stress from the force provider.
``npt_langevin``
    ``nvt_langevin`` + the same isotropic Berendsen barostat.

Nothing here reads the environment or files; build the dataclass once (from a
config file, flags or a request) and hand it to an engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from protos.errors import InvalidInput

#: engine name -> description (factories live in :mod:`sampler_service.engine_registry`)
ENGINES: tuple[str, ...] = ("builtin", "lammps")

ENSEMBLES: tuple[str, ...] = (
    "nve",
    "nvt_langevin",
    "nvt_berendsen",
    "nvt_csvr",
    "npt_berendsen",
    "npt_langevin",
)

#: thermostat used by each ensemble
THERMOSTAT: dict[str, str | None] = {
    "nve": None,
    "nvt_langevin": "langevin",
    "nvt_berendsen": "berendsen",
    "nvt_csvr": "csvr",
    "npt_berendsen": "berendsen",
    "npt_langevin": "langevin",
}

#: barostat used by each ensemble
BAROSTAT: dict[str, str | None] = {e: ("berendsen" if e.startswith("npt") else None) for e in ENSEMBLES}


def _finite(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"sampler setting {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise InvalidInput(f"sampler setting {name!r} must be finite, got {value!r}")
    return x


@dataclass(frozen=True)
class SamplerSettings:
    """How to integrate the equations of motion (see the module docstring for units)."""

    engine: str = "builtin"
    ensemble: str = "nve"
    timestep_fs: float = 1.0
    temperature_K: float = 300.0
    friction: float = 0.01
    taut_fs: float = 100.0
    pressure_GPa: float = 0.0
    taup_fs: float = 1000.0
    compressibility: float = 0.01
    seed: int = 0
    schedule: tuple[tuple[float, float], ...] = ()
    wrap: bool = True
    #: if not None, velocities are drawn from Maxwell–Boltzmann at this temperature
    #: (zero total momentum) when the engine is created, replacing the structure's
    initial_temperature_K: float | None = None
    #: rescale the drawn velocities to exactly ``initial_temperature_K``
    exact_initial_temperature: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidInput(
                f"unknown sampler setting engine={self.engine!r}; allowed: {', '.join(ENGINES)}"
            )
        if self.ensemble not in ENSEMBLES:
            raise InvalidInput(
                f"unknown sampler setting ensemble={self.ensemble!r}; allowed: {', '.join(ENSEMBLES)}"
            )
        for name in ("timestep_fs", "temperature_K", "friction", "taut_fs", "pressure_GPa",
                     "taup_fs", "compressibility"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.timestep_fs <= 0:
            raise InvalidInput(f"sampler setting timestep_fs must be > 0 fs, got {self.timestep_fs}")
        if self.timestep_fs > 20:
            raise InvalidInput(
                f"sampler setting timestep_fs={self.timestep_fs} fs is unphysically large (allowed: 0 < dt ≤ 20 fs)"
            )
        if self.temperature_K < 0:
            raise InvalidInput(f"sampler setting temperature_K must be ≥ 0 K, got {self.temperature_K}")
        thermostat = THERMOSTAT[self.ensemble]
        if thermostat == "langevin" and self.friction <= 0:
            raise InvalidInput(
                f"sampler setting friction must be > 0 1/fs for ensemble {self.ensemble!r}, got {self.friction}"
            )
        if self.friction < 0:
            raise InvalidInput(f"sampler setting friction must be ≥ 0 1/fs, got {self.friction}")
        if thermostat in ("berendsen", "csvr") and self.taut_fs <= 0:
            raise InvalidInput(
                f"sampler setting taut_fs must be > 0 fs for ensemble {self.ensemble!r}, got {self.taut_fs}"
            )
        if BAROSTAT[self.ensemble] is not None:
            if self.taup_fs <= 0:
                raise InvalidInput(f"sampler setting taup_fs must be > 0 fs, got {self.taup_fs}")
            if self.compressibility <= 0:
                raise InvalidInput(
                    f"sampler setting compressibility must be > 0 1/GPa, got {self.compressibility}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInput(f"sampler setting seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.wrap, bool):
            raise InvalidInput(f"sampler setting wrap must be true or false, got {self.wrap!r}")
        if self.initial_temperature_K is not None:
            t0 = _finite("initial_temperature_K", self.initial_temperature_K)
            if t0 < 0:
                raise InvalidInput(f"sampler setting initial_temperature_K must be ≥ 0 K, got {t0}")
            object.__setattr__(self, "initial_temperature_K", t0)
        object.__setattr__(self, "schedule", _validate_schedule(self.schedule))

    # -- conversions ---------------------------------------------------------------
    @property
    def thermostat(self) -> str | None:
        return THERMOSTAT[self.ensemble]

    @property
    def barostat(self) -> str | None:
        return BAROSTAT[self.ensemble]

    @property
    def conserves_momentum(self) -> bool:
        """Whether the ensemble's dynamics keep the total momentum (→ 3N−3 dof)."""
        return self.thermostat != "langevin"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = [list(e) for e in self.schedule]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplerSettings":
        """Build from a plain mapping (config file, JSON); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown sampler settings {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "SamplerSettings":
        """A copy with ``changes`` applied (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidInput(f"unknown sampler settings {unknown}; allowed: {sorted(known)}")
        return replace(self, **changes)


def _validate_schedule(schedule: Any) -> tuple[tuple[float, float], ...]:
    out: list[tuple[float, float]] = []
    try:
        items = list(schedule or ())
    except TypeError:
        raise InvalidInput(
            f"sampler setting schedule must be a list of (time_fs, temperature_K) pairs, got {schedule!r}"
        ) from None
    for i, event in enumerate(items):
        try:
            t, temp = event
        except (TypeError, ValueError):
            raise InvalidInput(
                f"sampler setting schedule[{i}] must be a (time_fs, temperature_K) pair, got {event!r}"
            ) from None
        t = _finite(f"schedule[{i}].time_fs", t)
        temp = _finite(f"schedule[{i}].temperature_K", temp)
        if t < 0:
            raise InvalidInput(f"sampler setting schedule[{i}].time_fs must be ≥ 0 fs, got {t}")
        if temp < 0:
            raise InvalidInput(f"sampler setting schedule[{i}].temperature_K must be ≥ 0 K, got {temp}")
        if out and t <= out[-1][0]:
            raise InvalidInput(
                f"sampler setting schedule times must be strictly increasing; schedule[{i}].time_fs={t} "
                f"follows {out[-1][0]}"
            )
        out.append((t, temp))
    return tuple(out)


__all__ = ["SamplerSettings", "ENGINES", "ENSEMBLES", "THERMOSTAT", "BAROSTAT"]
