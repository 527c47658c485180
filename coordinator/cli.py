"""The ``epicycle`` command.

Each role contributes its subcommands through a ``register_cli(subparsers)``
function; this module only assembles them, sets up logging and turns domain
errors into one clear line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from protos.errors import EpicycleError

#: modules whose ``register_cli(subparsers)`` adds subcommands, in help order
CLI_MODULES = (
    "coordinator.serve_cli",     # serve oracle|learner|sampler
    "oracle_service.cli",        # label
    "learner_service.offline",   # fit, predict, evaluate, map
    "coordinator.run_cli",       # run, report
    "coordinator.export",        # export (a run's labels as extended XYZ)
    "coordinator.probe_cli",     # probe (gRPC health, for exec probes)
    "sampler_service.production",  # md (production MD on a mapped / stock LAMMPS potential)
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epicycle")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epicycle",
        description="On-the-fly Bayesian force fields: GP learner, MD sampler and DFT oracle as gRPC services. "
        "Units: Å, eV, eV/Å, eV/Å³, fs, K.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that role has no CLI yet
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EpicycleError as exc:
        print(f"epicycle {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"epicycle {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
