"""Concurrent learning benchmark (issue 11): walkers × oracle processes, and a run to 5,000 environments.

``throughput`` (default): for each (W walkers, P oracle processes) with W ≥ P, one on-the-fly run
of 32-atom FCC Al through separate processes on loopback — P EMT oracles with ``latency_s`` seconds
of latency each (a stand-in for DFT), one learner, one sampler, every server capped at 4 MiB per
message — and the coordinator in this process.  The walkers form a temperature ladder (300–1200 K,
NVE, 5 fs) and share a fixed total of MD steps.  Printed per run: labels, wall time, label throughput
(labels per hour, while labelling), oracle utilisation (oracle busy time / (P × wall time)), and the
final model's force RMSE on one common held-out EMT trajectory (Langevin at 900 K, 20 frames).
Goal: with a 2 s oracle, throughput ≥ 0.8·P × the (W=1, P=1) figure, at equal or lower RMSE per label.

``scale``: one on-the-fly run to ``--target-envs`` training environments (108-atom Al, many atoms per
call, hyperparameters frozen after the first calls), every server capped at 4 MiB per message (a larger
message fails the run), printing per label batch: N, AddData+checkpoint seconds, run-directory bytes,
learner model-directory bytes and the learner's peak RSS.

With ``--labels N`` every run stops after N labels (``stop.max_labels``) instead of after a fixed number
of MD steps: the throughput is then measured while labels are wanted (with a fixed number of steps, a
run whose model has converged spends its tail without oracle calls, which measures the model, not the
concurrency), and the RMSE is compared at equal labels.

Usage:
  python benchmarks/bench_concurrent.py [--latency 2] [--steps 800] [--pairs 1x1,2x2,4x4,8x8] [--labels 40]
  python benchmarks/bench_concurrent.py scale [--target-envs 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}
CUTOFFS = (5.0, 3.5)
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def processes(specs: list[list[str]], cwd: Path):
    """Start ``epicycle serve ...`` processes; yield their addresses; SIGTERM them at the end."""
    procs, addresses = [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for args in specs:
            port = free_port()
            log = open(cwd / f"serve-{port}.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", *args,
                                           "--port", str(port), "--max-message-mb", "4"],
                                          cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
            addresses.append(f"127.0.0.1:{port}")
        yield addresses, procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def held_out(n_frames: int = 20, temperature: float = 900.0, seed: int = 7):
    """One common test trajectory: 32-atom Al, EMT Langevin MD at ``temperature`` K, every 10th step."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 5 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    dyn.run(200)  # equilibrate
    frames, forces = [], []
    for _ in range(n_frames):
        dyn.run(10)
        frames.append(atoms.copy())
        forces.append(atoms.get_forces().copy())
    return frames, np.array(forces)


def model_rmse(model_dir: Path, frames, forces) -> float:
    from learner_service.gp import GaussianProcess

    gp = GaussianProcess.load(model_dir)
    pred = np.array([gp.predict(a).forces for a in frames])
    return float(np.sqrt(np.mean((pred - forces) ** 2)))


def run_coordinator(data: dict, run_dir: Path):
    from coordinator.config import parse_config
    from coordinator.cycle import OnTheFlyRun, Progress
    from coordinator.rundir import RunDirectory
    from coordinator.services import OraclePool, Services

    config = parse_config(data)
    rd = RunDirectory.create(run_dir, yaml.safe_dump(config.to_dict()))
    pool = OraclePool(list(config.oracle.addresses), config.oracle.timeout_s, config.oracle.attempts)
    services = Services(oracle=pool, learner_address=config.learner.address,
                        sampler_addresses=list(config.sampler.addresses), oracle_workers=len(config.oracle.addresses))
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        state = OnTheFlyRun(config, rd, services, Progress(config.sampler.steps, 5.0, quiet=True)).run()
    finally:
        pool.close()
        rd.close()
    return state, rd, time.perf_counter() - t0, time.process_time() - cpu0


def throughput_run(W: int, P: int, steps_total: int, latency: float, tmp: Path, test, labels: int = 0,
                   temperature: float | None = None, threshold: float | None = None) -> dict:
    work = tmp / f"W{W}P{P}"
    work.mkdir()
    if temperature is not None:  # every walker at the same temperature (seeds differ)
        walkers = [{"name": f"w{i}", "temperature_K": temperature} for i in range(W)]
    else:  # a ladder
        temps = [float(t) for t in np.linspace(300.0, 1200.0, W)] if W > 1 else [600.0]
        walkers = {"temperatures": temps}
    learner_args = ["learner", "--species", "Al", "--cutoffs", ",".join(map(str, CUTOFFS)),
                    "--hyperparameters", ",".join(str(HYPS[k]) for k in ("sig2", "ls2", "sig3", "ls3", "noise")),
                    "--model-dir", str(work / "learner")]
    with processes([["oracle", "--backend", "emt", "--set", f"latency_s={latency}"] for _ in range(P)], work) as (
            oracles, _), processes([learner_args], work) as (learners, lprocs):
        with processes([["sampler", "--learner", learners[0]]], work) as (samplers, _):
            data = {
                "name": f"W{W}P{P}", "seed": 1,
                "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
                "oracle": {"addresses": oracles, "timeout_s": 120, "max_in_flight": P},
                "learner": {"address": learners[0], "cutoffs": list(CUTOFFS), "hyperparameters": HYPS,
                            "optimize": {"every": 4, "until_calls": 40, "max_iterations": 10}},
                "sampler": {"addresses": samplers, "ensemble": "nve", "timestep_fs": 5.0,
                            "steps": 100_000 if labels else max(1, steps_total // W), "frame_interval": 10,
                            "checkpoint_interval": 50},
                "walkers": walkers,
                "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "atoms_per_call": 1},
            }
            if labels:  # a label budget: the first frame + `labels` labels of uncertain frames
                data["stop"] = {"max_labels": labels + 1}
            if threshold:  # a fixed absolute threshold and fixed hyperparameters: demand stays above supply
                data["policy"].update(sigma_factor=None, absolute_threshold=threshold)  # absolute alone
                data["learner"]["optimize"] = {"every": 0}
            _wait_serving(oracles + learners + samplers)
            state, rd, wall, cpu = run_coordinator(data, work / "run")
            rss = peak_rss_mib(lprocs[0].pid)
    events = list(rd.events())
    calls = [e for e in events if e["event"] == "oracle_call" and e["label"] > 0]
    t_first = next(e["wall_time"] for e in events if e["event"] == "oracle_call")
    t_end = next(e["wall_time"] for e in events if e["event"] == "run_finished")
    busy = sum(e["seconds"] for e in calls)
    span = t_end - t_first
    md_steps = sum(int(w.get("step", 0)) for w in state.walkers.values())
    if labels:  # the span in which labels were wanted: first label of an uncertain frame to the last
        span = calls[-1]["wall_time"] - (calls[0]["wall_time"] - calls[0]["seconds"])
    return {"W": W, "P": P, "labels": len(calls), "wall_s": wall, "coordinator_cpu_s": cpu, "md_steps": md_steps,
            "labels_per_hour": 3600.0 * len(calls) / span if span > 0 else float("nan"),
            "utilisation": busy / (P * span) if span > 0 else float("nan"),
            "steps_per_walker": data["sampler"]["steps"], "rmse": model_rmse(work / "learner", *test),
            "dedup": state.counters.get("deduplicated", 0), "dropped": state.counters.get("dropped", 0),
            "batches": len(state.apply_batches), "learner_peak_rss_mib": rss}


def _wait_serving(addresses: list[str], timeout: float = 120.0) -> None:
    from protos.client import make_channel, wait_until_serving

    for a in addresses:
        ch = make_channel(a)
        try:
            wait_until_serving(ch, "", timeout)
        finally:
            ch.close()


def throughput(args) -> int:
    pairs = [tuple(int(x) for x in p.split("x")) for p in args.pairs.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"oracle latency {args.latency} s; walkers "
          + (f"all at {args.temperature:g} K" if args.temperature else "a 300-1200 K ladder") + "; "
          + (f"threshold {args.threshold} eV/Å, fixed hyperparameters; " if args.threshold else "")
          + (f"a budget of {args.labels} labels per run" if args.labels else
                                                  f"{args.steps} MD steps in total per run"), flush=True)
    test = held_out()
    tmp = Path(tempfile.mkdtemp(prefix="bench-concurrent-"))
    rows = []
    try:
        for W, P in pairs:
            row = throughput_run(W, P, args.steps, args.latency, tmp, test, args.labels, args.temperature,
                                 args.threshold)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    base = next((r for r in rows if r["W"] == 1 and r["P"] == 1), None)
    print("\n| W | P | labels | MD steps | wall (s) | labels/h | ×(1,1) | goal 0.8·P | oracle utilisation | "
          "RMSE (eV/Å) | deduplicated | batches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["labels_per_hour"] / base["labels_per_hour"] if base else float("nan")
        print(f"| {r['W']} | {r['P']} | {r['labels']} | {r['md_steps']} | {r['wall_s']:.0f} | {r['labels_per_hour']:.0f} | "
              f"{ratio:.2f} | {0.8 * r['P']:.1f} | {r['utilisation']:.0%} | {r['rmse']:.4f} | {r['dedup']} | "
              f"{r['batches']} |")
    return 0


def scale(args) -> int:
    """One on-the-fly run to ``target_envs`` environments; sizes of messages capped at 4 MiB by every server."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    per_call = args.atoms_per_call
    max_labels = 1 + (args.target_envs - 16) // per_call + 1
    learner_args = ["learner", "--species", "Al", "--cutoffs", ",".join(map(str, CUTOFFS)),
                    "--hyperparameters", ",".join(str(HYPS[k]) for k in ("sig2", "ls2", "sig3", "ls3", "noise")),
                    "--model-dir", str(tmp / "learner")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; target "
          f"{args.target_envs} environments, {per_call} per label, 108-atom Al", flush=True)
    try:
        with processes([["oracle", "--backend", "emt"] for _ in range(2)], tmp) as (oracles, _), \
                processes([learner_args], tmp) as (learners, lprocs):
            with processes([["sampler", "--learner", learners[0]]], tmp) as (samplers, _):
                data = {
                    "name": "scale", "seed": 3,
                    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [3, 3, 3],
                                  "rattle": 0.05},
                    "oracle": {"addresses": oracles, "timeout_s": 600, "max_in_flight": 2},
                    "learner": {"address": learners[0], "cutoffs": list(CUTOFFS), "hyperparameters": HYPS,
                                "optimize": {"every": 1, "until_calls": 3, "max_iterations": 20}},
                    "sampler": {"addresses": samplers, "ensemble": "nvt_langevin", "timestep_fs": 5.0,
                                "temperature_K": 900.0, "steps": 100000, "frame_interval": 25,
                                "checkpoint_interval": 50},
                    "walkers": {"temperatures": [700.0, 1300.0]},
                    "policy": {"absolute_threshold": 1e-4, "initial_atoms": 16, "atoms_per_call": per_call,
                               "dedupe": False},
                    "stop": {"max_labels": max_labels},
                }
                _wait_serving(oracles + learners + samplers)
                from coordinator import cycle as cycle_module

                original_apply = cycle_module.OnTheFlyRun._apply
                rows = []

                def timed_apply(self, labels):
                    t0 = time.perf_counter()
                    original_apply(self, labels)
                    rows.append({"n_env": self.n_environments, "labels": self.state.labels_applied,
                                 "apply_s": time.perf_counter() - t0,
                                 "run_dir_mib": dir_bytes(self.rd.path) / MIB,
                                 "learner_dir_mib": dir_bytes(tmp / "learner") / MIB,
                                 "learner_peak_rss_mib": peak_rss_mib(lprocs[0].pid)})
                    print(json.dumps(rows[-1]), flush=True)

                cycle_module.OnTheFlyRun._apply = timed_apply
                try:
                    state, rd, wall, cpu = run_coordinator(data, tmp / "run")
                finally:
                    cycle_module.OnTheFlyRun._apply = original_apply
        print(f"\nreached {rows[-1]['n_env']} environments in {state.oracle_calls} labels, {wall:.0f} s wall; "
              f"no message over 4 MiB (every server capped); run directory {dir_bytes(tmp / 'run') / MIB:.1f} MiB, "
              f"learner directory {dir_bytes(tmp / 'learner') / MIB:.1f} MiB, learner peak RSS "
              f"{rows[-1]['learner_peak_rss_mib']:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="throughput", choices=("throughput", "scale"))
    ap.add_argument("--latency", type=float, default=2.0, help="oracle latency, s (default 2)")
    ap.add_argument("--steps", type=int, default=800, help="MD steps per run, summed over walkers (default 800)")
    ap.add_argument("--pairs", default="1x1,2x1,2x2,4x2,4x4,8x4,8x8", help="WxP pairs (walkers x oracle processes)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="every walker at this temperature, K (default: a 300-1200 K ladder; one walker: 600 K)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="absolute σ threshold, eV/Å, with hyperparameters held at their start values (default: "
                         "1·σn, re-optimised every 4 labels); a low one keeps the oracle pool the bottleneck")
    ap.add_argument("--labels", type=int, default=0,
                    help="a label budget per run instead of a fixed number of MD steps (0: off): throughput is "
                         "measured while labels are wanted, and RMSE compared at equal labels")
    ap.add_argument("--target-envs", type=int, default=5000, help="scale: training environments to reach")
    ap.add_argument("--atoms-per-call", type=int, default=40, help="scale: environments added per label")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed temp dir)")
    args = ap.parse_args()
    return throughput(args) if args.mode == "throughput" else scale(args)


if __name__ == "__main__":
    sys.exit(main())
