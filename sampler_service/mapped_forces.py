"""Forces from a mapped (spline) model in-process: production MD with the built-in engine.

:class:`MappedForceProvider` is a :class:`~sampler_service.force_providers.ForceProvider` that calls
the Numba evaluator of :class:`learner_service.mapped.MappedModel` directly: no learner, no
gRPC, no σ (unless ``sigma`` — a provider of a mapped variance — is given; its ``force_std`` /
``atom_std`` are attached to every result, so the engine's threshold applies).

Units: Å, eV, eV/Å, stress eV/Å³ (ASE Voigt order and sign).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protos.errors import InvalidInput
from sampler_service.force_providers import ForceProvider, ForceResult


class MappedForceProvider:
    """A :class:`ForceProvider` evaluating a ``MappedModel`` (or a saved one: ``.npz`` path).

    ``stress``: compute the stress (fully periodic cells only; needed by barostats).
    ``model_version``: reported in every result (default: the model's ``metadata['model_version']``
    if it has one, else 0).
    """

    def __init__(self, model, stress: bool = True, sigma: ForceProvider | None = None,
                 model_version: int | None = None) -> None:
        from learner_service.mapped import MappedModel

        if isinstance(model, (str, Path)):
            model = MappedModel.load(model)
        if not isinstance(model, MappedModel):
            raise InvalidInput(f"MappedForceProvider needs a MappedModel or its file, got {type(model).__name__}")
        self.model = model
        self.want_stress = bool(stress)
        self.sigma = sigma
        if model_version is None:
            model_version = int(model.metadata.get("model_version", 0) or 0)
        self.model_version = model_version
        self.calls = 0

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        self.calls += 1
        pbc = np.asarray(pbc, dtype=bool)
        stress = self.want_stress and bool(np.all(pbc)) and abs(np.linalg.det(np.asarray(cell))) > 1e-12
        p = self.model.evaluate(positions, numbers, cell, pbc, stress=stress)
        std = atom_std = noise = None
        if self.sigma is not None:
            s = self.sigma.compute(positions, cell, numbers, pbc)
            std, atom_std, noise = s.force_std, s.atom_std, s.noise
        return ForceResult(energy=p.energy, forces=p.forces, stress=p.stress, force_std=std, noise=noise,
                           model_version=self.model_version, atom_std=atom_std)


class MappedSigmaProvider:
    """σ only, from a mapped variance (``learner_service.mapped_variance.MappedVariance`` or its
    ``mapped_variance.npz``, written by ``epicycle map --variance``): ``atom_std`` (n,) eV/Å, the
    rotation-invariant σ of each atom's force (2-body part of the GP's σ, see that module).
    Forces and energy are zeros: give it as ``sigma`` to :class:`MappedForceProvider` or to the
    native LAMMPS engine (:class:`~sampler_service.lammps_pair.LammpsPairEngine`), whose threshold
    then stops production MD where the model extrapolates."""

    def __init__(self, variance, noise: float | None = None) -> None:
        from learner_service.mapped_variance import MappedVariance

        if isinstance(variance, (str, Path)):
            variance = MappedVariance.load(variance)
        if not isinstance(variance, MappedVariance):
            raise InvalidInput(f"MappedSigmaProvider needs a MappedVariance or its file, got {type(variance).__name__}")
        self.variance = variance
        self.noise = noise

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        from ase import Atoms

        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        std = self.variance.atom_std(atoms)
        return ForceResult(energy=None, forces=np.zeros((len(atoms), 3)), atom_std=std, noise=self.noise)


__all__ = ["MappedForceProvider", "MappedSigmaProvider"]
