"""ASE calculator over a trained :class:`~learner_service.gp.GaussianProcess`.

Results: ``energy`` (eV), ``free_energy`` (= energy), ``energies`` (n,) local energies,
``forces`` (n, 3) eV/Å, ``stress`` (6,) eV/Å^3 (ASE Voigt), and ``force_std`` (n, 3)
eV/Å — the epistemic σ of every force component (noise excluded; the total
predictive σ is ``sqrt(force_std**2 + noise**2)`` with ``calc.results["noise"]``), and
``atom_std`` (n,) eV/Å — each atom's rotation-invariant epistemic σ (sqrt of the largest
eigenvalue of its 3×3 posterior force covariance; see docs/uncertainty.md).
"""

from __future__ import annotations

from ase.calculators.calculator import Calculator, all_changes

from .gp import GaussianProcess

__all__ = ["GPCalculator", "MappedCalculator"]


class GPCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "force_std", "atom_std"]

    def __init__(self, gp: GaussianProcess, **kwargs):
        super().__init__(**kwargs)
        self.gp = gp

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties and all(self.atoms.get_pbc())
        pred = self.gp.predict(self.atoms, stress=want_stress)
        self.results = {
            "energy": pred.energy,
            "free_energy": pred.energy,
            "energies": pred.local_energies,
            "forces": pred.forces,
            "force_std": pred.force_std,
            "atom_std": pred.atom_std,
            "noise": pred.noise,
            "model_version": pred.model_version,
        }
        if pred.stress is not None:
            self.results["stress"] = pred.stress


class MappedCalculator(Calculator):
    """ASE calculator over a :class:`~learner_service.mapped.MappedModel` (the spline map of a
    GP): ``energy``, ``free_energy``, ``energies``, ``forces``, ``stress`` (periodic cells) and,
    with a :class:`~learner_service.mapped_variance.MappedVariance`, ``atom_std`` (n,) eV/Å --
    the mapped 2-body force σ (docs/mapping.md says when it approximates the GP's)."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "atom_std"]

    def __init__(self, model, variance=None, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.variance = variance

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties and all(self.atoms.get_pbc())
        pred = self.model.predict(self.atoms, stress=want_stress)
        self.results = {"energy": pred.energy, "free_energy": pred.energy, "energies": pred.local_energies,
                        "forces": pred.forces}
        if pred.stress is not None:
            self.results["stress"] = pred.stress
        if self.variance is not None:
            self.results["atom_std"] = self.variance.atom_std(self.atoms)
