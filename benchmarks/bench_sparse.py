"""Sparse GP (issue 16): cost and accuracy per oracle call against the exact GP (prints tables; not a test).

Data: 32-atom FCC Al cells of ``learner_service.datasets.perturbed_fcc_al`` (a = 4.05 Å, every
coordinate displaced uniformly by up to ±5 % of a), EMT labels.  Training frames: seed 0, in
order; held-out test set: 20 frames of seed 1.  Kernel: 2+3-body, r2 = 6 Å, r3 = 4 Å, fixed
hyperparameters (those of bench_learner.py; no optimisation inside the scan, so that both
models see the same kernel).

Per oracle-call budget N (= frames labelled):

* sparse GP: every label of each of the N frames (32×3 forces, the energy, 6 stresses = 103
  labels per call), inducing environments picked by the model's rule (``--per-frame`` per frame,
  tolerance 1e-6), ``add_structure`` + ``train`` after every frame as an on-the-fly run does.
  Reported: cumulative seconds for add+train, the last frame's add+train, predict of one
  32-atom frame (median of ``--repeats``), peak traced memory (tracemalloc, numpy's arrays included)
  of the model build, force RMSE on the test set, mean z² and 2σ coverage (σ² = epistemic +
  noise²).
* exact GP: force labels of 1 and of 4 atoms per call (the atoms of largest predicted σ under
  the model so far, as the on-the-fly loop picks them; the first call takes atoms 0..k-1), the
  same test metrics.
* sparse GP on the force labels of all atoms only (no energy, no stress): the same inducing rule.

One optional optimisation of the sparse model's hyperparameters (all labels, L-BFGS-B, at most 50
iterations) is timed at ``--optimize-at`` N.  Prints machine information first.

    .venv/bin/python benchmarks/bench_sparse.py [--sizes 1,2,4,8,16,32] [--per-frame 4] [--tolerance 0]
                                                [--functionals energy|energy_force] [--optimize-at 4]

``--otf``: accuracy per oracle call from on-the-fly runs (Al melt ``examples/al_melt.yaml`` and
Cu3Au ``examples/cu3au.yaml``, EMT oracle, ``stop.max_labels`` = ``--labels`` calls, ``--seeds``
seeds).  Per system and seed: one run with ``learner.model: exact`` and one with ``sparse`` (the
example's settings otherwise).  Afterwards the model after k calls is rebuilt from each run
directory (its labels, its training atoms, the hyperparameters of its latest optimisation at or
before k) and measured on the common held-out EMT trajectory of ``bench_learning_curves.py``:
force RMSE, mean z² and 2σ coverage with σ² = epistemic + σn².  A third curve, "sparse on the
exact run's frames", trains a sparse model on every label of the frames the exact run labelled,
forces only (inducing: ``learner.sparse`` applied to those frames; the exact run's
hyperparameters at k) -- the accuracy per call of using every force, with the frames the exact
model chose and its kernel.

    .venv/bin/python benchmarks/bench_sparse.py --otf [--systems al_melt,cu3au] [--seeds 2] [--labels 16]
        [--sparse-labels forces|forces+energy|all] [--keep DIR]

Per seed it prints the first k at which the sparse run's RMSE is at or below the exact run's after the
whole budget (the issue's goal: k <= budget / 2), and z², 2σ coverage at the budget.  Runs kept with
``--keep`` are reused when their config is the same.

``--diagnose DIR``: for each kept pair ``SYSTEM-exact-SEED`` / ``SYSTEM-sparse-SEED`` in DIR, sparse
models rebuilt with one factor swapped at a time -- the frames (either run's), the hyperparameters
(either run's at k), the energy labels (with or without) -- to tell why one run learns more per call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import time
import tracemalloc

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T0 = time.perf_counter()
from learner_service.datasets import perturbed_fcc_al  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from learner_service.sparse_gp import SparseGaussianProcess  # noqa: E402

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def metrics(model, test_frames):
    err, var = [], []
    for at in test_frames:
        p = model.predict(at)
        err.append(p.forces - at.get_forces())
        var.append(p.force_var + p.noise ** 2)
    err, var = np.concatenate(err).ravel(), np.concatenate(var).ravel()
    z2 = err ** 2 / var
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "z2": float(np.mean(z2)),
            "cover2": float(np.mean(np.abs(err) <= 2 * np.sqrt(var)))}


def build_sparse(frames, per_frame, tolerance=1e-6, functionals="energy", labels="all"):
    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=per_frame,
                                inducing_tolerance=tolerance, inducing_functionals=functionals)
    t_total, t_last = 0.0, 0.0
    for at in frames:
        t = time.perf_counter()
        if labels == "all":
            sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress())
        else:
            sgp.add_structure(at, forces=at.get_forces())
        sgp.train()
        t_last = time.perf_counter() - t
        t_total += t_last
    return sgp, t_total, t_last


def build_exact(frames, k):
    gp = GaussianProcess([13], (R2, R3), dict(HYPS))
    for i, at in enumerate(frames):
        if i == 0:
            idx = list(range(k))
        else:
            std = gp.predict(at).force_std.max(axis=1)
            idx = [int(j) for j in np.argsort(-std, kind="stable")[:k]]
        gp.add_structure(at, forces=at.get_forces(), atom_indices=idx)
        gp.train()
    return gp


def median_predict(model, at, repeats):
    model.predict(at)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(at)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def scale_probe(frames):
    """Unit costs for the extrapolation to the issue's 50,000 labels / 2,000 inducing environments:
    seconds per (label-environment, inducing-environment) pair of K_fU through the fast kernels and
    through the general gradient kernels, and the QR of A ((n+m) x m) at a measurable size."""
    from scipy.linalg import qr_multiply

    from learner_service.kernels import kernel_blocks
    from learner_service.sparse_gp import _label_groups

    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=0)
    for at in frames[:4]:
        sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress())
        sgp.add_inducing(at, range(0, 32, 2))
    train, U = sgp._training_batch(), sgp._inducing_batch()
    groups = _label_groups(sgp._groups)
    pairs = int(np.diff(groups.ptr).sum()) * len(U)
    t = time.perf_counter()
    sgp._cov(train, groups, U)
    fast = (time.perf_counter() - t) / pairs
    t = time.perf_counter()
    kernel_blocks(train, groups, sgp._u_groups(), HYPS["ls2"], HYPS["ls3"], grad=True, batch_b=U)
    general = (time.perf_counter() - t) / pairs
    n, m = 10000, 500
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n + m, m))
    b = rng.standard_normal((1, n + m))
    t = time.perf_counter()
    qr_multiply(A, b, mode="right", overwrite_a=True)
    qr_s = time.perf_counter() - t
    coef = qr_s / (n * m * m)
    print(f"\nscale probe ({pairs} env pairs; {len(U)} inducing): K_fU fast kernels {1e6 * fast:.1f} µs/pair, "
          f"general gradient kernels {1e6 * general:.1f} µs/pair; QR of A ({n + m}x{m}) {qr_s:.2f} s "
          f"= {1e12 * coef:.1f} s per 1e12 n·m²")
    # 50,000 labels = 485 frames of 103 labels; each frame is 64 label-environments (32 force + 32 in
    # the energy/stress group) against each inducing environment
    frames_50k, m_big = 50000 / 103, 2000
    pairs_big = frames_50k * 64 * m_big
    print(f"extrapolated to 50,000 labels ({frames_50k:.0f} frames), m = {m_big} (energy functionals): "
          f"K_fU {pairs_big * fast / 3600:.2f} h once (fast kernels; incremental adds pay only the new rows "
          f"and columns), QR {coef * 50000 * m_big ** 2:.0f} s per train, one likelihood gradient "
          f"{pairs_big * general / 3600:.1f} h (general kernels); memory: K_fU 2 unit-variance copies + "
          f"A = {3 * 50000 * m_big * 8 / 2 ** 30:.1f} GiB to train, ~{13 * 50000 * m_big * 8 / 2 ** 30:.0f} GiB "
          f"for a gradient (about 13 n×m arrays)")


def machine():
    print(f"python {platform.python_version()}, nproc {os.cpu_count()}, load average {os.getloadavg()}")
    try:
        print("\n".join(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:15]))
    except OSError:
        pass


def otf_run(system: str, kind: str, seed: int, labels: int, work: Path, sparse: dict | None = None,
            until_calls: int | None = None) -> Path:
    """One on-the-fly run of the example of ``system`` with ``learner.model: kind``."""
    import yaml

    from bench_learning_curves import ROOT, SYSTEMS

    data = yaml.safe_load((ROOT / SYSTEMS[system]["config"]).read_text())
    data.update(seed=seed, name=f"{system}-{kind}-{seed}")
    data["learner"]["model"] = kind
    if kind == "sparse" and sparse:
        data["learner"]["sparse"] = {k: v for k, v in sparse.items() if not k.startswith("_")}
        if sparse.get("_calibration_scale"):  # the threshold on s·σ, s fitted at the calls
            data["calibration"] = {"scale": True}
    data.setdefault("stop", {})["max_labels"] = labels
    if until_calls is not None:
        data["learner"].setdefault("optimize", {})["until_calls"] = until_calls
    data["sampler"]["steps"] = max(int(data["sampler"]["steps"]), 1500)  # long enough to spend the budget
    cfg = work / f"{data['name']}.yaml"
    run_dir = work / data["name"]
    if (run_dir / "state.json").is_file() and cfg.is_file() and yaml.safe_load(cfg.read_text()) == data:
        st = json.loads((run_dir / "state.json").read_text())
        if st.get("oracle_calls") == labels:
            print(f"  run {data['name']}: kept from an earlier invocation (same config, {labels} calls)", flush=True)
            return run_dir
    cfg.write_text(yaml.safe_dump(data))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir),
                           "--no-report"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{data['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"  run {data['name']}: {time.perf_counter() - t:.0f} s wall; {proc.stdout.strip().splitlines()[-1]}",
          flush=True)
    return run_dir


def _held_metrics(model, frames, forces) -> dict:
    preds = [model.predict(a) for a in frames]
    err = np.array([p.forces for p in preds]) - forces
    var = np.array([p.force_std ** 2 for p in preds]) + model.noise ** 2
    z2 = err ** 2 / var
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "z2": float(np.mean(z2)), "cover2": float(np.mean(z2 <= 4.0))}


def _run_record(run_dir: Path) -> dict:
    """A run directory's labels (in training order), selections, optimised hyperparameters by label
    index, config, and the MD step of each call."""
    from coordinator.config import load_config
    from coordinator.rundir import RunDirectory

    rd = RunDirectory.open(run_dir)
    try:
        config = load_config(run_dir / "config.yaml")
        state = rd.load_state()
        events = list(rd.events())
        labels = [rd.read_label(i) for batch in state.apply_batches for i in batch]
    finally:
        rd.close()
    return {"config": config, "labels": labels, "selections": list(state.training_atoms),
            "optimised": {e["label"]: e["hyperparameters"] for e in events if e["event"] == "optimize"},
            "steps": [lab.step for lab in labels]}


def hyps_at(record: dict, k: int) -> dict:
    """The hyperparameters a run used after k calls: its latest optimisation before the k-th label."""
    hyps = dict(record["config"].learner.hyperparameters)
    for idx in sorted(record["optimised"]):
        if idx < k:
            hyps = record["optimised"][idx]
    return hyps


def rebuilt_curve(frames_run: dict, ks, frames, forces, kind: str = "sparse", sparse: dict | None = None,
                  hyps_run: dict | None = None, energy: bool = False, fixed_hyps: dict | None = None) -> dict:
    """{k: held-out metrics} of a ``kind`` model trained on the labels of ``frames_run``'s first k
    calls (every force for sparse, the selected atoms' for exact; with ``energy`` each call's energy
    too), inducing = ``sparse`` settings on those frames, hyperparameters of ``hyps_run`` at k
    (default: ``frames_run``'s) or ``fixed_hyps``."""
    from learner_service.model import SparseSettings, create_model

    hyps_run = hyps_run or frames_run
    config = frames_run["config"]
    species = sorted({int(z) for a in frames for z in a.numbers})
    sp = sparse if sparse is not None else dict(config.learner.sparse.__dict__)
    settings = SparseSettings(**{k: v for k, v in sp.items() if k in SparseSettings.__dataclass_fields__})
    out = {}
    labels = frames_run["labels"]
    for k in ks:
        if k > len(labels):
            break
        hyps = dict(fixed_hyps) if fixed_hyps else hyps_at(hyps_run, k)
        model = create_model(kind, species, config.learner.cutoffs, hyperparameters=hyps, sparse=settings)
        for lab, sel in zip(labels[:k], frames_run["selections"][:k]):
            model.add_frame(lab.atoms(), forces=lab.forces, selected=sel, energy=lab.energy if energy else None)
        model.train()
        out[k] = _held_metrics(model, frames, forces)
    return out


def otf_curves(run_dir: Path, ks, frames, forces, same_frames_sparse: dict | None = None) -> dict:
    """{k: metrics} of the model of ``run_dir`` after k calls, rebuilt (see the module docstring);
    with ``same_frames_sparse`` a sparse model on every force of that run's frames instead."""
    rec = _run_record(run_dir)
    if same_frames_sparse is not None:
        return rebuilt_curve(rec, ks, frames, forces, "sparse", same_frames_sparse)
    le = rec["config"].learner
    # the run's own labels: a sparse run used each call's energy as learner.sparse.labels says
    energy = le.use_energy or (le.model == "sparse" and getattr(le.sparse, "labels", "all") != "forces")
    return rebuilt_curve(rec, ks, frames, forces, le.model, None, energy=energy)


def otf_main(args) -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_learning_curves import held_out

    table_ks = sorted({k for k in (1, 2, 4, 6, 8, 12, 16, 24, 32, args.labels) if k <= args.labels})
    ks = list(range(1, args.labels + 1))  # every k: calls to reach exact's final RMSE per seed
    print(f"optimize.until_calls: {args.until_calls or 'as the example'}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_sparse_otf_"))
    work.mkdir(parents=True, exist_ok=True)
    summary = {}
    sparse = {"inducing_rule": args.sparse_rule, "per_call": args.per_frame, "functionals": args.functionals,
              "labels": args.sparse_labels}
    if args.sparse_rule == "variance":
        sparse["tolerance"] = args.tolerance
    if args.calibration_scale:
        sparse["_calibration_scale"] = True
    kinds = args.kinds.split(",")
    print(f"sparse settings: {sparse} (learner.sparse); budget {args.labels} calls; seeds {args.seeds}; "
          f"runs {kinds}")
    for system in args.systems.split(","):
        frames, forces = held_out(system)
        curves = {"exact": [], "sparse": [], "sparse on the exact run's frames": []}
        calls = {"exact": [], "sparse": []}
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        for seed in seeds:
            for kind in kinds:
                rd = otf_run(system, kind, seed, args.labels, work, sparse, args.until_calls)
                if args.runs_only:
                    continue
                # every k for the sparse run (calls to reach exact's final RMSE), the table's k otherwise
                curves[kind].append(otf_curves(rd, ks if kind == "sparse" else table_ks, frames, forces))
                st = json.loads((rd / "state.json").read_text())
                calls[kind].append((st["oracle_calls"], (st.get("walkers") or {}).get("w0", {}).get("step")))
                if kind == "exact" and args.same_frames:
                    curves["sparse on the exact run's frames"].append(otf_curves(rd, table_ks, frames, forces, sparse))
        if args.runs_only:
            continue
        curves = {k: v for k, v in curves.items() if v}
        print(f"\n### {system}: median over {args.seeds} seeds (held-out: {len(frames)} frames)\n")
        print("| k calls | " + " | ".join(f"{n}: RMSE eV/Å · z² · 2σ" for n in curves) + " |")
        print("|---:|" + "---:|" * len(curves))
        for k in table_ks:
            cells = []
            for name, cs in curves.items():
                vals = [c[k] for c in cs if k in c]
                if not vals:
                    cells.append("—")
                    continue
                m = {q: statistics.median(v[q] for v in vals) for q in ("rmse", "z2", "cover2")}
                cells.append(f"{m['rmse']:.4f} · {m['z2']:.2f} · {100 * m['cover2']:.0f} %")
            print(f"| {k} | " + " | ".join(cells) + " |")
        if "exact" in curves:
            print(f"\nper seed: exact's RMSE after {args.labels} calls, and the first k at which each sparse "
                  f"curve is at or below it (goal: k <= {args.labels // 2})")
            for i, seed in enumerate(seeds):
                final = curves["exact"][i][args.labels]
                parts = [f"seed {seed}: exact {final['rmse']:.4f} eV/Å (z² {final['z2']:.2f}, 2σ "
                         f"{100 * final['cover2']:.0f} %)"]
                for name in ("sparse", "sparse on the exact run's frames"):
                    if name not in curves:
                        continue
                    c = curves[name][i]
                    reach = next((k for k in ks if k in c and c[k]["rmse"] <= final["rmse"]), None)
                    last = c[max(c)]
                    parts.append(f"{name}: reaches it at k = {reach if reach else '>' + str(max(c))}"
                                 f"{'' if name == 'sparse' else ' (of the table k)'}; after "
                                 f"{max(c)}: {last['rmse']:.4f} eV/Å, z² {last['z2']:.2f}, 2σ "
                                 f"{100 * last['cover2']:.0f} %")
                print("; ".join(parts))
        print(f"(oracle calls, MD step of the last frame) per seed: {calls}")
        summary[system] = {"curves": curves, "calls": calls}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))


def diagnose(work: Path, ks) -> None:
    """Why a sparse run learns less per call than a sparse model on the exact run's frames: for each
    pair of run directories ``SYSTEM-exact-SEED`` / ``SYSTEM-sparse-SEED`` in ``work``, sparse models
    rebuilt with each factor swapped in turn -- frames (the sparse run's or the exact run's),
    hyperparameters (either run's at k), energy labels (with or without)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_learning_curves import held_out

    for exact_dir in sorted(work.glob("*-exact-*")):
        if not exact_dir.is_dir():
            continue
        system, seed = exact_dir.name.split("-exact-")
        sparse_dir = work / f"{system}-sparse-{seed}"
        if not sparse_dir.is_dir():
            continue
        frames, forces = held_out(system)
        ex, sp = _run_record(exact_dir), _run_record(sparse_dir)
        settings = dict(sp["config"].learner.sparse.__dict__)
        sp_energy = getattr(sp["config"].learner.sparse, "labels", "all") != "forces"
        curves = {
            "exact run": rebuilt_curve(ex, ks, frames, forces, "exact"),
            f"sparse run (own frames, own hyps, energy {sp_energy})": rebuilt_curve(sp, ks, frames, forces, "sparse",
                                                                                   energy=sp_energy),
            "own frames, own hyps, forces": rebuilt_curve(sp, ks, frames, forces, "sparse"),
            "own frames, exact's hyps, forces": rebuilt_curve(sp, ks, frames, forces, "sparse", hyps_run=ex),
            "exact's frames, exact's hyps, forces": rebuilt_curve(ex, ks, frames, forces, "sparse", settings),
            "exact's frames, exact's hyps, energy": rebuilt_curve(ex, ks, frames, forces, "sparse", settings,
                                                                  energy=True),
            "exact's frames, sparse run's hyps, forces": rebuilt_curve(ex, ks, frames, forces, "sparse", settings,
                                                                       hyps_run=sp),
        }
        print(f"\n### diagnosis {system} seed {seed}: RMSE eV/Å · mean z² · 2σ coverage\n")
        print("| k | " + " | ".join(curves) + " |")
        print("|---:|" + "---:|" * len(curves))
        for k in ks:
            cells = [f"{c[k]['rmse']:.4f} · {c[k]['z2']:.2f} · {100 * c[k]['cover2']:.0f} %" if k in c else "—"
                     for c in curves.values()]
            print(f"| {k} | " + " | ".join(cells) + " |")
        for name, rec in (("exact", ex), ("sparse", sp)):
            last = hyps_at(rec, max(ks) + 1)
            print(f"{name} run: MD steps of the calls {rec['steps']}; hyperparameters after the last "
                  f"optimisation: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    ap.add_argument("--per-frame", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="inducing_tolerance: residual/prior local-energy variance below which no environment is added "
                         "(--otf with --sparse-rule variance: learner.sparse.tolerance)")
    ap.add_argument("--functionals", default="energy", choices=("energy", "energy_force"))
    ap.add_argument("--optimize-at", type=int, default=0, help="also optimise the sparse model at this N (slow)")
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--scale-probe", action="store_true", help="only the unit costs and the extrapolation")
    ap.add_argument("--otf", action="store_true", help="exact vs sparse on-the-fly runs (module docstring)")
    ap.add_argument("--until-calls", type=int, default=None,
                    help="--otf: learner.optimize.until_calls of both runs (default: the example's)")
    ap.add_argument("--sparse-rule", default="acquisition", choices=("acquisition", "variance"),
                    help="--otf: learner.sparse.inducing_rule (variance: up to --per-frame per call)")
    ap.add_argument("--sparse-labels", default="all", choices=("forces", "forces+energy", "all"),
                    help="--otf: learner.sparse.labels of the sparse runs")
    ap.add_argument("--calibration-scale", action="store_true",
                    help="--otf: the sparse runs with calibration.scale (threshold on s·σ, s fitted at the calls)")
    ap.add_argument("--kinds", default="exact,sparse", help="--otf: which runs (comma-separated: exact, sparse)")
    ap.add_argument("--runs-only", action="store_true", help="--otf: only the runs (kept with --keep), no curves")
    ap.add_argument("--no-same-frames", dest="same_frames", action="store_false",
                    help="--otf: skip the curve of a sparse model on the exact run's frames")
    ap.add_argument("--systems", default="al_melt,cu3au")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--labels", type=int, default=16, help="oracle-call budget per on-the-fly run")
    ap.add_argument("--keep", help="keep the run directories here")
    ap.add_argument("--json", help="write the --otf curves to this file")
    ap.add_argument("--diagnose", help="only the factor-by-factor rebuild of the run pairs kept in this directory "
                                       "(an earlier --otf --keep DIR)")
    args = ap.parse_args(argv)
    if args.diagnose:
        diagnose(Path(args.diagnose), sorted({k for k in (1, 2, 4, 6, 8, 12, 16, 24, 32, args.labels)
                                              if k <= args.labels}))
        return
    if args.otf:
        machine()
        otf_main(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    machine()
    print(f"inducing: {args.functionals} functionals, up to {args.per_frame} per frame, tolerance {args.tolerance:g}")
    frames = perturbed_fcc_al(max(sizes + [4]), seed=0)
    if args.scale_probe:
        scale_probe(frames)
        return
    test = perturbed_fcc_al(20, seed=1)
    t = time.perf_counter()
    warm = SparseGaussianProcess([13], (R2, R3), dict(HYPS))
    warm.add_structure(frames[0], forces=frames[0].get_forces(), energy=frames[0].get_potential_energy(),
                       stress=frames[0].get_stress())
    warm.train().predict(test[0])
    print(f"imports {t - T0:.2f} s, JIT warm-up {time.perf_counter() - t:.2f} s")
    print()
    print("| calls N | labels | m | add+train total (s) | last add+train (s) | predict 32 atoms (ms) | "
          "peak traced MiB | sparse RMSE (eV/Å) | z² / 2σ cover | sparse, forces only: RMSE | z² / cover | exact k=1 RMSE | z² / cover | "
          "exact k=4 RMSE | z² / cover |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in sizes:
        tracemalloc.start()
        sgp, t_total, t_last = build_sparse(frames[:n], args.per_frame, args.tolerance, args.functionals)
        peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
        t_pred = median_predict(sgp, test[0], args.repeats)
        ms = metrics(sgp, test)
        row = {"n": n, "labels": sgp.n_labels, "m": sgp.n_inducing, "t_total": t_total, "t_last": t_last,
               "t_pred": t_pred, "peak_mib": peak, "sparse": ms}
        cells = [f"{n}", f"{sgp.n_labels}", f"{sgp.n_inducing}", f"{t_total:.2f}", f"{t_last:.3f}",
                 f"{1e3 * t_pred:.1f}", f"{peak:.1f}", f"{ms['rmse']:.4f}", f"{ms['z2']:.2f} / {ms['cover2']:.2f}"]
        mf = metrics(build_sparse(frames[:n], args.per_frame, args.tolerance, args.functionals, "forces")[0], test)
        row["sparse_forces"] = mf
        cells += [f"{mf['rmse']:.4f}", f"{mf['z2']:.2f} / {mf['cover2']:.2f}"]
        if not args.no_exact:
            for k in (1, 4):
                me = metrics(build_exact(frames[:n], k), test)
                row[f"exact{k}"] = me
                cells += [f"{me['rmse']:.4f}", f"{me['z2']:.2f} / {me['cover2']:.2f}"]
        rows.append(row)
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nmax RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if not args.no_exact:
        final1, final4 = rows[-1]["exact1"]["rmse"], rows[-1]["exact4"]["rmse"]
        for k, final in ((1, final1), (4, final4)):
            for key in ("sparse", "sparse_forces"):
                reach = next((r["n"] for r in rows if r[key]["rmse"] <= final), None)
                print(f"exact GP k={k} after {rows[-1]['n']} calls: RMSE {final:.4f} eV/Å; {key} reaches it after "
                      f"{reach} calls" if reach else f"exact GP k={k} ({final:.4f} eV/Å): {key} does not reach it")
    if args.optimize_at:
        n_opt = args.optimize_at
        sgp, _, _ = build_sparse(frames[:n_opt], args.per_frame, args.tolerance, args.functionals)
        t = time.perf_counter()
        v, g = sgp.log_likelihood(gradient=True)
        t_grad = time.perf_counter() - t
        res = sgp.optimize(max_iterations=50)
        ms = metrics(sgp.train(), test)
        print(f"\nlikelihood + gradient at N={n_opt} ({sgp.n_labels} labels, m={sgp.n_inducing}): {t_grad:.2f} s")
        print(f"optimisation: {res}")
        print(f"after optimisation: RMSE {ms['rmse']:.4f} eV/Å, z² {ms['z2']:.2f}, 2σ cover {ms['cover2']:.2f}")


if __name__ == "__main__":
    main()
