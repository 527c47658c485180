"""The README's user journey, run command by command: train, validate, export, refit, validate the refit
on the same labelled frames, continue the run with more steps (issue 17, "Done when").

The commands are read from the README block between ``<!-- journey -->`` and ``<!-- /journey -->``, so
the documentation and this test cannot drift apart.  Only what makes it short changes: the demo config
becomes a copy of ``examples/al_melt.yaml`` with fewer steps and fewer optimiser iterations, and the
continuation adds 40 steps instead of 200.  Each command runs as ``python -m coordinator.cli`` from a
temporary directory, as a user would run ``.venv/bin/epicycle`` from the repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from ase.io import read

ROOT = Path(__file__).resolve().parents[1]
SHORT_STEPS = 100


def journey_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- journey -->\s*```bash\n(.*?)```\s*<!-- /journey -->", text, re.S)
    assert block, "README.md has no journey block (<!-- journey --> ... <!-- /journey -->)"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(".venv/bin/epicycle "):
            commands.append(shlex.split(line)[1:])
        else:
            assert line in ("", "make demo"), f"unexpected line in the journey block: {line!r}"
    return commands


def test_the_readme_journey_runs_end_to_end(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "examples" / "al_melt.yaml").read_text())
    config["sampler"]["steps"] = SHORT_STEPS
    config["sampler"]["schedule"] = [{"time_fs": 250.0, "temperature_K": 3000.0}]
    config["learner"]["optimize"] = {"every": 1, "until_calls": 10, "max_iterations": 5}
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "al_melt.yaml").write_text(yaml.safe_dump(config))

    commands = journey_commands()
    assert [c[0] for c in commands] == ["run", "validate", "export", "fit", "validate", "run"]
    for args in commands:
        args = [a.replace("sampler.steps=800", f"sampler.steps={SHORT_STEPS + 40}") for a in args]
        if args[0] == "fit":
            args += ["--max-iterations", "10", "--restarts", "0"]
        proc = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, f"epicycle {shlex.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    run = tmp_path / "runs" / "melt"
    validation = json.loads((run / "validation" / "validation.json").read_text())
    assert validation["frames"] == 10 and validation["trajectory"]["steps"] == SHORT_STEPS
    assert 0 < validation["forces"]["ratio_percent"] < 100
    labels = read(tmp_path / "runs" / "melt_labels.xyz", index=":")
    state = json.loads((run / "state.json").read_text())
    assert len(labels) > 1 and any(a.arrays["training"].any() for a in labels)
    # the refit was scored on the very frames the first validation labelled
    refit = json.loads((tmp_path / "runs" / "melt_refit.npz.validation" / "validation.json").read_text())
    assert refit["kind"] == "labelled frames" and refit["forces"]["components"] == validation["forces"]["components"]
    assert refit["forces"]["p95_abs_reference"] == validation["forces"]["p95_abs_reference"]
    # the run went on to the new step count, and its report has the held-out validation block
    assert state["finished"] and state["walkers"]["w0"]["step"] == SHORT_STEPS + 40
    assert "## Validation on held-out labels" in (run / "report.md").read_text()
