"""MAP model selection of a model that already holds its data (the learner's Optimize, method "map").

``epicycle fit`` (:func:`learner_service.offline.fit_model`) chooses which frames to hold out *before*
it builds the model.  A learner in an on-the-fly run gets its frames one AddData at a time, so this
module makes the same split afterwards from the frames the model remembers
(:meth:`GaussianProcess.labelled_frames`): :func:`holdout_split` over the frames' trained atoms, a copy
of the model trained on the kept atoms only, :func:`map_optimize` on that copy with the held-out atoms as
its validation set, and the selected hyperparameters set on the model itself (every atom trained on),
exactly as ``fit`` does after its search.  Nothing here knows about gRPC.

Units: sig2, sig3 eV; ls2, ls3 Å; noise eV/Å; energy_noise eV; stress_noise eV/Å³.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from protos.errors import InvalidInput, ModelError

from .model_selection import holdout_split, map_optimize

__all__ = ["map_select", "frame_split", "DEFAULT_MAP_ITERATIONS", "DEFAULT_RESTARTS", "DEFAULT_HOLDOUT"]

#: length-scale iterations of the MAP search when the request leaves it at 0 (map_optimize's default)
DEFAULT_MAP_ITERATIONS = 20
#: prior draws besides the prior centre and the current values (as ``epicycle fit --restarts``)
DEFAULT_RESTARTS = 3
#: share of the frames held out besides the cross-validation (of the atoms with one frame), as
#: ``epicycle fit --holdout`` (0: the selection rule's leave-one-frame-out folds alone)
DEFAULT_HOLDOUT = 0.0


def frame_split(gp, holdout: float, seed: int):
    """``(train_model, validation, note)`` for the held-out check of ``gp``'s own frames.

    ``train_model``: an empty copy of ``gp`` (same species, cutoffs, hyperparameters) holding the
    frames' kept atoms (a whole held-out frame brings no labels, a partly held-out frame keeps its
    energy/stress); ``validation``: ``[(atoms, held atom indices, forces (n, 3) eV/Å), ...]`` as
    :func:`map_optimize` takes it, empty if nothing is held out; ``note``: one line for the
    response.  ``holdout`` 0 or a model whose frames are unknown (loaded from a file): the model
    itself (a clone), no validation (map_optimize's cross-validation still holds out every frame in
    turn), and the note says so."""
    if not 0.0 <= holdout < 1.0:
        raise InvalidInput(f"holdout must be in [0, 1) (a share of the frames), got {holdout}")
    frames = gp.labelled_frames()
    if frames is None:
        return gp.clone(), [], ("no extra held-out frames: part of the training data was loaded from a model file, "
                                "which keeps environments, not structures (the cross-validation's frames are "
                                "recovered from the environments)")
    if holdout == 0.0:
        return gp.clone(), [], f"cross-validation over the model's {len(frames)} frame(s), no extra held-out frames"
    selections = [f.atom_indices.tolist() for f in frames]
    train, held = holdout_split(selections, holdout, seed)
    if not any(held):
        return gp.clone(), [], (f"no extra held-out frames: {sum(map(len, selections))} trained atom(s) in "
                                f"{len(frames)} frame(s) are too few to hold any out")
    sub = gp.empty_copy()
    validation = []
    for k, f in enumerate(frames):
        atoms = f.atoms()
        if held[k]:
            validation.append((atoms, held[k], f.forces))
        if held[k] and not train[k]:
            continue  # a whole held-out frame
        if not train[k] and f.energy is None and f.stress is None:
            continue  # a frame without trained atoms or other labels adds nothing
        sub.add_structure(atoms, forces=f.forces, atom_indices=train[k], energy=f.energy, stress=f.stress)
    whole = sum(1 for k in range(len(frames)) if held[k] and not train[k])
    kind = f"{whole} whole frame(s) of {len(frames)}" if whole else "atoms of the one frame"
    return sub, validation, f"held out {sum(map(len, held))} atom(s), {kind} (share {holdout:g}, seed {seed})"


def map_select(gp, restarts: int = DEFAULT_RESTARTS, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
               max_iterations: int = DEFAULT_MAP_ITERATIONS, bounds: Mapping[str, tuple[float, float]] | None = None,
               fix: Sequence[str] = (), progress: Callable[[str], None] | None = None):
    """Select ``gp``'s hyperparameters by MAP with the data-derived prior, ``restarts`` prior draws and a
    held-out check on its own frames (:func:`frame_split`), and set them on ``gp`` (the caller
    refactorises).  Returns the :class:`learner_service.gp.OptimizationResult` of the search (its
    likelihood is that of the model searched on; ``message`` also names the split)."""
    if getattr(gp, "kind", "exact") != "exact" or not hasattr(gp, "labelled_frames"):
        raise ModelError(f"method 'map' (prior, restarts, held-out check) is for the exact GP; this model is "
                         f"{getattr(gp, 'kind', type(gp).__name__)!r}: use method 'ml' (its own likelihood)")
    if not gp.n_labels:
        raise ModelError("cannot optimise hyperparameters without training data; call AddData first")
    if restarts < 0:
        raise InvalidInput(f"restarts must be >= 0, got {restarts}")
    sub, validation, note = frame_split(gp, holdout, seed)
    result = map_optimize(sub, prior="data", restarts=restarts, seed=seed, max_iterations=max_iterations,
                          validation=validation or None, bounds=bounds, fix=fix, progress=progress)
    gp.set_hyperparameters({n: result.hyperparameters[n] for n in gp.hyperparameter_names
                            if n in result.hyperparameters})
    return dataclasses.replace(result, message=f"{result.message}; {note}")
