"""Loud model warnings (issue 13, item 4): plain checks of a GP and its training data that a
user should see before trusting the model.  No gRPC here; ``epicycle fit``, the learner's
ModelInfo and the coordinator print what :func:`model_warnings` returns.

* an empty or nearly empty 2- or 3-body descriptor: no (or < 1 per environment on average)
  pairs within r2 or triplets within r3 in the training data -- that term of the kernel then
  does nothing, whatever its signal σ; the warning names the cutoff that would fix it.
  A triplet (c, j, k) counts when all three distances r_cj, r_ck, r_jk are < r3 (as in
  :mod:`learner_service.environment`), so the smallest useful r3 is the smallest, over the
  triplets of the data, of their longest side.
* a forces-only model (no energy labels): its energies are defined only up to a constant.
* a hyperparameter optimisation that did not converge, or ended on a bound of its box.

Units: Å, eV.
"""

from __future__ import annotations

import numpy as np

__all__ = ["model_warnings", "descriptor_warnings", "energy_warning", "optimization_warnings",
           "shortest_triplet_r3", "FORCES_ONLY_ENERGY"]

#: the text of the forces-only energy warning (also printed by predict/evaluate)
FORCES_ONLY_ENERGY = ("energies are defined only up to a constant: the model was trained on forces only "
                      "(no energy labels), so its total and local energies (eV) are relative -- compare "
                      "energy differences between structures of the same composition, not absolute values")

#: fewer pairs/triplets per training environment than this on average is "nearly empty"
NEARLY_EMPTY_PER_ENVIRONMENT = 1.0

_MAX_ENVIRONMENTS_SCANNED = 500


def shortest_triplet_r3(batch) -> float | None:
    """Smallest r3 (Å) with at least one triplet in ``batch``: min over pairs of neighbours
    (j, k) of a centre of max(r_cj, r_ck, r_jk), from the 2-body neighbour lists (the pairs
    within r2).  ``None`` if no environment has two neighbours within r2.  Scans at most the
    first 500 environments (the shortest triplet of a data set is rarely only in later ones)."""
    best = np.inf
    offsets = batch.bond_offsets
    for e in range(min(len(batch), _MAX_ENVIRONMENTS_SCANNED)):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi - lo < 2:
            continue
        r = batch.bond_r[lo:hi]
        v = batch.bond_u[lo:hi] * r[:, None]
        d_jk = np.linalg.norm(v[:, None, :] - v[None, :, :], axis=-1)
        longest = np.maximum(np.maximum(r[:, None], r[None, :]), d_jk)
        iu = np.triu_indices(hi - lo, 1)
        best = min(best, float(longest[iu].min()))
    return None if not np.isfinite(best) else best


def descriptor_warnings(gp) -> list[str]:
    """Warnings for an empty or nearly empty 2- or 3-body descriptor of ``gp``'s training data."""
    batch = gp.training_environments()
    m = len(batch)
    if m == 0:
        return []
    out = []
    h = gp.hyperparameters
    r2, r3 = gp.cutoffs.r2, gp.cutoffs.r3
    n_pairs = int(batch.bond_offsets[-1])
    if h.get("sig2", 1.0) > 0:
        if n_pairs == 0:
            out.append(f"no pairs within r2 = {r2:g} Å in the training data ({m} environments): the 2-body term "
                       f"does nothing; r2 must exceed the nearest-neighbour distance of the data")
        elif n_pairs / m < NEARLY_EMPTY_PER_ENVIRONMENT:
            out.append(f"only {n_pairs / m:.2f} pairs per environment within r2 = {r2:g} Å in the training data "
                       f"({n_pairs} in {m} environments): the 2-body term sees almost nothing; increase r2")
    if r3 > 0 and h.get("sig3", 1.0) > 0:
        n_trip = int(batch.trip_offsets[-1])
        if n_trip / m < NEARLY_EMPTY_PER_ENVIRONMENT:
            need = shortest_triplet_r3(batch)
            if need is None:
                fix = (f"no environment has two neighbours within r2 = {r2:g} Å either; increase r2 and r3 "
                       f"beyond the second-neighbour distance")
            else:
                fix = (f"the shortest triplet needs r3 > {need:.2f} Å (its longest side; the smooth cutoff "
                       f"gives it weight only if r3 is clearly larger)")
            if n_trip == 0:
                out.append(f"no triplets within r3 = {r3:g} Å in the training data ({m} environments): the "
                           f"3-body term does nothing; {fix}")
            else:
                out.append(f"only {n_trip / m:.2f} triplets per environment within r3 = {r3:g} Å in the training "
                           f"data ({n_trip} in {m} environments): the 3-body term sees almost nothing; {fix}")
    return out


def energy_warning(gp) -> str | None:
    """:data:`FORCES_ONLY_ENERGY` if ``gp`` has training labels but none of them an energy."""
    if gp.n_labels == 0 or gp.n_energy_labels > 0:
        return None
    return FORCES_ONLY_ENERGY


def optimization_warnings(result) -> list[str]:
    """Warnings for an :class:`~learner_service.gp.OptimizationResult` (``None``: none)."""
    if result is None:
        return []
    out = []
    if not result.converged:
        out.append(f"hyperparameter optimisation did not converge after {result.iterations} iterations "
                   f"(cap {result.max_iterations}): {result.message} -- the hyperparameters are where it stopped, "
                   f"not a maximum of the likelihood; raise --max-iterations or check the data")
    if result.at_bounds:
        out.append(f"hyperparameters ended on a bound of the optimisation box: {result.bound_note()} -- the box, "
                   f"not the data, set them; widen the bounds or check the cutoffs and data")
    return out


def model_warnings(gp, optimization=None) -> list[str]:
    """Every warning for ``gp`` (and the optimisation that produced it, if given), as
    one-line messages without a ``WARNING:`` prefix; ``[]`` if nothing is suspicious."""
    out = descriptor_warnings(gp)
    e = energy_warning(gp)
    if e is not None:
        out.append(e)
    out.extend(optimization_warnings(optimization))
    return out
