"""The run report: plots a scientist reads at a glance, and the key numbers.

* ``temperature.png`` — temperature of every walker against time with its oracle calls marked (Fig. 3a)
* ``oracle_calls.png`` — cumulative oracle calls and σn against time (Fig. 3b)
* ``rdf.png`` — radial distribution function of the early and late trajectory (Fig. 3c)
* ``errors.png`` — at every oracle call: the model's force error against its predicted σ
* ``validation_parity.png``, ``validation_reliability.png`` — the final model on the run's held-out labels
  (``heldout.xyz``, written at the end of the run; :mod:`coordinator.validate`): force RMSE, P95 |F|,
  their ratio, energy/stress errors and calibration, as ``epicycle validate`` reports for an
  independent trajectory
* ``summary.json`` and ``report.md`` — the numbers
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coordinator.rundir import RunDirectory


def radial_distribution(frames, r_max: float | None = None, bins: int = 120):
    """g(r) averaged over ``frames`` (periodic, minimum image through a neighbour list); r in Å."""
    from ase.neighborlist import neighbor_list

    if not frames:
        return np.zeros(0), np.zeros(0)
    cell = frames[0].cell
    if r_max is None:
        heights = 1.0 / np.linalg.norm(np.linalg.inv(cell.array).T, axis=1) if frames[0].pbc.all() else [12.0]
        r_max = min(6.0, 0.5 * float(np.min(heights)) if frames[0].pbc.all() else 6.0)
    edges = np.linspace(0.0, r_max, bins + 1)
    hist = np.zeros(bins)
    for atoms in frames:
        d = neighbor_list("d", atoms, r_max)
        hist += np.histogram(d, bins=edges)[0]
    n = len(frames[0])
    volume = frames[0].get_volume() if frames[0].pbc.all() else 1.0
    rho = n / volume
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = hist / (len(frames) * n * rho * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g


def summarize(run_dir: Path, wall_seconds: float | None = None) -> dict:
    rd = RunDirectory.open(run_dir)
    events = list(rd.events())
    frames = kept_frames(events)
    calls = [e for e in events if e["event"] == "oracle_call"]
    optim = [e for e in events if e["event"] == "optimize"]
    decisions = [e for e in events if e["event"] == "update_decision"]
    finished = [e for e in events if e["event"] == "run_finished"]
    state = rd.load_state()
    started = [e for e in events if e["event"] == "run_started"]
    walkers = {}
    for name, w in state.walkers.items():
        wcalls = [e for e in calls if e.get("walker") == name and e["label"] > 0]
        walkers[name] = {"steps": w.get("step", 0), "simulated_time_ps": w.get("time_fs", 0.0) / 1000.0,
                         "oracle_calls": len(wcalls), "done": bool(w.get("done"))}
        if w.get("halted"):
            walkers[name]["halted"] = w["halted"]
    count = {k: sum(1 for e in events if e["event"] == k)
             for k in ("trial_started", "rollback", "update_rejected", "walker_halted")}
    trials = None
    if count["trial_started"]:
        trials = {"trials": count["trial_started"], "rollbacks": count["rollback"],
                  "rejected": count["update_rejected"], "halted": count["walker_halted"],
                  "timestep_fs": {n: w["timestep_fs"] for n, w in state.walkers.items() if w.get("timestep_fs")}}
    summary = {
        "run_dir": str(rd.path),
        "finished": state.finished,
        "stop_reason": state.stop_reason,
        "walkers": walkers,
        "learner_checkpoint": state.learner_checkpoint,
        "frames_not_labelled": dict(state.counters),
        "steps": state.step,
        "simulated_time_ps": state.time_fs / 1000.0,
        "oracle_calls": state.oracle_calls,
        "oracle_calls_per_ps": state.oracle_calls / (state.time_fs / 1000.0) if state.time_fs > 0 else None,
        "oracle_seconds_total": float(sum(e.get("seconds", 0.0) for e in calls)),
        "training_environments": finished[-1]["n_environments"] if finished else None,
        "noise_ev_per_angstrom": decisions[-1]["noise"] if decisions else None,
        "threshold_ev_per_angstrom": decisions[-1]["threshold"] if decisions else None,
        # which rule set it: "relative" (sigma_factor·σn) or "absolute" (policy.absolute_threshold)
        "threshold_rule": next((e["rule"] for e in reversed(events) if e["event"] == "threshold"), None),
        "hyperparameters": optim[-1]["hyperparameters"] if optim else None,
        "labels_used": ["forces"] + [k for k, flag in (("energy", "use_energy"), ("stress", "use_stress"))
                                     if started and started[0].get("config", {}).get("learner", {}).get(flag)],
        "optimisations": len(optim),
        "optimisations_not_converged": sum(1 for e in optim if not e.get("converged", True)),
        "oracle_call_steps": [e["step"] for e in calls],
        "resumed": sum(1 for e in events if e["event"] == "resumed"),
        # learner.data: the training set the run started from (the first seeding; a rebuild repeats it)
        "training_seeded": next(({k: e.get(k) for k in ("sources", "frames", "environments", "summary")}
                                 for e in events if e["event"] == "training_seeded"), None),
        "trials": trials,
        "calibration": ([e for e in events if e["event"] == "calibration"] or [None])[-1],
        "model_warnings": ([e for e in events if e["event"] == "model_warnings"] or [{"warnings": []}])[-1]["warnings"],
        "temperature_K_mean_last_quarter": (float(np.mean([f["temperature_K"] for f in frames[-max(1, len(frames) // 4):]]))
                                            if frames else None),
        "force_error_at_oracle_calls_rmse": [e.get("rmse_force_error") for e in calls if "rmse_force_error" in e],
        "wall_seconds": wall_seconds if wall_seconds is not None else (
            (finished[-1]["wall_time"] - started[0]["wall_time"]) if finished and started else None),
    }
    return summary


def write_report(run_dir: str | Path, wall_seconds: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rd = RunDirectory.open(run_dir)
    events = list(rd.events())
    frames = kept_frames(events)
    calls = [e for e in events if e["event"] == "oracle_call"]
    decisions = [e for e in events if e["event"] == "update_decision"]
    trial_marks = [e for e in events if e["event"] in ("rollback", "update_rejected", "walker_halted")]
    summary = summarize(run_dir, wall_seconds)

    # simulated time of the run: one walker's own clock; with several, the calls are drawn on each walker's
    t = np.array([f["time_fs"] for f in frames]) / 1000.0
    call_t = np.array(sorted(c["time_fs"] for c in calls)) / 1000.0
    names = list(summary["walkers"]) or sorted({f.get("walker", "") for f in frames})

    fig, ax = plt.subplots(figsize=(7, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ymax = max((f["temperature_K"] for f in frames), default=1.0)
    for k, name in enumerate(names):
        colour = colours[k % len(colours)]
        wf = [f for f in frames if f.get("walker", name) == name]
        ax.plot([f["time_fs"] / 1000.0 for f in wf], [f["temperature_K"] for f in wf], lw=1.1, color=colour,
                label=f"{name}" if len(names) > 1 else "MD temperature")
        wc = [c["time_fs"] / 1000.0 for c in calls if c.get("walker", name) == name]
        if wc:
            ax.plot(wc, np.full(len(wc), ymax * (1.04 + 0.03 * k)), "v", color=colour, ms=5,
                    label="oracle call" if len(names) == 1 else None)
            if len(names) == 1:
                for x in wc:
                    ax.axvline(x, color="tab:red", lw=0.4, alpha=0.35)
    for kind, marker, colour, text in (("rollback", "x", "tab:orange", "rollback (Δt reduced)"),
                                       ("update_rejected", "X", "black", "update rejected"),
                                       ("walker_halted", "s", "black", "walker halted")):
        xs = [e["time_fs"] / 1000.0 for e in trial_marks if e["event"] == kind]
        if xs:
            ax.plot(xs, np.full(len(xs), ymax * 0.97), marker, color=colour, ms=6, ls="none", label=text)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("temperature (K)")
    ax.set_title("Temperature and oracle calls (▼)" + (" per walker" if len(names) > 1 else ""))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "temperature.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if len(call_t):
        ax.step(np.r_[call_t, t[-1] if len(t) else call_t[-1]], np.r_[np.arange(1, len(call_t) + 1), len(call_t)],
                where="post", color="tab:red", label="cumulative oracle calls")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("oracle calls")
    ax2 = ax.twinx()
    if decisions:
        label_time = {c["label"]: c["time_fs"] for c in calls}
        dt = np.array([label_time.get(d["label"], 0.0) for d in decisions]) / 1000.0
        ax2.step(dt, [d["noise"] for d in decisions], where="post", color="tab:green", label="σn")
    ax2.set_ylabel("σn (eV/Å)", color="tab:green")
    ax.set_title("Cumulative oracle calls and noise σn")
    fig.tight_layout()
    fig.savefig(run_dir / "oracle_calls.png", dpi=120)
    plt.close(fig)

    traj = rd.read_trajectory(names[0]) if names else []
    if traj:
        k = max(1, len(traj) // 5)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        r, g = radial_distribution(traj[:k])
        ax.plot(r, g, label=f"early ({traj[0].info.get('time_fs', 0) / 1000:.2f}–"
                f"{traj[k - 1].info.get('time_fs', 0) / 1000:.2f} ps)")
        r, g = radial_distribution(traj[-k:])
        ax.plot(r, g, label=f"late ({traj[-k].info.get('time_fs', 0) / 1000:.2f}–"
                f"{traj[-1].info.get('time_fs', 0) / 1000:.2f} ps)")
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("g(r)")
        ax.set_title("Radial distribution function" + (f" (walker {names[0]})" if len(names) > 1 else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "rdf.png", dpi=120)
        plt.close(fig)

    errs = [c for c in calls if "rmse_force_error" in c]
    if errs:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([c["max_sigma"] for c in errs], [c["max_force_error"] for c in errs], "o", color="tab:purple")
        lim = max(max(c["max_sigma"] for c in errs), max(c["max_force_error"] for c in errs)) * 1.1
        ax.plot([0, lim], [0, lim], "--", color="grey", lw=0.8, label="error = σ")
        ax.set_xlabel("largest predicted σ at the oracle call (eV/Å)")
        ax.set_ylabel("largest |F_model − F_oracle| (eV/Å)")
        ax.set_title("Model error vs predicted σ")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "errors.png", dpi=120)
        plt.close(fig)

    cal = summary.get("calibration")
    if cal:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="calibrated")
        ax.plot(cal["levels"], cal["raw"]["observed"], "o-", color="tab:purple", ms=4,
                label=f"model σ (mean z² {cal['raw']['mean_squared_z']:.2f})")
        ax.plot(cal["levels"], cal["scaled"]["observed"], "s-", color="tab:green", ms=4,
                label=f"s·σ_ep, s = {cal['scale']:.2f} (mean z² {cal['scaled']['mean_squared_z']:.2f})")
        ax.set_xlabel("expected coverage of the Gaussian interval")
        ax.set_ylabel("observed coverage at the oracle calls")
        ax.set_title(f"Reliability of σ ({cal['labels']} oracle calls)")
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(run_dir / "calibration.png", dpi=120)
        plt.close(fig)

    validation = heldout_validation(run_dir)
    summary["validation"] = validation[0] if validation else None
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Epicycle run report — {run_dir.name}",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| finished | {summary['finished']} ({summary['stop_reason'] or 'not finished'}) |",
        f"| walkers | {len(summary['walkers'])} |",
        f"| MD steps | {summary['steps']} |",
        f"| simulated time | {summary['simulated_time_ps']:.3f} ps |",
        f"| oracle calls | {summary['oracle_calls']} |",
        f"| oracle time | {summary['oracle_seconds_total']:.1f} s |",
        f"| training environments | {summary['training_environments']} |",
        *([f"| started from (learner.data) | {_seed_text(summary['training_seeded'])} |"]
          if summary.get("training_seeded") else []),
        f"| noise σn | {_fmt(summary['noise_ev_per_angstrom'])} eV/Å |",
        f"| final threshold | {_fmt(summary['threshold_ev_per_angstrom'])} eV/Å"
        f"{' (' + summary['threshold_rule'] + ')' if summary.get('threshold_rule') else ''} |",
        f"| hyperparameters | {_hyperparameters_text(summary['hyperparameters'], summary.get('labels_used'))} |",
        f"| mean T, last quarter | {_fmt(summary['temperature_K_mean_last_quarter'])} K |",
        f"| uncertain frames not labelled | {_counters_text(summary['frames_not_labelled'])} |",
        f"| times resumed | {summary['resumed']} |",
        *([f"| model updates under trial | {_trial_text(summary['trials'])} |"] if summary.get("trials") else []),
        *([f"| σ at the oracle calls | {_calibration_text(cal)} |"] if cal else []),
        f"| learner checkpoint | {summary['learner_checkpoint']} |",
        f"| wall time | {_fmt(summary['wall_seconds'])} s |",
        "",
    ]
    if summary["model_warnings"]:
        lines += ["**Model warnings** (the learner's, at the end of the run):", ""]
        lines += [f"* WARNING: {w}" for w in summary["model_warnings"]]
        lines.append("")
    if len(summary["walkers"]) > 1:
        lines += ["| walker | MD steps | simulated time | oracle calls |", "|---|---|---|---|"]
        lines += [f"| {n} | {w['steps']} | {w['simulated_time_ps']:.3f} ps | {w['oracle_calls']} |"
                  for n, w in summary["walkers"].items()]
        lines.append("")
    lines += [
        "![temperature](temperature.png)",
        "",
        "![oracle calls](oracle_calls.png)",
        "",
        "![rdf](rdf.png)",
        "",
        "![errors](errors.png)",
        "",
        *(["![calibration](calibration.png)", ""] if cal else []),
    ]
    lines += validation[1] if validation else [
        "## Validation", "",
        "No held-out predictions recorded (`heldout.xyz` is written when a run finishes). For an independent "
        f"trajectory labelled by the oracle: `epicycle validate {run_dir}`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def heldout_validation(run_dir: Path) -> tuple[dict, list[str]] | None:
    """``(numbers, markdown lines)`` of the validation block on the run's held-out labels (``heldout.xyz``),
    with its two plots written; None if the run recorded none.  No GP import: the predictions are in the
    file (made by the learner at the end of the run)."""
    from coordinator import validate as v

    path = Path(run_dir) / v.HELDOUT_XYZ
    if not path.is_file():
        return None
    from ase.io import read

    frames = read(str(path), index=":")
    if not frames:
        return None
    kind = frames[0].info.get("heldout", "atoms not trained on")
    metrics, arrays = v.frames_metrics(frames)
    metrics["kind"] = str(kind)
    version = frames[0].info.get("final_model_version")
    metrics["model_version"] = None if version is None else int(version)
    v.write_plots(Path(run_dir), metrics, arrays, parity="validation_parity.png",
                  reliability="validation_reliability.png", title=f"final model, {kind}")
    if kind == "labels not trained on":
        what = (f"the final model (version {metrics['model_version']}) on {metrics['frames']} oracle label(s) it has "
                f"not trained on (every atom)")
    else:
        what = (f"the final model (version {metrics['model_version']}) on the atoms of {metrics['frames']} oracle "
                f"frame(s) that did not enter its training set (every label of this run was trained on). Their "
                f"neighbours in the same frame were trained on, and the frames are the ones the model was "
                f"uncertain about: read this as an in-run check; `epicycle validate` runs an independent "
                f"trajectory (seed 004, Table 1)")
    lines = ["## Validation on held-out labels", "", f"Validation of {what}.", ""]
    temps = [float(a.info["temperature_K"]) for a in frames if a.info.get("temperature_K")]
    metrics["mean_temperature_K"] = float(np.mean(temps)) if temps else None
    lines += v.table_lines(metrics, metrics["mean_temperature_K"])
    lines += ["", "![validation parity](validation_parity.png)", "",
              "![validation reliability](validation_reliability.png)", ""]
    return metrics, lines


def kept_frames(events) -> list[dict]:
    """The ``frame`` events of the trajectory as it stands: frames of a failed trial (policy.update:
    trial) are dropped — the walker was rolled back to the step the trial started from."""
    kept: list[dict] = []
    for e in events:
        if e["event"] == "frame":
            kept.append(e)
        elif e["event"] in ("rollback", "update_rejected", "walker_halted"):
            w, step = e.get("walker"), e.get("step", 0)
            kept = [f for f in kept if f.get("walker") != w or f["step"] <= step]
    return kept


def _seed_text(seed: dict) -> str:
    return (f"{seed['environments']} environments from {seed['frames']} frame(s) of "
            f"{', '.join(f'`{p}`' for p in seed['sources'])}")


def _calibration_text(c: dict) -> str:
    r, s = c["raw"], c["scaled"]
    return (f"mean z² {r['mean_squared_z']:.2f}, within 1σ {r['within_1_sigma']:.0%}, within 2σ "
            f"{r['within_2_sigma']:.0%} (ideal 1, 68 %, 95 %); with σ_ep × s = {c['scale']:.2f}: mean z² "
            f"{s['mean_squared_z']:.2f}, within 2σ {s['within_2_sigma']:.0%}"
            + (" — applied to the threshold" if c.get("applied") else ""))


def energy_changes_after_updates(events, n_atoms: int, steps: int = 20) -> list[float]:
    """Largest |ΔE_cons| per atom (eV/atom) within ``steps`` steps after each change of the model version
    the kept frames (:func:`kept_frames`) were integrated on; frames on oracle forces (version 0) are left
    out, as are windows of fewer than 3 frames.  What ``policy.trial`` bounds, measured on a whole run."""
    frames = [f for f in kept_frames(events) if f["model_version"] > 0]
    out = []
    for k in range(1, len(frames)):
        start = frames[k]
        if start["model_version"] == frames[k - 1]["model_version"]:
            continue
        energies = []
        for f in frames[k:]:
            if f["step"] > start["step"] + steps or f["model_version"] != start["model_version"]:
                break
            energies.append(f["conserved_eV"])
        if len(energies) > 2:
            out.append((max(energies) - min(energies)) / n_atoms)
    return out


def _trial_text(t: dict) -> str:
    return (f"{t['trials']} trials, {t['rollbacks']} rollbacks, {t['rejected']} rejected"
            + (f", {t['halted']} walker(s) halted" if t["halted"] else "")
            + (f"; Δt now {', '.join(f'{n} {dt:g} fs' for n, dt in t['timestep_fs'].items())}"
               if t["timestep_fs"] else ""))


def _hyperparameters_text(hyps: dict | None, labels_used: list | None) -> str:
    """``sig2 0.637 eV, ls2 1.2 Å, ...``; the energy/stress noises only when those labels are trained on."""
    if not hyps:
        return "–"
    from learner_service.defaults import HYPERPARAMETER_UNITS as units

    used = set(labels_used or ("forces", "energy", "stress"))
    skip = {n for n, label in (("energy_noise", "energy"), ("stress_noise", "stress")) if label not in used}
    return ", ".join(f"{n} {v:.4g} {units.get(n, '')}".rstrip() for n, v in hyps.items() if n not in skip)


def _counters_text(counters: dict) -> str:
    """``2 deduplicated, 1 dropped`` (covered by labels in flight / certain under a newer model)."""
    parts = [f"{v} {k}" for k, v in sorted(counters.items()) if k != "recomputed" and v]
    if counters.get("recomputed"):
        parts.append(f"{counters['recomputed']} in-flight label(s) recomputed after a kill")
    return ", ".join(parts) or "none"


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)
