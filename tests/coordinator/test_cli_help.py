"""The `epicycle` command explains itself: every subcommand has a description with an example, every
argument has help, and `--version` reports the installed package's version."""

import argparse
import re
from importlib.metadata import version

import pytest

from coordinator.cli import _subparsers, build_parser, main


def _commands():
    return list(_subparsers(build_parser()))


def test_the_walk_finds_every_subcommand() -> None:
    names = {" ".join(path) for path, _ in _commands()}
    assert {"run", "report", "check-config", "fit", "predict", "evaluate", "serve", "serve oracle",
            "serve learner", "serve sampler", "export"} <= names


@pytest.mark.parametrize("path,parser", [(" ".join(p), s) for p, s in _commands()], ids=lambda x: x
                         if isinstance(x, str) else "")
def test_every_subcommand_has_a_description_with_an_example(path: str, parser: argparse.ArgumentParser) -> None:
    assert parser.description and len(parser.description) > 40, f"epicycle {path}: no description"
    text = parser.format_help()
    # an example, kept on its own line(s) by the formatter: "example...:" then "  epicycle <path> ..."
    examples = re.findall(r"^\s+(epicycle .*)$", text, re.M)
    assert any(e.startswith(f"epicycle {path}") for e in examples), f"epicycle {path}: no example in\n{text}"


@pytest.mark.parametrize("path,parser", [(" ".join(p), s) for p, s in _commands()], ids=lambda x: x
                         if isinstance(x, str) else "")
def test_every_argument_has_help(path: str, parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            missing = [c.dest for c in action._choices_actions if not c.help]
            assert not missing, f"epicycle {path}: subcommands without help: {missing}"
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"epicycle {path} {name}: no help text"


def test_top_level_help_and_version(capsys) -> None:
    parser = build_parser()
    assert "epicycle run examples/al_melt.yaml" in parser.format_help()
    test_every_argument_has_help("", parser)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"epicycle {version('epicycle')}"


def test_the_walk_would_catch_an_argument_without_help() -> None:
    """The check above is not vacuous: an argument added without help is found."""
    parser = build_parser()
    fit = dict((" ".join(p), s) for p, s in _subparsers(parser))["fit"]
    fit.add_argument("--new-option")
    with pytest.raises(AssertionError, match="--new-option: no help"):
        test_every_argument_has_help("fit", fit)


def test_run_progress_lines_give_steps_per_second_and_eta() -> None:
    """The rate is this walker's steps over wall time since its first frame; ETA = steps left / rate."""
    import io
    import time

    from coordinator.cycle import Progress

    out = io.StringIO()
    progress = Progress(1110, 5.0, stream=out)
    progress.frame(10, 50.0, 300.0, 1, 0.5, 4, walker="w0")
    first = out.getvalue()
    assert "steps/s" not in first  # no rate from a single frame
    t0 = time.monotonic()
    time.sleep(1.1)
    progress.frame(110, 550.0, 310.0, 2, 0.5, 5, walker="w0")
    waited = time.monotonic() - t0
    m = re.search(r"step +110/1110 .* ([0-9.]+) steps/s  ETA ([0-9]+) s$", out.getvalue().splitlines()[-1])
    assert m, out.getvalue()
    rate, eta = float(m[1]), int(m[2])
    assert 100 / (waited + 0.5) <= rate <= 100 / 1.1 + 0.05
    assert abs(eta - 1000 / rate) <= 1


def test_fit_progress_pace() -> None:
    """Elapsed time, time per item and the ETA of the items left, in readable units."""
    from learner_service.model_selection import pace

    assert pace(0.0, 2, 5, now=10.0) == "10 s, 5 s each, ETA 15 s"
    assert pace(0.0, 1, 100, now=60.0) == "60 s, 60 s each, ETA 99 min"
    assert pace(0.0, 5, 5, now=3.0).endswith("ETA 0 s")
