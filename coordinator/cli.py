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
    "coordinator.validate",      # validate (independent trajectory labelled by an oracle)
    "coordinator.probe_cli",     # probe (gRPC health, for exec probes)
    "sampler_service.production",  # md (production MD on a mapped / stock LAMMPS potential)
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epicycle")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions in paragraphs: blank lines separate paragraphs, which are re-wrapped to the
    terminal; lines indented by two spaces (examples) are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for paragraph in text.strip("\n").split("\n\n"):
            prose: list[str] = []
            block: list[str] = []
            for line in paragraph.splitlines():
                if line.startswith("  "):
                    if prose:
                        block.append(super()._fill_text(" ".join(prose), width, indent))
                        prose = []
                    block.append(indent + line)
                else:
                    prose.append(line.strip())
            if prose:
                block.append(super()._fill_text(" ".join(prose), width, indent))
            out.append("\n".join(block))
        return "\n\n".join(out)


def _subparsers(parser: argparse.ArgumentParser):
    """Every (nested) sub-command parser of ``parser``, as ``(["serve", "oracle"], parser)``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [name], sub
                for path, nested in _subparsers(sub):
                    yield [name, *path], nested


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epicycle",
        description="On-the-fly Bayesian force fields (FLARE): GP learner, MD sampler and DFT oracle as gRPC "
        "services, driven by a coordinator. Units everywhere: Å, eV, eV/Å (forces and their σ), eV/Å³ (stress), "
        "fs, K.\n\n"
        "example (an on-the-fly run with the embedded EMT oracle, then its report):\n"
        "  epicycle run examples/al_melt.yaml\n\n"
        "`epicycle COMMAND --help` describes each command.",
        formatter_class=HelpFormatter,
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
    for _, sub_parser in _subparsers(parser):
        sub_parser.formatter_class = HelpFormatter
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
