"""``learner.optimize.method: map`` (issue 13): an embedded run re-optimises through the learner's Optimize
with the prior, restarts and a held-out check on the learner's own frames; the config rejects what it cannot do."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coordinator.config import ConfigError, parse_config
from learner_service.model import load_model

ROOT = Path(__file__).resolve().parents[2]

MAP_MELT = {
    "name": "map-e2e",
    "seed": 3,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": [5.0, 3.5],
                "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                "optimize": {"every": 1, "until_calls": 6, "max_iterations": 10, "method": "map", "restarts": 1,
                             "holdout": 0.3}},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 300.0,
                "schedule": [[300.0, 1500.0]], "steps": 160, "frame_interval": 5, "checkpoint_interval": 40},
    "policy": {"absolute_threshold": 0.06, "initial_atoms": 4, "atoms_per_call": 2},
}


def test_an_embedded_run_with_map_optimisation_completes_and_serves_the_selected_hyperparameters(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(MAP_MELT))
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(tmp_path / "run"),
                           "--no-report"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    opt = [e for e in events if e["event"] == "optimize"]
    calls = [e for e in events if e["event"] == "oracle_call"]
    assert len(calls) >= 3 and len(opt) == min(len(calls), 6)  # after every call (the first frame too), up to 6
    assert all(e["message"].startswith("MAP") for e in opt), [e["message"] for e in opt]
    # once the model holds two or more frames the check holds whole frames out
    assert any("whole frame" in e["message"] for e in opt), [e["message"] for e in opt]
    # the learner's checkpoint serves the hyperparameters of the last optimisation, which moved from the start
    model = load_model(tmp_path / "run" / "learner")
    last = opt[-1]["hyperparameters"]
    for name, value in last.items():
        assert model.hyperparameters[name] == pytest.approx(value, rel=1e-12), name
    start = MAP_MELT["learner"]["hyperparameters"]
    assert any(abs(last[n] / start[n] - 1) > 0.1 for n in start)


def test_the_config_names_a_bad_method_and_refuses_map_for_a_sparse_model() -> None:
    data = copy.deepcopy(MAP_MELT)
    data["learner"]["optimize"]["method"] = "maximum-a-posteriori"
    with pytest.raises(ConfigError, match=r"learner\.optimize\.method.*'maximum-a-posteriori'"):
        parse_config(data)
    data["learner"]["optimize"]["method"] = "map"
    data["learner"]["model"] = "sparse"
    with pytest.raises(ConfigError, match=r"learner\.optimize\.method: map .*exact GP.*sparse"):
        parse_config(data)
    data["learner"]["optimize"]["every"] = 0  # no optimisation at all: nothing to refuse
    parse_config(data)
    data = copy.deepcopy(MAP_MELT)
    for key, value in (("holdout", 1.0), ("restarts", -1)):
        bad = copy.deepcopy(data)
        bad["learner"]["optimize"][key] = value
        with pytest.raises(ConfigError, match=rf"learner\.optimize\.{key}"):
            parse_config(bad)
    assert parse_config({k: v for k, v in data.items() if k != "learner"}).learner.optimize.method == "ml"
