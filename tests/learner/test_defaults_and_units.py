"""One default start and one table of hyperparameter units, in a module light enough for the coordinator."""

import re
import subprocess
import sys
from pathlib import Path

from coordinator.config import parse_config
from learner_service.defaults import DEFAULT_HYPERPARAMETERS, HYPERPARAMETER_UNITS
from learner_service.gp import BASE_HYPERPARAMETERS, GaussianProcess
from learner_service.server import LearnerServiceConfig
from learner_service.servicer import hyperparameters_to_proto

ROOT = Path(__file__).resolve().parents[2]


def test_every_hyperparameter_of_a_model_has_one_unit() -> None:
    gp = GaussianProcess([13], (4.0, 3.0))
    names = set(gp.hyperparameters) | set(BASE_HYPERPARAMETERS) | {"energy_noise", "stress_noise"}
    assert names <= set(HYPERPARAMETER_UNITS), names - set(HYPERPARAMETER_UNITS)
    assert HYPERPARAMETER_UNITS["noise"] == "eV/Å" and HYPERPARAMETER_UNITS["stress_noise"] == "eV/Å³"
    # the servicer's replies carry the same units as the GP's own summaries
    sent = {h.name: h.unit for h in hyperparameters_to_proto(gp.hyperparameters)}
    assert sent == {k: HYPERPARAMETER_UNITS[k] for k in gp.hyperparameters}


def test_report_hyperparameter_text_does_not_import_the_gp() -> None:
    """The report needs a units table, not numba and scipy (seconds of import and JIT cache)."""
    code = (
        "import sys\n"
        "import coordinator.report as r\n"
        "text = r._hyperparameters_text({'sig2': 0.5, 'ls2': 1.2, 'noise': 0.02, 'stress_noise': 0.001},"
        " ['forces', 'stress'])\n"
        "assert text == 'sig2 0.5 eV, ls2 1.2 Å, noise 0.02 eV/Å, stress_noise 0.001 eV/Å³', text\n"
        "heavy = [m for m in ('numba', 'scipy', 'learner_service.gp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_fit_run_and_serve_start_from_the_documented_default() -> None:
    """`epicycle fit` (a GaussianProcess without hyperparameters), `epicycle run` (the config's
    learner section) and `epicycle serve learner` start from one set, the one docs/configuration.md shows."""
    fit = {k: v for k, v in GaussianProcess([13], (4.0, 3.0)).hyperparameters.items() if k in BASE_HYPERPARAMETERS}
    run = dict(parse_config({}).learner.hyperparameters)
    serve = dict(LearnerServiceConfig(species=(13,)).hyperparameters)
    assert fit == run == serve == DEFAULT_HYPERPARAMETERS
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = docs[docs.index("| hyperparameter | default start | unit |"):]
    table = table[:table.index("\n\n")]
    rows = {m[1]: (float(m[2]), m[3]) for m in re.finditer(r"^\| `(\w+)`[^|]*\| ([0-9.]+) \| (\S+) \|$", table, re.M)}
    assert rows == {k: (v, HYPERPARAMETER_UNITS[k]) for k, v in DEFAULT_HYPERPARAMETERS.items()}
