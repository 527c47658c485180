"""``learner.data``: the labelled structures a run's training set starts from.

Before the first oracle call of a new run, the frames of every ``learner.data`` input (extended
XYZ files, run directories; :mod:`learner_service.labelled_data`) go to the learner in
AddDataBatch calls of at most :data:`MAX_BATCH_BYTES` each (estimated wire size; one batch for the
usual few hundred frames, several for tens of thousands, so no message reaches gRPC's 64 MiB
limit).  Atoms: those a per-atom boolean ``training`` array marks (what a run directory, and
``epicycle export`` of it, record: the atoms whose environments that run trained on; a frame with
the array but no atom marked is skipped), else every atom of the frame.  Energies and stresses are
trained on when the frame has them and the run trains on them (``learner.use_energy`` / ``use_stress``,
and for a sparse model ``learner.sparse.labels``: :func:`coordinator.config.trained_labels`).

The learner's checkpoints hold the seeded data from the first label on, so a resumed run does
not read the inputs again; only a learner rebuilt from the run's labels (its checkpoints lost)
seeds again, and then the inputs must still hold the same data (SHA-256 recorded in the
``training_seeded`` event).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from protos.errors import InvalidInput


MAX_BATCH_BYTES = 8 * 1024 * 1024
_BYTES_PER_ATOM = 64      # positions and forces (6 doubles), the atomic number and a training index
_BYTES_PER_FRAME = 512    # cell, pbc, energy, stress, flags and message framing


def wire_bytes(item: dict) -> int:
    """An upper estimate of one AddDataBatch item's serialised size, bytes."""
    return _BYTES_PER_FRAME + _BYTES_PER_ATOM * len(item["atoms"])


def batches(items: list[dict], max_bytes: int = MAX_BATCH_BYTES) -> list[list[dict]]:
    """``items`` in order, cut into consecutive batches of at most ``max_bytes`` (estimated by
    :func:`wire_bytes`; an item larger than that goes alone)."""
    if max_bytes <= 0:
        raise InvalidInput(f"max_bytes must be > 0, got {max_bytes}")
    out: list[list[dict]] = []
    size = 0
    for item in items:
        b = wire_bytes(item)
        if not out or size + b > max_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += b
    return out


@dataclass
class SeedData:
    items: list[dict]       # learner AddDataBatch items (coordinator.ports.LearnerPort.add_data_batch)
    summary: list[str]      # one line per input (+ the merged total)
    skipped: int            # frames with a 'training' array but no atom marked
    environments: int       # atom environments added
    digest: str             # SHA-256 of everything sent


def seed_data(config) -> SeedData:
    """The AddDataBatch items of ``config.learner.data`` (see the module docstring)."""
    from learner_service.labelled_data import frame_forces, read_labelled

    from coordinator.config import trained_labels

    le = config.learner
    use_energy, use_stress = trained_labels(le)
    data = read_labelled(le.data)
    items, skipped, h = [], 0, hashlib.sha256()
    for frame in data.frames:
        mask = frame.arrays.get("training")
        idx = list(range(len(frame))) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool)).tolist()
        if not idx:
            skipped += 1
            continue
        results = getattr(frame.calc, "results", {}) if frame.calc is not None else {}
        energy, stress = results.get("energy"), results.get("stress")
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell.array, pbc=frame.pbc)
        forces = frame_forces(frame)
        item = {"atoms": atoms, "forces": forces, "atom_indices": idx,
                "energy": None if energy is None else float(energy),
                "stress": None if stress is None else np.asarray(stress, dtype=float),
                "use_energy": bool(use_energy and energy is not None),
                "use_stress": bool(use_stress and stress is not None)}
        for a in (atoms.numbers.astype(np.int64), atoms.positions, atoms.cell.array, forces, np.asarray(idx),
                  np.asarray([np.nan if energy is None else energy]),
                  np.zeros(0) if stress is None else item["stress"]):
            h.update(np.ascontiguousarray(a).tobytes())
        items.append(item)
    if not items:
        raise InvalidInput(f"learner.data: no frame with atoms to train on in {', '.join(le.data)} "
                           f"(every frame has a 'training' array with no atom marked)")
    return SeedData(items=items, summary=data.summary_lines(), skipped=skipped,
                    environments=sum(len(it["atom_indices"]) for it in items), digest=h.hexdigest())


def seed_species(config) -> set[int]:
    """Atomic numbers in ``config.learner.data`` (the model must know them)."""
    from learner_service.labelled_data import read_labelled

    return set(read_labelled(config.learner.data).species) if config.learner.data else set()


def seed_learner(config, learner, rd, progress, rebuilding: bool = False, max_bytes: int = MAX_BATCH_BYTES) -> None:
    """Add ``learner.data`` to the learner (nothing without it); record it in the event log.

    ``rebuilding``: the learner is rebuilt from the run's labels; the inputs must hold what they held
    when the run started.  ``max_bytes``: the size of one AddDataBatch (:func:`batches`).  Both callers
    start from the learner's initial (empty) model, so a seeding cut short by a failure is redone whole.
    """
    if not config.learner.data:
        return
    seed = seed_data(config)
    if rebuilding:
        recorded = [e for e in rd.events() if e.get("event") == "training_seeded"]
        if recorded and recorded[-1].get("digest") != seed.digest:
            raise InvalidInput(f"learner.data changed since the run started ({', '.join(config.learner.data)}): "
                               f"the learner cannot be rebuilt as it was; restore those inputs")
    else:
        progress.line(f"starting the training set from learner.data ({seed.environments} atom environments):")
        for line in seed.summary:
            progress.line(f"  {line}")
        if seed.skipped:
            progress.line(f"  {seed.skipped} frame(s) skipped: no atom marked 'training'")
    chunks = batches(seed.items, max_bytes)
    for k, chunk in enumerate(chunks):
        reply = learner.add_data_batch(chunk)
        if len(chunks) > 1:
            progress.line(f"  sent batch {k + 1}/{len(chunks)} ({len(chunk)} frames; "
                          f"{int(reply.n_environments)} environments in the model)")
    rd.event("training_seeded", sources=list(config.learner.data), frames=len(seed.items), skipped=seed.skipped,
             batches=len(chunks),
             environments=seed.environments, n_environments=int(reply.n_environments),
             model_version=int(reply.model_version), digest=seed.digest, rebuilding=rebuilding,
             summary=seed.summary)
