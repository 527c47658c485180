"""``epicycle run CONFIG.yaml`` / ``epicycle run --resume RUN_DIR`` / ``epicycle report RUN_DIR``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from protos.errors import InvalidInput


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an on-the-fly training (FLARE cycle) from a YAML config",
                       description="Start (or resume) an on-the-fly run. Without service addresses in the "
                       "config, the oracle, learner and sampler services are started on 127.0.0.1 and driven "
                       "over gRPC exactly as in a deployment. Progress lines give the MD step, simulated time "
                       "(ps), temperature (K), oracle calls, the speed (MD steps/s) and the estimated time "
                       "left; the run directory keeps every label (eV, eV/Å, eV/Å³), the event log and the "
                       "report.\n\n"
                       "example (the demo: FCC Al heated with the EMT oracle), then continue it for longer:\n"
                       "  epicycle run examples/al_melt.yaml --run-dir runs/melt\n"
                       "  epicycle run --resume runs/melt --set sampler.steps=1200")
    p.add_argument("config", nargs="?", type=Path, help="run configuration (YAML)")
    p.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/<name>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--repair", action="store_true",
                   help="with --resume: label the structures of missing or damaged label files again with the "
                        "oracle, under the same index (see `epicycle check-run`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="with --resume: change a setting that may change mid-run, e.g. sampler.steps=2000, "
                        "policy.sigma_factor=2, stop.max_labels=80, sampler.schedule='[[3000, 1200]]' (fs, K), "
                        "oracle.addresses='[host:50051]'; validated, recorded in the event log; repeat for more "
                        "(the list: docs/configuration.md, 'Changing settings of a run')")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=run_command)

    r = sub.add_parser("report", help="write the report (plots + key numbers) of a run directory",
                       description="Write report.md and its plots into the run directory: temperature (K) and "
                       "oracle calls against simulated time (ps), cumulative oracle calls, the noise σn (eV/Å), "
                       "force error against predicted σ (eV/Å) and calibration. `epicycle run` writes it at the "
                       "end; this command rewrites it, e.g. for a run that was interrupted.\n\n"
                       "example:\n"
                       "  epicycle report runs/melt")
    r.add_argument("run_dir", type=Path, help="the run directory (runs/<name>-<time>/)")
    r.set_defaults(func=report_command)

    c = sub.add_parser("check-config", help="validate a run configuration and print it with defaults filled in",
                       description="Read a run configuration, check every key (a bad one is named with what is "
                       "allowed) and print the whole configuration as YAML with the defaults filled in. Units as "
                       "in docs/configuration.md: lengths Å, timestep fs, temperatures K, pressure GPa, "
                       "thresholds and σ eV/Å.\n\n"
                       "example:\n"
                       "  epicycle check-config examples/al_melt.yaml")
    c.add_argument("config", type=Path, help="run configuration (YAML), e.g. examples/al_melt.yaml")
    c.set_defaults(func=check_command)

    a = sub.add_parser("check-run", help="audit a run directory: labels, queue, walkers, learner checkpoint",
                       description="Check a run directory the way `epicycle run --resume` does before continuing: "
                       "every label present, readable and byte for byte as written (SHA-256 in state.json), "
                       "the queue and each walker's checkpoint. Exit status 0 if it can be resumed, 1 if not.\n\n"
                       "example:\n"
                       "  epicycle check-run runs/melt")
    a.add_argument("run_dir", type=Path, help="the run directory (runs/<name>-<time>/)")
    a.set_defaults(func=check_run_command)


def check_command(args: argparse.Namespace) -> int:
    import yaml

    from coordinator.config import load_config

    config = load_config(args.config)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def run_command(args: argparse.Namespace) -> int:
    import yaml

    from coordinator.config import load_config, parse_config
    from coordinator.cycle import OnTheFlyRun, Progress, run_species
    from coordinator.report import write_report
    from coordinator.rundir import RunDirectory
    from coordinator.services import start_services

    if args.repair and not args.resume:
        raise InvalidInput("--repair goes with --resume RUN_DIR")
    if args.resume:
        if args.config:
            raise InvalidInput("give either CONFIG (new run) or --resume RUN_DIR, not both")
        rd = RunDirectory.open(args.resume)
        data = yaml.safe_load((rd.path / "config.yaml").read_text())
        config = parse_config(data)
        if args.settings:
            config = _change_settings(rd, data, args.settings)
        elif rd.load_state().finished:
            print(f"{rd.path}: the run is already finished (continue it with changed settings, e.g. "
                  f"--set sampler.steps=N)")
            return 0
    else:
        if args.settings:
            raise InvalidInput("--set changes the settings of a run being resumed: use it with --resume RUN_DIR "
                               "(for a new run, edit the YAML)")
        if not args.config:
            raise InvalidInput("give a run configuration (YAML) or --resume RUN_DIR")
        config = load_config(args.config)
        run_dir = args.run_dir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        rd = RunDirectory.create(run_dir, yaml.safe_dump(config.to_dict(), sort_keys=False))
    species = run_species(config)
    print(f"run directory: {rd.path}", flush=True)
    metrics = None
    if config.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from coordinator.metrics import CoordinatorMetrics
        from protos.metrics import serve_metrics

        registry = CollectorRegistry()
        metrics = CoordinatorMetrics(registry)
        _, port = serve_metrics(registry, config.metrics_port, config.metrics_host)
        print(f"coordinator metrics on http://{config.metrics_host}:{port}/metrics", flush=True)
    started = time.perf_counter()
    services = start_services(config, species, learner_dir=rd.path / "learner")
    try:
        run = OnTheFlyRun(config, rd, services,
                          Progress(config.sampler.steps, config.sampler.timestep_fs, quiet=args.quiet), metrics,
                          repair=args.repair)
        state = run.run()
    finally:
        services.close()
        rd.close()
    elapsed = time.perf_counter() - started
    walkers = len(state.walkers)
    print(f"finished ({state.stop_reason}): {state.step} steps{f' over {walkers} walkers' if walkers > 1 else ''}, "
          f"{state.time_fs / 1000:.3f} ps, {state.oracle_calls} oracle calls, {elapsed:.1f} s wall time; "
          f"model: learner checkpoint {state.learner_checkpoint}"
          + (f" in {rd.path / 'learner'}" if not config.learner.address else ""), flush=True)
    if not args.no_report:
        report = write_report(rd.path, wall_seconds=elapsed)
        print(f"report: {report}", flush=True)
    return 0


def _change_settings(rd, data: dict, items: list[str]):
    """Apply ``--set`` to the run's configuration: validate the whole new configuration, write it, record
    the change; a finished run whose walkers now have steps left is continued."""
    import yaml

    from coordinator.config import parse_config
    from coordinator.settings_change import apply_assignments, parse_assignments
    from protos.files import atomic_write

    new, changes = apply_assignments(data, parse_assignments(items))
    config = parse_config(new)
    st = rd.load_state()
    steps = {w.name: w.sampler.steps for w in config.walker_list()}
    reopened = []
    for name in st.walkers:
        ws = st.walker(name)
        if ws.done and not ws.halted and ws.step < steps.get(name, 0):
            ws.done = False
            reopened.append(name)
        if "sampler.schedule" in changes and not ws.done:
            ws.resend_schedule = True
        st.set_walker(name, ws)
    if st.finished and all(st.walker(n).done for n in st.walkers):
        raise InvalidInput(f"{rd.path}: the run is finished and the change leaves nothing to do "
                           f"(every walker has done its steps: raise sampler.steps to continue)")
    atomic_write(rd.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    if st.finished:
        st.finished, st.stop_reason = False, ""
    rd.save_state(st)
    rd.event("settings_changed", changes=changes, reopened_walkers=reopened)
    for key, (old, value) in changes.items():
        print(f"setting {key}: {old!r} -> {value!r}")
    return config


def check_run_command(args: argparse.Namespace) -> int:
    from coordinator.rundir import RunDirectory

    rd = RunDirectory.open(args.run_dir)
    st = rd.load_state()
    n, problems = rd.check(st)
    temporary = [p for d in (rd.path, rd.labels_dir, rd.queue_dir) for p in d.glob(".*.tmp*")]
    print(f"run directory {rd.path}")
    print(f"  state: {'finished (' + st.stop_reason + ')' if st.finished else 'not finished'}, "
          f"{st.oracle_calls} label(s) recorded, {n} on disk, {st.labels_applied} applied "
          f"(learner checkpoint {st.learner_checkpoint or 'none'})")
    print(f"  queue: {len(rd.queued_seqs())} frame(s) waiting, {len(st.in_flight)} were in flight at the last update")
    for name, w in sorted(st.walkers.items()):
        where = rd.path / w["md_checkpoint"] if w.get("md_checkpoint") and not w["md_checkpoint"].startswith(
            "label:") else None
        if where is not None and not where.exists():
            problems.append((-1, f"walker {name}: its checkpoint {where} is missing"))
        status = "done" if w.get("done") else (f"parked on frame {w['parked']}" if w.get("parked") is not None
                                                else "running")
        print(f"  walker {name}: step {w.get('step', 0)}, {status}")
    if temporary:
        print(f"  {len(temporary)} temporary file(s) of interrupted writes (removed on resume)")
    if problems:
        print("PROBLEMS:")
        for _, problem in problems:
            print(f"  {problem}")
        print(f"repair with: epicycle run --resume {rd.path} --repair (labels the same structures again)")
        return 1
    print("OK: the run can be resumed" if not st.finished else "OK")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from coordinator.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0
