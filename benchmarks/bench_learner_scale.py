"""Learner at scale (issue #11 part 3): grow a model to 5,000 force environments through a
real learner server with AddDataBatch and a Checkpoint after every batch.

The learner runs in its own process (``start_learner_server`` on 127.0.0.1, messages capped
at 4 MiB both ways, a model directory); this script is the client.  Per step it prints N
(force environments), AddDataBatch wall and learner-CPU seconds, Checkpoint seconds and
bytes, the model directory's size, the learner's RSS and peak RSS (VmRSS / VmHWM from
/proc/PID/status; the peak is reset before each AddDataBatch, so it is that call's peak)
and the largest request/response so far.  Frames: 108-atom fcc Al
(3x3x3 cubic cells, a = 4.05 Å, isotropic strain ±2 %, atoms rattled by a Gaussian of
σ = 0.1 Å), EMT labels, ``--per-frame`` environments of each frame, ``--frames-per-batch``
frames per AddDataBatch; cutoffs 5.0/3.5 Å.  Hyperparameters are optimised once
(``--optimize-at`` environments, linear space, 10 iterations) and then frozen.

At the end the learner is killed (SIGKILL) and a new one is started on the same model
directory: the rebuild time, its peak RSS, and whether its predictions equal the old
learner's bit for bit are printed.

    .venv/bin/python benchmarks/bench_learner_scale.py --target 5000 --out /tmp/scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
HYPS = {"sig2": 0.2, "ls2": 1.0, "sig3": 0.02, "ls3": 0.8, "noise": 0.05}

SERVER = r"""
import json, sys, time
from pathlib import Path
from learner_service.server import LearnerServiceConfig, start_learner_server
from protos.server import ServerConfig
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
running = start_learner_server(LearnerServiceConfig(
    species=(13,), cutoffs=(5.0, 3.5), hyperparameters=cfg["hyps"], model_dir=Path(cfg["model_dir"]),
    kernel_cache_max_rows=cfg["cache_rows"],
    server=ServerConfig(host="127.0.0.1", port=0, max_message_bytes=cfg["max_message"])))
print("ADDRESS", running.address, time.perf_counter() - t0, flush=True)
while True:
    time.sleep(3600)
"""


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: ``5`` into /proc/PID/clear_refs),
    so the next VmHWM is the peak of what runs in between; False where not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_learner(model_dir: Path, cache_rows, max_message: int):
    cfg = json.dumps({"hyps": HYPS, "model_dir": str(model_dir), "cache_rows": cache_rows,
                      "max_message": max_message})
    proc = subprocess.Popen([sys.executable, "-c", SERVER, cfg], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    t0 = time.perf_counter()
    for line in proc.stdout:
        if line.startswith("ADDRESS"):
            _, address, _ = line.split()
            return proc, address, time.perf_counter() - t0
        print("   [learner]", line.rstrip(), flush=True)
    raise RuntimeError(f"learner exited with {proc.wait()}")


def frames(seed: int, count: int):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((3, 3, 3))
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-0.02, 0.02)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
        calc = atoms.copy()
        calc.calc = EMT()
        out.append((atoms, calc.get_forces(), calc.get_potential_energy(), calc.get_stress()))
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summarize(path: Path, at=(100, 500, 1000, 1600, 2000, 2700, 3000, 4000, 5000)) -> None:
    """Markdown table of a --out file: per target N the medians over the 5 steps nearest to it
    (the step that ran Optimize excluded from the AddData columns)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r]
    final = next((r for r in rows if r.get("final")), {})
    print("| N (envs) | rows | AddDataBatch wall s | learner CPU s | Checkpoint s | checkpoint bytes | model dir MiB |"
          " RSS after add MiB | peak RSS during the AddData MiB | peak RSS so far MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in at:
        near = sorted(steps, key=lambda r: abs(r["n_environments"] - n))[:5]
        if not near or abs(near[0]["n_environments"] - n) > 100:
            continue
        near.sort(key=lambda r: r["n_environments"])
        adds = [r for r in near if "optimize_s" not in r] or near
        exact = min(near, key=lambda r: abs(r["n_environments"] - n))
        med = lambda key, rs=near: float(np.median([r[key] for r in rs]))  # noqa: E731
        print(f"| {exact['n_environments']} ({near[0]['n_environments']}–{near[-1]['n_environments']}) | "
              f"{exact['n_labels']} | {med('add_wall_s', adds):.2f} | {med('add_learner_cpu_s', adds):.2f} | "
              f"{med('checkpoint_s'):.3f} | {med('checkpoint_bytes'):.0f} | {exact['dir_bytes'] / MiB:.2f} | "
              f"{exact['rss_bytes'] / MiB:.0f} | {exact.get('add_peak_rss_bytes', float('nan')) / MiB:.0f} | "
              f"{exact['peak_rss_bytes'] / MiB:.0f} |")
    largest = max(max(r["largest_request_bytes"], r["largest_response_bytes"]) for r in steps)
    print(f"\nlargest message {largest} B; final: {json.dumps(final)}")


def main(argv=None) -> int:
    from learner_service.client import LearnerClient
    from protos import wire
    from protos.client import make_channel
    from protos.epicycle.v1 import learner_pb2, learner_pb2_grpc

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=int, default=5000, help="force environments to reach")
    ap.add_argument("--per-frame", type=int, default=25, help="environments taken from each 108-atom frame")
    ap.add_argument("--frames-per-batch", type=int, default=3)
    ap.add_argument("--optimize-at", type=int, default=300, help="optimise hyperparameters once at this N (0: never)")
    ap.add_argument("--cache-rows", type=int, default=None, help="kernel_cache_max_rows (default: the GP's)")
    ap.add_argument("--model-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--out", type=Path, default=None, help="also write one JSON line per step here")
    ap.add_argument("--no-restart", action="store_true", help="skip the kill -9 / rebuild at the end")
    ap.add_argument("--restarts", type=int, default=1, help="kill -9 / rebuild this many times (default 1)")
    ap.add_argument("--summarize", type=Path, default=None,
                    help="only print the markdown summary of a --out file (medians of 5 steps around each N)")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_scale_")
        model_dir = Path(tmp) / "model"
    out = open(args.out, "w") if args.out else None
    proc, address, ready = start_learner(model_dir, args.cache_rows, 4 * MiB)
    print(f"learner pid {proc.pid} ready in {ready:.1f} s at {address}; model dir {model_dir}", flush=True)
    channel = make_channel(address, max_message_bytes=4 * MiB)
    stub = learner_pb2_grpc.LearnerStub(channel)
    largest = {"request": 0, "response": 0}

    def call(name, request, timeout=7200):
        largest["request"] = max(largest["request"], request.ByteSize())
        reply = getattr(stub, name)(request, timeout=timeout)
        largest["response"] = max(largest["response"], reply.ByteSize())
        return reply

    test_atoms = frames(10_000, 1)[0][0]
    print("|     N | AddData wall s | learner CPU s | Checkpoint s | ckpt bytes | dir MiB | RSS MiB |"
          " peak RSS MiB (this AddData / so far) | largest req/resp bytes |", flush=True)
    print("|------:|------:|------:|------:|------:|------:|------:|------:|------:|", flush=True)
    n, step, optimized, overall_peak = 0, 0, False, 0
    rows = []
    try:
        while n < args.target:
            req = learner_pb2.AddDataBatchRequest()
            k = min(args.per_frame, args.target - n)
            per_batch = frames(step, args.frames_per_batch)
            for atoms, forces, energy, stress in per_batch:
                take = min(k, args.target - n - sum(len(i.atom_indices) for i in req.items))
                if take <= 0:
                    break
                idx = np.random.default_rng(step).choice(len(atoms), size=take, replace=False)
                req.items.append(LearnerClient.add_data_request(atoms, forces, idx, energy, stress))
            overall_peak = max(overall_peak, proc_status(proc.pid)["VmHWM"])
            per_call = reset_peak(proc.pid)
            cpu0, t0 = proc_cpu(proc.pid), time.perf_counter()
            reply = call("AddDataBatch", req)
            add_wall, add_cpu = time.perf_counter() - t0, proc_cpu(proc.pid) - cpu0
            n = reply.n_environments
            status_after_add = proc_status(proc.pid)
            overall_peak = max(overall_peak, status_after_add["VmHWM"])
            opt = None
            if args.optimize_at and not optimized and n >= args.optimize_at:
                t0 = time.perf_counter()
                o = call("Optimize", learner_pb2.OptimizeRequest(max_iterations=10, space="linear"))
                opt = (time.perf_counter() - t0, {h.name: round(h.value, 4) for h in o.hyperparameters})
                optimized = True
            ck = call("Checkpoint", learner_pb2.CheckpointRequest())
            st = proc_status(proc.pid)
            row = {"step": step, "n_environments": n, "n_labels": reply.n_labels, "add_wall_s": add_wall,
                   "add_learner_cpu_s": add_cpu, "checkpoint_s": ck.seconds, "checkpoint_bytes": ck.bytes_written,
                   "dir_bytes": dir_bytes(model_dir), "rss_bytes": status_after_add["VmRSS"],
                   "add_peak_rss_bytes": status_after_add["VmHWM"], "peak_is_per_call": per_call,
                   "peak_rss_bytes": max(overall_peak, st["VmHWM"]), "largest_request_bytes": largest["request"],
                   "largest_response_bytes": largest["response"], "items": len(req.items)}
            if opt:
                row["optimize_s"], row["hyperparameters"] = opt
            rows.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            overall_peak = row["peak_rss_bytes"]
            print(f"| {n:5d} | {add_wall:6.2f} | {add_cpu:6.2f} | {ck.seconds:6.3f} | {ck.bytes_written:8d} | "
                  f"{row['dir_bytes'] / MiB:6.1f} | {row['rss_bytes'] / MiB:7.0f} | "
                  f"{row['add_peak_rss_bytes'] / MiB:7.0f} / {row['peak_rss_bytes'] / MiB:7.0f} | "
                  f"{largest['request']}/{largest['response']} |" + (f" optimised in {opt[0]:.1f} s: {opt[1]}"
                                                                      if opt else ""), flush=True)
            step += 1

        pred_req = learner_pb2.PredictRequest()
        wire.structure_to_proto(test_atoms, out=pred_req.structure, velocities=False)
        t0 = time.perf_counter()
        before = call("Predict", pred_req)
        predict_s = time.perf_counter() - t0
        repeat = call("Predict", pred_req)
        live_repeatable = all(np.array_equal(wire.decode_array(getattr(before.prediction, k), k),
                                             wire.decode_array(getattr(repeat.prediction, k), k))
                              for k in ("forces", "force_std"))
        print(f"live learner: the same Predict twice bit for bit equal: {live_repeatable}", flush=True)
        cond = pred_req.condition_on.add(atom_indices=list(range(0, 108, 4)))
        wire.structure_to_proto(test_atoms, out=cond.structure, velocities=False)
        t0 = time.perf_counter()
        call("Predict", pred_req)
        cond_s = time.perf_counter() - t0
        del pred_req.condition_on[:]
        info = call("GetModelInfo", learner_pb2.GetModelInfoRequest())
        print(f"\nN = {info.n_environments} ({info.n_labels} rows): Predict of a 108-atom frame {predict_s:.2f} s, "
              f"conditioned on 27 more environments {cond_s:.2f} s; largest request {largest['request']} B, "
              f"response {largest['response']} B (cap 4 MiB); model dir {dir_bytes(model_dir) / MiB:.1f} MiB; "
              f"learner peak RSS {max(overall_peak, proc_status(proc.pid)['VmHWM']) / MiB:.0f} MiB", flush=True)
        summary = {"final": True, "n_environments": info.n_environments, "predict_s": predict_s,
                   "conditioned_predict_s": cond_s,
                   "peak_rss_bytes": max(overall_peak, proc_status(proc.pid)["VmHWM"])}
        for restart in range(0 if args.no_restart else args.restarts):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            channel.close()
            t0 = time.perf_counter()
            proc, address, ready = start_learner(model_dir, args.cache_rows, 4 * MiB)
            rebuild_s = time.perf_counter() - t0
            channel = make_channel(address, max_message_bytes=4 * MiB)
            stub = learner_pb2_grpc.LearnerStub(channel)
            after = call("Predict", pred_req)
            diffs = {}
            for name in ("forces", "force_std"):
                a = wire.decode_array(getattr(before.prediction, name), name)
                b = wire.decode_array(getattr(after.prediction, name), name)
                diffs[name] = (int((a != b).sum()), float(np.abs(a - b).max()))
            same = all(count == 0 for count, _ in diffs.values())
            peak = proc_status(proc.pid)["VmHWM"]
            print(f"kill -9 and restart {restart + 1} on the model dir: ready in {rebuild_s:.1f} s (rebuild from data), "
                  f"peak RSS {peak / MiB:.0f} MiB, predictions bit for bit equal: {same} "
                  f"(differing components, max |difference| eV/Å: {diffs})", flush=True)
            summary.setdefault("restarts", []).append(
                {"restart_s": rebuild_s, "restart_peak_rss_bytes": peak, "bitwise_equal": bool(same), "diffs": diffs})
        if out:
            out.write(json.dumps(summary) + "\n")
    finally:
        channel.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out:
            out.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
