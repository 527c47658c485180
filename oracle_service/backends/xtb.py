"""Extended tight binding (GFN1/GFN2-xTB) oracle through tblite: the fast middle tier.

Registered as ``xtb``.  Runs ``tblite.interface.Calculator`` in a
persistent worker process (see :mod:`._subprocess`): tblite is imported
once, each structure gets a fresh calculator (deterministic labels), a
calculation that exceeds ``timeout`` kills the worker -> ``CalculationTimeout``,
a calculation whose ``cancel`` event is set (nobody waits for it any more)
kills it too -> ``CalculationCancelled``, and tblite's own SCF verdict ("SCF not converged in N cycles") becomes
``CalculationFailed`` with the SCF table from tblite's output as log tail
(then the retry ladder of :mod:`._scf`).

Periodic structures are treated at the Γ point only (tblite has no k-point
sampling): use cells of at least ~10 Å, e.g. supercells.

Settings:

``method`` ("GFN2-xTB"; "GFN1-xTB", "IPEA1-xTB")  ``accuracy`` (1.0; smaller is tighter)
``electronic_temperature`` (K, 300)  ``max_iterations`` (250)  ``mixer_damping`` (0.4)
``charge`` (0, e)  ``multiplicity`` (None = lowest)  ``threads`` (1)  ``timeout`` (s, 600)
``retries`` (default :data:`DEFAULT_RETRIES`), ``retry_on_timeout``, ``quarantine_after``, ``quarantine_file``

Units out: eV, eV/Å, eV/Å³ (from Hartree and Bohr with ASE's constants).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.units import Bohr, Hartree, kB

from protos.errors import CalculationFailed, InvalidInput, SetupError

from ..base import Labels, register_backend
from ._scf import ScfOracle, check_positive, merge_settings
from ._subprocess import PersistentWorker, scratch_directory, thread_env

__all__ = ["XTBOracle", "TBLITE_HINT", "run_job"]

TBLITE_HINT = (
    "tblite is not installed: run `bash oracle_service/setup/install_python_packages.sh .venv/bin/python` "
    "(or `pip install 'tblite>=0.8,<0.9'`)."
)
METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")
#: escalation used when ``retries`` is not given
DEFAULT_RETRIES = ({"max_iterations": 500, "mixer_damping": 0.2},)
#: parametrised elements (H-Rn) of the GFN methods
MAX_Z = 86


def tblite_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("tblite")
    except Exception:  # noqa: BLE001
        return None


@register_backend("xtb")
class XTBOracle(ScfOracle):
    """tblite GFN-xTB backend (see the module docstring for the settings)."""

    name = "xtb"
    implemented_properties = ("energy", "forces", "stress")
    thread_safe = False  # one persistent worker process per oracle
    retry_keys = frozenset({"max_iterations", "mixer_damping", "accuracy", "electronic_temperature", "timeout"})

    def __init__(
        self,
        *,
        method: str = "GFN2-xTB",
        accuracy: float = 1.0,
        electronic_temperature: float = 300.0,
        max_iterations: int = 250,
        mixer_damping: float = 0.4,
        charge: float = 0.0,
        multiplicity: int | None = None,
        threads: int = 1,
        timeout: float = 600.0,
        scratch_dir: str | os.PathLike | None = None,
        retries: Sequence[Mapping[str, Any]] | None = DEFAULT_RETRIES,
        retry_on_timeout: bool = False,
        quarantine_after: int = 1,
        quarantine_file: str | None = None,
    ) -> None:
        if importlib.util.find_spec("tblite") is None:
            raise SetupError(TBLITE_HINT)
        self._params: dict[str, Any] = {
            "method": method,
            "accuracy": accuracy,
            "electronic_temperature": electronic_temperature,
            "max_iterations": max_iterations,
            "mixer_damping": mixer_damping,
            "charge": charge,
            "multiplicity": multiplicity,
            "timeout": timeout,
        }
        self._validate(self._params)
        self.threads = int(threads)
        check_positive("threads", self.threads, integer=True)
        self.scratch_dir = str(scratch_dir) if scratch_dir is not None else None
        super().__init__(retries=retries, retry_on_timeout=retry_on_timeout, quarantine_after=quarantine_after,
                         quarantine_file=quarantine_file)
        for entry in self.retries:
            self._validate(merge_settings(self._params, entry))
        self._worker = PersistentWorker("oracle_service.backends.xtb:run_job", env=thread_env(self.threads),
                                        name="xtb", preload=("tblite.interface",))
        self._lock = threading.Lock()

    @staticmethod
    def _validate(p: Mapping[str, Any]) -> None:
        if p["method"] not in METHODS:
            raise InvalidInput(f"method must be one of {METHODS}, got {p['method']!r}")
        check_positive("accuracy", p["accuracy"])
        check_positive("electronic_temperature (K)", p["electronic_temperature"])
        check_positive("max_iterations", p["max_iterations"], integer=True)
        if not (isinstance(p["mixer_damping"], (int, float)) and 0 < p["mixer_damping"] <= 1):
            raise InvalidInput(f"mixer_damping must be in (0, 1], got {p['mixer_damping']!r}")
        if p["multiplicity"] is not None:
            check_positive("multiplicity", p["multiplicity"], integer=True)
        check_positive("timeout (s)", p["timeout"])

    def settings(self) -> dict[str, Any]:
        p = dict(self._params)
        p.update(threads=self.threads, kpts="gamma")
        p.update(self.retry_settings())
        return p

    def version(self) -> str:
        v = tblite_version()
        return f"tblite {v}" if v else "tblite (not installed)"

    def supported_numbers(self) -> frozenset[int]:
        return frozenset(range(1, MAX_Z + 1))

    def close(self) -> None:
        self._worker.close()

    def calculate_once(self, atoms: Atoms, properties: tuple[str, ...], overrides: Mapping[str, Any],
                       cancel: threading.Event | None = None) -> Labels:
        params = merge_settings(self._params, overrides)
        if atoms.pbc.any() and not atoms.pbc.all():
            raise InvalidInput("xtb (tblite) treats structures as fully periodic or fully isolated; "
                               f"got pbc={atoms.pbc.tolist()}")
        if "stress" in properties and not atoms.pbc.all():
            raise InvalidInput("xtb: stress needs a periodic structure")
        job = {
            "numbers": np.asarray(atoms.numbers),
            "positions": np.asarray(atoms.positions),
            "cell": np.asarray(atoms.cell.array),
            "periodic": bool(atoms.pbc.all()),
            "properties": list(properties),
            "params": params,
        }
        with self._lock, scratch_directory(self.scratch_dir, "epicycle-xtb-", "never") as work:
            result = self._worker.call(job, cwd=work, log_path=work / "tblite.out", timeout=float(params["timeout"]),
                                       what="tblite", cancel=cancel)
        info = {"backend": self.name, "method": params["method"], "worker_starts": self._worker.starts}
        return Labels(energy=result["energy"], forces=result.get("forces"), stress=result.get("stress"), info=info)


# ---------------------------------------------------------------------------
# runs inside the worker process


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:  # pragma: no cover - exercised through the worker
    import sys

    try:
        from tblite.interface import Calculator
    except ImportError as exc:
        raise SetupError(f"{TBLITE_HINT} ({type(exc).__name__}: {exc})") from None

    p = job["params"]
    periodic = job["periodic"]
    positions = np.asarray(job["positions"]) / Bohr
    lattice = np.asarray(job["cell"]) / Bohr if periodic else None
    try:
        calc = Calculator(
            p["method"],
            np.asarray(job["numbers"]),
            positions,
            float(p["charge"]),
            None if p["multiplicity"] is None else int(p["multiplicity"]) - 1,
            lattice,
            np.array([True, True, True]) if periodic else None,
        )
        calc.set("accuracy", float(p["accuracy"]))
        calc.set("temperature", float(p["electronic_temperature"]) * kB / Hartree)
        calc.set("max-iter", int(p["max_iterations"]))
        calc.set("mixer-damping", float(p["mixer_damping"]))
        calc.set("verbosity", 1)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"tblite rejected the input: {exc}") from None
    except RuntimeError as exc:
        raise CalculationFailed(f"tblite could not set up the calculation: {exc}") from None
    try:
        res = calc.singlepoint()
    except RuntimeError as exc:
        sys.stdout.flush()
        text = str(exc)
        if "not converged" in text.lower():
            raise CalculationFailed(f"SCF did not converge: tblite reports '{text}'") from None
        raise CalculationFailed(f"tblite failed: {text}") from None
    finally:
        sys.stdout.flush()
    out: dict[str, Any] = {"energy": float(res["energy"]) * Hartree}
    if "forces" in job["properties"]:
        out["forces"] = -np.asarray(res["gradient"]) * Hartree / Bohr
    if "stress" in job["properties"]:
        volume = abs(np.linalg.det(np.asarray(job["cell"])))
        s = np.asarray(res["virial"]) * Hartree / volume
        out["stress"] = s.flat[[0, 4, 8, 5, 2, 1]].copy()
    return out
