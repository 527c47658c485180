"""Learner-owned checkpoints, the cheap clone and conditioned σ, without gRPC (issue #11 part 3).

A resumed on-the-fly run must continue the same trajectory bit for bit, so a model rebuilt
from a checkpoint must predict bit for bit like the model that wrote it (np.array_equal, not
allclose).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from learner_service.checkpoints import DataItem, ModelDirectory, apply_items
from learner_service.gp import GaussianProcess
from learner_service.servicer import ModelStore
from protos.errors import NotFound, SetupError

HYPS = {"sig2": 0.2, "ls2": 1.0, "sig3": 0.02, "ls3": 0.8, "noise": 0.05}


def frame(seed: int, species=(13,), amplitude: float = 0.15) -> Atoms:
    """32-atom fcc Al (Cu on 8 random sites with species (13, 29)), rattled by ``amplitude`` Å."""
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    atoms.positions += rng.uniform(-amplitude, amplitude, atoms.positions.shape)
    if 29 in species:
        atoms.numbers[rng.permutation(len(atoms))[:8]] = 29
    return atoms


def item(seed: int, idx, species=(13,), energy=False, stress=False) -> DataItem:
    atoms = frame(seed, species)
    calc = atoms.copy()
    calc.calc = EMT()
    return DataItem(atoms=atoms, forces=calc.get_forces(), atom_indices=np.asarray(idx, dtype=np.int64),
                    energy=calc.get_potential_energy(), stress=calc.get_stress(), use_energy=energy,
                    use_stress=stress)


def assert_same_model(a: GaussianProcess, b: GaussianProcess, seeds=(101, 102)) -> None:
    sa, sb = a._factorize(), b._factorize()
    assert a.hyperparameters == b.hyperparameters
    assert np.array_equal(sa.L, sb.L) and np.array_equal(sa.alpha, sb.alpha)
    assert a._k_segments == b._k_segments
    assert np.array_equal(a._K2, b._K2) and np.array_equal(a._K3, b._K3)
    for s in seeds:
        t = frame(s, a.species)
        p, q = a.predict(t), b.predict(t)
        assert np.array_equal(p.forces, q.forces) and np.array_equal(p.force_std, q.force_std)
        p, q = a.predict(t, stress=True), b.predict(t, stress=True)
        assert np.array_equal(p.forces, q.forces) and np.array_equal(p.stress, q.stress)
        assert p.energy == q.energy


def history(store: ModelStore, species=(13,)) -> list[str]:
    """Adds (single and batched), an optimisation, more adds, a hyperparameter change; a
    checkpoint after each step; returns the checkpoint ids."""
    ids = []

    def add(items):
        store.update(lambda gp: apply_items(gp, items), items=items)
        ids.append(store.checkpoint()[0].checkpoint_id)

    add([item(0, [0, 1, 2], species)])
    add([item(1, [3, 4], species), item(2, [5], species)])
    store.update(lambda gp: gp.optimize(max_iterations=3, space="linear"))
    ids.append(store.checkpoint()[0].checkpoint_id)
    add([item(3, [6, 7], species)])
    add([item(4, [1, 9], species), item(5, [2], species, energy=True, stress=True)])
    store.update(lambda gp: gp.set_hyperparameters({"sig2": gp.hyperparameters["sig2"] * 1.1}))
    ids.append(store.checkpoint()[0].checkpoint_id)
    add([item(6, [4], species)])
    add([item(7, [0, 8], species), item(8, [11], species)])
    return ids


@pytest.mark.parametrize("cache_rows", [8192, 20], ids=["kernel-cache", "no-kernel-cache"])
@pytest.mark.parametrize("species", [(13,), (13, 29)], ids=["Al", "AlCu"])
def test_a_rebuilt_checkpoint_is_bit_for_bit_the_model_that_wrote_it(tmp_path, cache_rows, species) -> None:
    gp = GaussianProcess(list(species), (5.0, 3.5), HYPS, kernel_cache_max_rows=cache_rows)
    store = ModelStore(gp, model_dir=ModelDirectory(tmp_path / "model", keep=100).create())
    models = {}
    ids = []

    def remember(cid):
        models[cid] = store.snapshot()[0]
        ids.append(cid)

    orig = store.checkpoint
    store.checkpoint = lambda: (lambda r: (remember(r[0].checkpoint_id), r)[1])(orig())
    history(store, species)
    md = ModelDirectory(tmp_path / "model")
    manifest = md.read_manifest(ids[-1])
    assert [e["op"] for e in manifest["factor"]["log"]] == ["full", "extend", "extend"]
    for cid in (ids[2], ids[4], ids[-1]):  # after the optimisation, mid-way, the latest
        rebuilt = md.rebuild(md.read_manifest(cid))
        assert_same_model(models[cid], rebuilt)
    assert_same_model(models[ids[-1]], GaussianProcess.load(tmp_path / "model"))


def test_restore_truncates_the_live_model_bit_for_bit_and_supersedes_later_checkpoints(tmp_path) -> None:
    store = ModelStore(GaussianProcess([13], (5.0, 3.5), HYPS), model_dir=ModelDirectory(tmp_path).create())
    store.update(lambda gp: apply_items(gp, [item(0, [0, 1])]), items=[item(0, [0, 1])])
    store.update(lambda gp: gp.optimize(max_iterations=2, space="linear"))
    store.update(lambda gp: apply_items(gp, [item(1, [2, 3])]), items=[item(1, [2, 3])])
    first = store.checkpoint()[0].checkpoint_id
    at_first = store.snapshot()[0]
    for s in (2, 3):
        store.update(lambda gp, s=s: apply_items(gp, [item(s, [4, 5])]), items=[item(s, [4, 5])])
    later = store.checkpoint()[0].checkpoint_id
    restored, _ = store.restore(first, progress=None)
    assert restored.n_environments == at_first.n_environments == 4
    assert_same_model(at_first, restored)
    assert_same_model(at_first, ModelDirectory(tmp_path).load(first))
    with pytest.raises(NotFound, match="superseded"):
        store.restore(later)
    # new data after the restore overwrite the superseded batches; the chain stays consistent
    store.update(lambda gp: apply_items(gp, [item(9, [7])]), items=[item(9, [7])])
    again = store.checkpoint()[0].checkpoint_id
    assert int(again) > int(later)
    assert_same_model(store.snapshot()[0], ModelDirectory(tmp_path).load())
    empty, _ = store.restore("initial")
    assert empty.n_labels == 0 and ModelDirectory(tmp_path).latest_id() is None


def test_checkpoints_are_append_only_pruned_and_linear_in_the_data(tmp_path) -> None:
    md = ModelDirectory(tmp_path, keep=2).create()
    store = ModelStore(GaussianProcess([13], (5.0, 3.5), HYPS), model_dir=md)
    sizes = []
    for s in range(4):
        store.update(lambda gp, s=s: apply_items(gp, [item(s, range(8))]), items=[item(s, range(8))])
        sizes.append(store.checkpoint()[0].bytes_written)
    assert md.checkpoint_ids() == ["000003", "000004"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"batch_{i:06d}.npz" for i in range(4)]
    # each checkpoint writes its new batch and a manifest that lists every batch and factor
    # extension: the same size but for ~120 bytes per earlier batch (no O(N²) anywhere)
    assert all(0 <= b - a < 200 for a, b in zip(sizes, sizes[1:])), sizes
    manifest = json.loads((tmp_path / "checkpoints" / "000004.json").read_text())
    assert manifest["n_environments"] == 32 and manifest["lineage"]["end"] == 4
    assert not list(tmp_path.rglob(".*tmp*"))


def test_checkpoint_needs_a_model_directory_and_unknown_ids_are_not_found(tmp_path) -> None:
    store = ModelStore(GaussianProcess([13], (5.0, 3.5), HYPS))
    with pytest.raises(SetupError, match="--model-dir"):
        store.checkpoint()
    store = ModelStore(GaussianProcess([13], (5.0, 3.5), HYPS), model_dir=ModelDirectory(tmp_path).create())
    with pytest.raises(NotFound, match="000007"):
        store.restore("000007")
    with pytest.raises(NotFound):
        store.restore("../etc")


def test_clone_shares_arrays_and_updates_never_touch_the_served_model() -> None:
    gp = GaussianProcess([13], (5.0, 3.5), HYPS)
    apply_items(gp, [item(0, [0, 1, 2])])
    gp.train()
    L, alpha, K2, labels = gp._state.L.copy(), gp._state.alpha.copy(), gp._K2.copy(), list(gp._labels)
    work = gp.clone()
    assert work._state.L is gp._state.L and work._K2 is gp._K2
    apply_items(work, [item(1, [3, 4])])
    work.train()
    work.set_hyperparameters({"ls2": 1.3})
    work.train()
    work.optimize(max_iterations=2)
    assert np.array_equal(gp._state.L, L) and np.array_equal(gp._state.alpha, alpha)
    assert np.array_equal(gp._K2, K2) and gp._labels == labels and gp.hyperparameters["ls2"] == HYPS["ls2"]


def test_extension_without_kernel_cache_equals_with_it() -> None:
    """The block extension needs only the new columns: with the cache dropped it gives the
    same factor bit for bit, and the kernel matrices are not kept."""
    a = GaussianProcess([13], (5.0, 3.5), HYPS)
    b = GaussianProcess([13], (5.0, 3.5), HYPS, kernel_cache_max_rows=0)
    for s in range(3):
        for gp in (a, b):
            apply_items(gp, [item(s, [s, s + 5])])
            gp.train()
    assert np.array_equal(a._state.L, b._state.L) and np.array_equal(a._state.alpha, b._state.alpha)
    assert a._K2.shape == (18, 18) and b._K2.size == 0 and b._k_segments == ()
    assert [e["op"] for e in b.factor_history["log"]] == ["full", "extend", "extend"]


def test_conditioned_sigma_equals_a_gp_that_contains_those_environments() -> None:
    gp = GaussianProcess([13], (5.0, 3.5), HYPS)
    apply_items(gp, [item(0, [0, 1, 2]), item(1, [3, 4])])
    gp.train()
    novel = frame(5, amplitude=0.4)
    novel.set_cell(novel.cell * 0.96, scale_atoms=True)
    queued = [(novel, [0, 7]), (frame(6), [3])]
    test = novel
    plain = gp.predict(test)
    cond = gp.predict(test, condition_on=queued)
    assert np.array_equal(cond.forces, plain.forces)  # the mean is the current model's
    with_stress = gp.predict(test, stress=True, condition_on=queued)
    assert np.array_equal(with_stress.stress, gp.predict(test, stress=True).stress)
    assert np.array_equal(with_stress.force_var, cond.force_var)
    explicit = gp.clone()
    for atoms, idx in queued:
        explicit.add_structure(atoms, forces=np.full((len(atoms), 3), 0.3), atom_indices=idx)  # labels irrelevant
    explicit.train()
    ref = explicit.predict(test)
    np.testing.assert_allclose(cond.force_var, ref.force_var, rtol=1e-10, atol=1e-12 * np.abs(ref.force_var).max())
    # at a conditioned environment σ drops to the noise-limited value; elsewhere it only decreases
    # (posterior variance of f given one noisy observation y = f + e: < σn²)
    noise_limited = HYPS["noise"]
    assert np.all(plain.force_std[[0, 7]] > noise_limited) and np.all(cond.force_std[[0, 7]] < noise_limited)
    assert np.all(cond.force_std[[0, 7]] < 0.5 * plain.force_std[[0, 7]])
    assert np.all(cond.force_var <= plain.force_var + 1e-15)
    # an empty model conditioned on environments, and a model left unchanged
    empty = GaussianProcess([13], (5.0, 3.5), HYPS)
    e_ref = empty.clone()
    e_ref.add_structure(novel, forces=np.zeros((32, 3)), atom_indices=[0, 7])
    np.testing.assert_allclose(empty.predict(test, condition_on=[(novel, [0, 7])]).force_var,
                               e_ref.predict(test).force_var, rtol=1e-10, atol=1e-14)
    assert gp.n_labels == 15


@pytest.mark.parametrize("with_factor", [True, False], ids=["file-with-factor", "file-without-factor"])
def test_a_model_file_base_and_load_model_are_rebuilt_bit_for_bit(tmp_path, with_factor) -> None:
    """A learner started from a model file (--model) and one that got LoadModel: the file is the
    base of the checkpoint's data (copied into the directory once, content-addressed)."""
    src = GaussianProcess([13], (5.0, 3.5), HYPS)
    apply_items(src, [item(0, [0, 1, 2])])
    src.train()
    path = src.save(tmp_path / "start.npz")
    if not with_factor:  # a file with data and kernel matrices but no factor: factorised on load
        data = dict(np.load(path))
        data.pop("chol_L")
        data.pop("alpha")
        np.savez(path, **data)
    md = ModelDirectory(tmp_path / "model").create()
    store = ModelStore(GaussianProcess.load(path), model_dir=md, initial_base=path.read_bytes())
    store.update(lambda gp: gp.train())
    store.update(lambda gp: apply_items(gp, [item(1, [3, 4])]), items=[item(1, [3, 4])])
    store.checkpoint()
    assert_same_model(store.snapshot()[0], ModelDirectory(tmp_path / "model").load())
    # LoadModel: a new base, the batch numbering continues
    other = GaussianProcess([13], (5.0, 3.5), {**HYPS, "ls2": 1.2})
    apply_items(other, [item(5, [5, 6])])
    other.train()
    blob = other.save(tmp_path / "other.npz").read_bytes()
    store.replace(GaussianProcess.load(tmp_path / "other.npz"), model_file=blob)
    store.update(lambda gp: apply_items(gp, [item(6, [7])]), items=[item(6, [7])])
    written = store.checkpoint()[0]
    manifest = md.read_manifest(written.checkpoint_id)
    assert manifest["lineage"]["first"] == 1 and manifest["lineage"]["base"].startswith("base_")
    assert_same_model(store.snapshot()[0], ModelDirectory(tmp_path / "model").load())
    restored, _ = store.restore("initial", progress=None)
    assert restored.n_environments == 3
