"""epicycle fit / predict / evaluate on extended XYZ files."""

import argparse
import json

import numpy as np
import pytest
from ase.io import read, write

from learner_service.datasets import perturbed_fcc_al
from learner_service.offline import register_cli


def _parser():
    parser = argparse.ArgumentParser(prog="epicycle")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_fit_predict_evaluate(tmp_path, capsys):
    write(tmp_path / "train.xyz", perturbed_fcc_al(2, seed=1))
    write(tmp_path / "test.xyz", perturbed_fcc_al(1, seed=2))
    model = tmp_path / "model.npz"
    assert _run(["fit", str(tmp_path / "train.xyz"), "--cutoffs", "5.0,3.5", "--atoms-per-frame", "6",
                 "--energy", "--max-iterations", "30", "--out", str(model)]) == 0
    out = capsys.readouterr().out
    assert "log marginal likelihood" in out and "eV/Å" in out and model.exists()

    assert _run(["predict", str(model), str(tmp_path / "test.xyz"), "--out", str(tmp_path / "pred.xyz")]) == 0
    pred = read(tmp_path / "pred.xyz")
    assert pred.arrays["force_std"].shape == (32, 3) and pred.get_forces().shape == (32, 3)
    assert pred.arrays["atom_std"].shape == (32,)
    assert np.all(pred.arrays["atom_std"] >= pred.arrays["force_std"].max(axis=1) - 1e-8)

    capsys.readouterr()
    assert _run(["evaluate", str(model), str(tmp_path / "test.xyz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["force_components"] == 96
    assert 0 < report["rmse"] < report["p95_abs_force"]
    assert report["rmse_over_p95"] == report["rmse"] / report["p95_abs_force"]
    assert 0 <= report["within_1_sigma"] <= report["within_2_sigma"] <= 1
    assert report["variance_scale"] > 0 and report["variance_scale_prior_count"] == 12
    # the variance scale is the MAP of the module's prior: (Σz² + 12)/(n + 12) with Σz² = n·mean z²
    n = report["force_components"]
    assert report["variance_scale"] ** 2 == pytest.approx((n * report["mean_squared_z"] + 12) / (n + 12), rel=1e-12)
    assert len(report["reliability"]["expected"]) == len(report["reliability"]["observed"])
    assert report["warnings"] == []  # trained with energies, cutoffs that see pairs and triplets
    assert set(report["per_species"]) == {"Al"}
    assert _run(["evaluate", str(model), str(tmp_path / "test.xyz")]) == 0
    text = capsys.readouterr().out
    assert "RMSE/P95" in text and "variance scale s = " in text and "reliability" in text


def test_clear_errors(tmp_path, capsys):
    unlabeled = perturbed_fcc_al(1, seed=1, label=False)
    write(tmp_path / "nolabels.xyz", unlabeled)
    assert _run(["fit", str(tmp_path / "nolabels.xyz"), "--cutoffs", "5,3.5", "--out", str(tmp_path / "m.npz")]) == 2
    assert "frame 0 has no forces" in capsys.readouterr().err
    assert _run(["fit", str(tmp_path / "missing.xyz"), "--cutoffs", "5,3.5", "--out", str(tmp_path / "m.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _run(["fit", str(tmp_path / "nolabels.xyz"), "--cutoffs", "5", "--out", str(tmp_path / "m.npz")]) == 2
    assert "--cutoffs" in capsys.readouterr().err
    # a model that does not know an element of the test set
    frames = perturbed_fcc_al(1, seed=1)
    write(tmp_path / "al.xyz", frames)
    model = tmp_path / "al.npz"
    assert _run(["fit", str(tmp_path / "al.xyz"), "--cutoffs", "5,3.5", "--atoms", "0,1",
                 "--max-iterations", "5", "--out", str(model)]) == 0
    cu = frames[0].copy()
    cu.numbers[0] = 29
    cu.calc = frames[0].calc
    write(tmp_path / "cu.xyz", cu)
    capsys.readouterr()
    assert _run(["evaluate", str(model), str(tmp_path / "cu.xyz")]) == 2
    assert "not in the model" in capsys.readouterr().err


def test_fit_flags_hyperparameters_on_a_bound(tmp_path, capsys):
    """The same frame twice with identical (noise-free EMT) labels: the likelihood grows without
    limit as σn -> 0, so σn ends on the lower edge of its box, and `fit` says so.  (`--holdout 0`:
    the held-out check would hold one copy out, and the search would not see the duplicate;
    `--selection objective`: the two copies are one structure, so the cross-validated rule would
    keep the start values.)"""
    frame = perturbed_fcc_al(1, seed=1)
    write(tmp_path / "twice.xyz", frame + frame)
    assert _run(["fit", str(tmp_path / "twice.xyz"), "--cutoffs", "5.0,3.5", "--atoms", "0,1,2",
                 "--max-iterations", "60", "--holdout", "0", "--selection", "objective",
                 "--out", str(tmp_path / "m.npz")]) == 0
    out = capsys.readouterr().out
    assert "ended on a bound" in out and "noise at its lower bound 0.001 eV/Å" in out
    noise_line = next(line for line in out.splitlines() if line.strip().startswith("noise "))
    assert "at its lower bound" in noise_line


def test_fit_model_sparse_uses_every_force_and_the_selected_atoms_as_inducing(tmp_path, capsys):
    """``epicycle fit --model sparse``: every force component of every frame is a label, the
    selected atoms are the inducing environments; predict and evaluate read the sparse file."""
    from learner_service.model import load_model, model_file_kind

    frames = perturbed_fcc_al(2, seed=1)
    write(tmp_path / "train.xyz", frames)
    write(tmp_path / "test.xyz", perturbed_fcc_al(1, seed=2))
    model = tmp_path / "sparse.npz"
    assert _run(["fit", str(tmp_path / "train.xyz"), "--cutoffs", "5.0,3.5", "--atoms-per-frame", "6",
                 "--energy", "--max-iterations", "20", "--model", "sparse", "--out", str(model)]) == 0
    out = capsys.readouterr().out
    assert "sparse GP" in out and "inducing environments" in out
    assert model_file_kind(model) == "sparse"
    gp = load_model(model)
    n = sum(len(f) for f in frames)
    assert gp.n_labels == 3 * n + len(frames) and gp.n_inducing == 6 * len(frames)
    assert _run(["evaluate", str(model), str(tmp_path / "test.xyz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["force_components"] == 96 and 0 < report["rmse"] < report["p95_abs_force"]
