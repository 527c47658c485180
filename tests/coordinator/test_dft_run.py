"""An on-the-fly run with a real DFT oracle (Quantum ESPRESSO pw.x) through `epicycle run`.

Uses examples/si_dft.yaml shortened to a few dozen MD steps. pw.x is installed by
`make codes` (CI); a missing pw.x is a failure with the install hint, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_si_with_quantum_espresso_on_the_fly(tmp_path: Path) -> None:
    import shutil

    assert shutil.which("pw.x"), "pw.x not found: run `make codes` (installs Debian's quantum-espresso)"
    config = yaml.safe_load((ROOT / "examples" / "si_dft.yaml").read_text())
    config["sampler"]["steps"] = 30
    config["learner"]["optimize"]["until_calls"] = 4
    path = tmp_path / "si.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(path), "--run-dir",
                           str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 30 and summary["oracle_calls"] >= 1
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    calls = [e for e in events if e["event"] == "oracle_call"]
    assert len(calls) == summary["oracle_calls"]
    first = np.load(run / "labels" / "label_000000.npz")
    meta = json.loads(str(first["meta"]))
    # a DFT total energy of 8 Si atoms with norm-conserving PBE pseudopotentials: ~ -100 eV per atom
    assert -150 < meta["energy"] / 8 < -50, meta["energy"]
    forces = first["forces"]
    assert forces.shape == (8, 3) and np.all(np.isfinite(forces))
    assert abs(forces.sum(axis=0)).max() < 0.05  # momentum conservation of the DFT forces (eV/Å)
    assert not list(tmp_path.glob("CRASH")) and not list(run.glob("CRASH"))  # pw.x ran in its scratch dir
