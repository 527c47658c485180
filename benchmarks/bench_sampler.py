"""Sampler benchmark (prints a table; not a test): what the learner stream costs per MD step.

Model: a GP with ``--environments`` training environments (default 64: two 32-atom cells of
``learner_service.datasets.perturbed_fcc_al``, seed 0, EMT labels, forces only), r2 = 6 Å,
r3 = 4 Å, fixed hyperparameters (those of ``benchmarks/bench_learner.py``).  MD: FCC Al,
a = 4.05 Å, 32 atoms (2x2x2 cells) and 1,000 atoms (5x5x10 cells), NVE, Δt = 1 fs,
Maxwell–Boltzmann at 300 K, no threshold (σ is computed every step but never gates).

Force paths, each timed per step (wall time of ``engine.run(steps)`` / steps):

* ``in-process``: the engine's provider calls ``gp.predict`` on the GP object itself;
* ``stream``:     the engine's provider is ``LearnerStreamProvider``: ``Learner.PredictStream``
  over loopback to a Learner server serving that GP (saved, then loaded by the server; the
  predictions are checked to agree).  By default the learner runs in its own process, as in a
  deployment (``--learner in-process``: a server in this process, sharing the GIL);
* ``sampler+stream`` (built-in engine only): the whole service path — a Sampler server in this
  process driven through ``SamplerClient`` (``RemoteEngine``), its engine asking the learner;
  one ``Run`` call per round of ``steps`` steps, no frames (so its fixed per-call cost is
  divided by ``steps``, 2 at 32 atoms by default).

The service path's own cost, without the GP (both against the echo learner, see below):

* ``svc-echo``: one ``Run`` call of 50×``steps`` steps with a frame streamed back every step
  (the most a coordinator asks for): svc-echo − echo is the service's cost per step;
* ``call``:     ``Run`` calls of one step without frames: call − echo is the fixed cost of a call
  (request, checkpoint decode/encode, engine set-up, a new learner stream, stop report).

LAMMPS is timed with the in-process provider, against the built-in engine.

Warm-up first (numba JIT, LAMMPS load, first stream message), then ``--repeats`` rounds; in
every round each path runs ``steps`` steps in turn, so slow drifts of the machine's load hit
all paths alike.  Reported: medians over rounds, the stream's extra ms/step, and the ratio
stream / in-process (ratio of medians; in brackets the median of per-round ratios).

    python benchmarks/bench_sampler.py [--sizes 32,1000] [--repeats 5] [--steps 32:10,1000:2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk

from learner_service.datasets import perturbed_fcc_al, training_selection
from learner_service.gp import GaussianProcess
from sampler_service.engine_registry import create_engine
from sampler_service.force_providers import ForceResult
from sampler_service.learner_stream_provider import LearnerStreamProvider
from sampler_service.settings import SamplerSettings

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}
REPEATS = {32: (2, 2, 2), 1000: (5, 5, 10)}

LEARNER_SCRIPT = """
import sys
from pathlib import Path
from benchmarks.bench_sampler import start_echo_learner
from learner_service.server import LearnerServiceConfig, start_learner_server
running = start_learner_server(LearnerServiceConfig(model_path=Path(sys.argv[1])))
echo = start_echo_learner(Path(sys.argv[1]))
print(running.address, echo.address, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
running.stop(0)
echo.stop(0)
"""


def start_echo_learner(model_path: Path):
    """A Learner server whose PredictStream decodes each request as usual but answers with the
    prediction it computed for the first structure of that size it saw (on any stream): the
    stream's transport cost (encode, loopback, decode, thread hand-offs) without the GP."""
    from learner_service.servicer import LearnerServicer, ModelStore, _StreamState, _stream_structure
    from protos.epicycle.v1 import learner_pb2_grpc
    from protos.server import ServerConfig, create_server

    cached: dict = {}  # shared by all streams: a new stream (a new Sampler.Run call) costs no GP predict

    class EchoServicer(LearnerServicer):
        def PredictStream(self, request_iterator, context):
            state = _StreamState()
            for request in request_iterator:
                atoms = _stream_structure(request.structure, state)
                if len(atoms) not in cached:
                    cached[len(atoms)] = self._predict(atoms, request, "PredictStream")
                reply = cached[len(atoms)]
                reply.sequence = request.sequence
                yield reply

    servicer = EchoServicer(ModelStore(GaussianProcess.load(model_path)))

    def add(server):
        learner_pb2_grpc.add_LearnerServicer_to_server(servicer, server)
        return ["epicycle.v1.Learner"]

    running = create_server(ServerConfig(), add)
    running.mark_ready()
    return running


def build_gp(n_environments: int) -> GaussianProcess:
    frames = perturbed_fcc_al(n_environments // 32 + 1, seed=0)
    gp = GaussianProcess([13], (R2, R3), dict(HYPS))
    for frame, idx in training_selection(n_environments):
        gp.add_structure(frames[frame], forces=frames[frame].get_forces(), atom_indices=idx)
    gp.train()
    return gp


class GPProvider:
    """The in-process path: ``gp.predict`` on the engine's configuration (what the learner does per request)."""

    def __init__(self, gp: GaussianProcess, version: int = 1) -> None:
        self.gp = gp
        self.version = version

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        p = self.gp.predict(Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc))
        return ForceResult(energy=p.energy, forces=p.forces, force_std=p.force_std, noise=self.gp.noise,
                           model_version=self.version)


def al_cell(n_atoms: int) -> Atoms:
    return bulk("Al", "fcc", a=4.05, cubic=True).repeat(REPEATS[n_atoms])


def settings(engine: str) -> SamplerSettings:
    return SamplerSettings(engine=engine, ensemble="nve", timestep_fs=1.0, initial_temperature_K=300.0, seed=1)


class Learner:
    """A Learner server for the saved model: a subprocess (default) or in this process."""

    def __init__(self, model_path: Path, in_process: bool) -> None:
        self.proc = None
        self.running = None
        if in_process:
            from learner_service.server import LearnerServiceConfig, start_learner_server

            self.running = start_learner_server(LearnerServiceConfig(model_path=model_path))
            self.echo = start_echo_learner(model_path)
            self.address, self.echo_address = self.running.address, self.echo.address
        else:
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
            self.proc = subprocess.Popen([sys.executable, "-c", LEARNER_SCRIPT, str(model_path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            line = self.proc.stdout.readline().split()
            if len(line) != 2:
                raise RuntimeError("the learner subprocess did not start")
            self.address, self.echo_address = line

    def close(self) -> None:
        if self.running is not None:
            self.running.stop(0)
            self.echo.stop(0)
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


class CachedProvider:
    """The GP's prediction for the first configuration, returned for every step without the GP
    (the in-process twin of the echo learner)."""

    def __init__(self, gp: GaussianProcess) -> None:
        self.inner = GPProvider(gp)
        self.result = None

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        if self.result is None:
            self.result = self.inner.compute(positions, cell, numbers, pbc)
        return self.result


PATHS = {
    "gp": "builtin, in-process gp.predict",
    "stream": "builtin, LearnerStreamProvider -> Learner",
    "cached": "builtin, in-process cached prediction (no GP)",
    "echo": "builtin, LearnerStreamProvider -> echo Learner (no GP)",
    "sampler": "SamplerClient -> Sampler (builtin) -> Learner stream",
    "svc-echo": "SamplerClient -> Sampler -> echo Learner, one call, a frame every step",
    "call": "SamplerClient -> Sampler -> echo Learner, one-step calls without frames",
    "lammps": "lammps, in-process gp.predict",
}


def per_size(ap: argparse.ArgumentParser, flag: str, text: str, sizes: list[int]) -> dict[int, int]:
    """``"N"`` for every size, or ``"SIZE:N,SIZE:N"``; a size without an entry is an error."""
    try:
        if ":" not in text:
            return {s: int(text) for s in sizes}
        table = {int(k): int(v) for k, v in (kv.split(":") for kv in text.split(","))}
    except ValueError:
        ap.error(f"{flag} takes N or SIZE:N,SIZE:N, got {text!r}")
    missing = [s for s in sizes if s not in table]
    if missing:
        ap.error(f"{flag} has no entry for size(s) {missing}")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,1000")
    ap.add_argument("--repeats", default="32:15,1000:3", help="rounds per size: N (every size) or SIZE:N,...")
    ap.add_argument("--steps", default="32:2,1000:1", help="steps per path per round: N or SIZE:N,...")
    ap.add_argument("--environments", type=int, default=64)
    ap.add_argument("--learner", choices=("subprocess", "in-process"), default="subprocess")
    ap.add_argument("--no-lammps", action="store_true")
    ap.add_argument("--no-sampler", action="store_true", help="skip the sampler+stream path")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps_for = per_size(ap, "--steps", args.steps, sizes)
    repeats_for = per_size(ap, "--repeats", args.repeats, sizes)

    t0 = time.perf_counter()
    gp = build_gp(args.environments)
    print(f"# GP: {gp.n_environments} environments, {gp.n_labels} labels, r2={R2} Å, r3={R3} Å, "
          f"built in {time.perf_counter() - t0:.1f} s")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start; Python {platform.python_version()}")
    lammps = not args.no_lammps
    if lammps:
        try:
            from sampler_service.lammps_engine import load_lammps

            load_lammps()
        except Exception as exc:  # noqa: BLE001 - optional
            print(f"# LAMMPS not timed: {exc}")
            lammps = False

    with tempfile.TemporaryDirectory() as tmp:
        model_path = gp.save(Path(tmp) / "model.npz")
        learner = Learner(model_path, in_process=args.learner == "in-process")
        sampler = client = None
        try:
            if not args.no_sampler:
                from sampler_service.client import SamplerClient
                from sampler_service.server import SamplerServiceConfig, start_sampler_server

                sampler = start_sampler_server(SamplerServiceConfig(default_learner=learner.address))
                client = SamplerClient(sampler.address)
                client.wait_ready(30)
            print(f"# learner: {args.learner} at {learner.address} (echo {learner.echo_address})")
            for k, v in PATHS.items():
                print(f"#   {k:8} {v}")
            rows = []
            for n in sizes:
                rows.append(bench_size(n, steps_for.get(n, 1), repeats_for.get(n, 3), gp, learner, client,
                                       lammps))
        finally:
            if client is not None:
                client.close()
            if sampler is not None:
                sampler.stop(0)
            learner.close()
    print(f"\n# load average {os.getloadavg()[0]:.1f} at the end; ms/step, medians over rounds; "
          "[median of per-round ratios]")
    print(f"{'atoms':>6} {'gp':>9} {'stream':>9} {'stream/gp':>17} {'cached':>8} {'echo':>8} {'transport':>10} "
          f"{'transport/gp':>13} {'sampler':>9} {'lammps':>9} {'lammps/gp':>17}")
    for r in rows:
        m, q = r["median"], r["ratio"]
        transport = r["transport"]
        lmp = f"{m['lammps'] / m['gp']:7.3f} [{q['lammps']:.3f}]" if "lammps" in m else "-"
        print(f"{r['n']:6d} {m['gp']:9.2f} {m['stream']:9.2f} {m['stream'] / m['gp']:7.3f} [{q['stream']:.3f}] "
              f"{m['cached']:8.3f} {m['echo']:8.3f} {transport:10.3f} {transport / m['gp']:13.4f} "
              f"{_fmt(m.get('sampler')):>9} {_fmt(m.get('lammps')):>9} {lmp:>17}")
    if any("service_step" in r for r in rows):
        print("\n# the sampler service's own cost (against the echo learner; medians of per-round differences):")
        print(f"{'atoms':>6} {'svc-echo':>9} {'echo':>8} {'per step':>9} {'per step/gp':>12} {'call':>8} "
              f"{'per call':>9} {'sampler - stream':>17} {'= call/steps + step':>20}")
        for r in rows:
            if "service_step" not in r:
                continue
            m, st, ca = r["median"], r["service_step"], r["service_call"]
            print(f"{r['n']:6d} {m['svc-echo']:9.3f} {m['echo']:8.3f} {st:9.3f} {st / m['gp']:12.4f} "
                  f"{m['call']:8.3f} {ca:9.3f} {m['sampler'] - m['stream']:17.3f} "
                  f"{ca / r['steps'] + st:20.3f}")


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def bench_size(n, steps, repeats, gp, learner, client, lammps):
    atoms = al_cell(n)
    # the served model is the same model: check once on this structure
    stream = LearnerStreamProvider(learner.address)
    ref = GPProvider(gp).compute(atoms.positions, atoms.cell.array, atoms.numbers, atoms.pbc)
    got = stream.compute(atoms.positions, atoms.cell.array, atoms.numbers, atoms.pbc)
    assert np.allclose(got.forces, ref.forces, rtol=1e-9, atol=1e-12), "served model differs"
    assert np.allclose(got.force_std, ref.force_std, rtol=1e-9, atol=1e-12), "served model differs"
    stream.close()

    engines = {
        "gp": create_engine(settings("builtin"), GPProvider(gp), atoms),
        "stream": create_engine(settings("builtin"), LearnerStreamProvider(learner.address), atoms),
        "cached": create_engine(settings("builtin"), CachedProvider(gp), atoms),
        "echo": create_engine(settings("builtin"), LearnerStreamProvider(learner.echo_address), atoms),
    }
    if lammps:
        engines["lammps"] = create_engine(settings("lammps"), GPProvider(gp), atoms)
    if client is not None:
        from sampler_service.remote import RemoteEngine, RemoteForces

        engines["sampler"] = RemoteEngine(settings("builtin"), RemoteForces(client), atoms)
        engines["svc-echo"] = RemoteEngine(settings("builtin"), RemoteForces(client, learner.echo_address), atoms)
        engines["call"] = RemoteEngine(settings("builtin"), RemoteForces(client, learner.echo_address), atoms)
    times = {k: [] for k in engines}
    try:
        for e in engines.values():  # warm-up: JIT, LAMMPS setup, first stream message
            e.run(2, frame_interval=0)
        for r in range(repeats):
            for k, e in engines.items():
                # the cheap paths get more steps so that their times are above the timer's noise
                k_steps = steps * (50 if k in ("cached", "echo", "svc-echo") else 1)
                t = time.perf_counter()
                if k == "call":
                    for _ in range(k_steps * 10):  # ms per one-step call
                        rep = e.run(1, frame_interval=0)
                    times[k].append((time.perf_counter() - t) / (k_steps * 10) * 1e3)
                    continue
                frames = []
                rep = e.run(k_steps, frame_interval=1 if k == "svc-echo" else 0,
                            on_frame=frames.append if k == "svc-echo" else None)
                times[k].append((time.perf_counter() - t) / k_steps * 1e3)
                assert rep.steps_taken == k_steps and len(frames) == (k_steps if k == "svc-echo" else 0)
            print(f"# {n} atoms, round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()),
                  flush=True)
    finally:
        for e in engines.values():
            provider = getattr(e, "provider", None)
            e.close()
            if isinstance(provider, LearnerStreamProvider):
                provider.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(x / g for x, g in zip(v, times["gp"])) for k, v in times.items()}
    out = {"n": n, "steps": steps, "median": med, "ratio": ratio, "transport": med["echo"] - med["cached"]}
    if "svc-echo" in med:
        # paired per round, like the ratios: the service's cost per step and per call
        out["service_step"] = statistics.median(a - b for a, b in zip(times["svc-echo"], times["echo"]))
        out["service_call"] = statistics.median(a - b for a, b in zip(times["call"], times["echo"]))
    return out


if __name__ == "__main__":
    main()
