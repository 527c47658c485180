"""GPAW oracle: plane-wave PAW DFT, run in a persistent child process.

Registered as ``gpaw``.  GPAW is imported only in the worker process
(:class:`~oracle_service.backends._subprocess.PersistentWorker`), which
keeps the import warm between calculations, is killed (whole process
group) when a calculation exceeds ``timeout`` -> ``CalculationTimeout``, or
when nobody waits for the result any more (``cancel``) -> ``CalculationCancelled``,
and is restarted for the next one.  A crash of the worker (segfault, out of
memory) is a ``CalculationFailed``.  GPAW is not safe to interrupt inside a
thread, and its C extension and BLAS threads stay out of the service process.

The PAW setups come from the ``gpaw-data`` wheel (GPAW finds them through
that package; ``GPAW_SETUP_PATH`` overrides).  Convergence is GPAW's own
verdict: it raises ``KohnShamConvergenceError`` when ``maxiter`` SCF steps
were not enough, which becomes ``CalculationFailed`` (and then a retry with
the escalated settings of ``retries``, see :mod:`._scf`).

Settings (GPAW's units: eV, Å):

``ecut`` (eV, 300)  ``xc`` ("PBE")  ``kpts`` ([4, 4, 4]) or ``kspacing`` (Å⁻¹ incl. 2π), ``gamma`` (False:
Monkhorst-Pack; True: Γ-centred)  ``smearing`` ("fermi-dirac"; "marzari-vanderbilt", "methfessel-paxton",
"improved-tetrahedron-method" needs no width) ``width`` (eV, 0.1)  ``maxiter`` (200)
``mixer`` (GPAW mixer dict, e.g. {"name": "pulay", "beta": 0.05}; None = GPAW default)
``mixer_beta`` (shortcut: sets the mixer's ``beta``)  ``convergence`` (GPAW dict; default
{"energy": 1e-5 eV/electron, "density": 1e-5, "eigenstates": 1e-8})  ``spinpol`` (None = from the
structure's initial magnetic moments)  ``setups`` ("paw")  ``symmetry`` ("auto" or "off")
``nbands`` (None)  ``threads`` (1)  ``timeout`` (s, 3600)  ``scratch_dir`` / ``keep_scratch``
``retries``, ``retry_on_timeout``, ``quarantine_after``, ``quarantine_file`` (see ``_scf``)

Energy: the free energy (Mermin) that the forces and stress are derivatives
of, not GPAW's default zero-width extrapolation.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np
from ase import Atoms

from protos.errors import CalculationFailed, InvalidInput, SetupError

from ..base import Labels, register_backend
from ._scf import ScfOracle, check_positive, checked_kpoints, kpoint_grid, merge_settings
from ._subprocess import PersistentWorker, check_keep_policy, scratch_directory, thread_env

__all__ = ["GPAWOracle", "GPAW_HINT", "run_job"]

GPAW_HINT = (
    "GPAW is not installed: run `bash oracle_service/setup/install_system_packages.sh` (libxc, OpenBLAS, FFTW) "
    "then `bash oracle_service/setup/install_python_packages.sh .venv/bin/python` (builds gpaw and installs gpaw-data)."
)

SMEARINGS = ("fermi-dirac", "marzari-vanderbilt", "methfessel-paxton", "improved-tetrahedron-method",
             "tetrahedron-method", "fixed")
DEFAULT_CONVERGENCE = {"energy": 1e-5, "density": 1e-5, "eigenstates": 1e-8}
#: escalation used when ``retries`` is not given
DEFAULT_RETRIES = ({"maxiter": 400, "mixer_beta": 0.02},)


def gpaw_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("gpaw")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def _check_installed() -> None:
    if importlib.util.find_spec("gpaw") is None or importlib.util.find_spec("_gpaw") is None:
        raise SetupError(GPAW_HINT)


@register_backend("gpaw")
class GPAWOracle(ScfOracle):
    """GPAW plane-wave backend (see the module docstring for the settings)."""

    name = "gpaw"
    implemented_properties = ("energy", "forces", "stress")
    thread_safe = False  # one persistent worker process per oracle
    retry_keys = frozenset({"maxiter", "mixer", "mixer_beta", "convergence", "width", "smearing", "timeout", "ecut"})

    def __init__(
        self,
        *,
        ecut: float = 300.0,
        xc: str = "PBE",
        kpts: Sequence[int] | None = (4, 4, 4),
        kspacing: float | None = None,
        gamma: bool = False,
        smearing: str = "fermi-dirac",
        width: float = 0.1,
        maxiter: int = 200,
        mixer: Mapping[str, Any] | None = None,
        mixer_beta: float | None = None,
        convergence: Mapping[str, Any] | None = None,
        spinpol: bool | None = None,
        setups: str | Mapping[str, str] = "paw",
        symmetry: str = "auto",
        nbands: int | str | None = None,
        threads: int = 1,
        timeout: float = 3600.0,
        scratch_dir: str | os.PathLike | None = None,
        keep_scratch: str = "never",
        retries: Sequence[Mapping[str, Any]] | None = DEFAULT_RETRIES,
        retry_on_timeout: bool = False,
        quarantine_after: int = 1,
        quarantine_file: str | None = None,
    ) -> None:
        _check_installed()
        self._params: dict[str, Any] = {
            "ecut": ecut,
            "xc": xc,
            "gamma": bool(gamma),
            "smearing": smearing,
            "width": width,
            "maxiter": maxiter,
            "mixer": dict(mixer) if mixer else None,
            "mixer_beta": mixer_beta,
            "convergence": dict(convergence) if convergence is not None else dict(DEFAULT_CONVERGENCE),
            "spinpol": spinpol,
            "setups": dict(setups) if isinstance(setups, Mapping) else setups,
            "symmetry": symmetry,
            "nbands": nbands,
            "timeout": timeout,
        }
        self.kpts, self.kspacing = checked_kpoints(kpts, kspacing)
        self.threads = int(threads)
        self.scratch_dir = str(scratch_dir) if scratch_dir is not None else None
        self.keep_scratch = check_keep_policy(keep_scratch)
        self._validate(self._params)
        check_positive("threads", self.threads, integer=True)
        super().__init__(retries=retries, retry_on_timeout=retry_on_timeout, quarantine_after=quarantine_after,
                         quarantine_file=quarantine_file)
        for entry in self.retries:
            self._validate(merge_settings(self._params, entry))
        self._worker = PersistentWorker("oracle_service.backends.gpaw:run_job", env=thread_env(self.threads),
                                        name="gpaw", preload=("gpaw", "gpaw.new.ase_interface"))
        self._lock = threading.Lock()

    @staticmethod
    def _validate(p: Mapping[str, Any]) -> None:
        check_positive("ecut (eV)", p["ecut"])
        if p["smearing"] not in SMEARINGS:
            raise InvalidInput(f"smearing must be one of {SMEARINGS}, got {p['smearing']!r}")
        if p["smearing"] in ("fermi-dirac", "marzari-vanderbilt", "methfessel-paxton"):
            check_positive("width (eV)", p["width"])
        check_positive("maxiter", p["maxiter"], integer=True)
        if p.get("mixer_beta") is not None and not (0 < p["mixer_beta"] <= 1):
            raise InvalidInput(f"mixer_beta must be in (0, 1], got {p['mixer_beta']!r}")
        if not isinstance(p["convergence"], Mapping):
            raise InvalidInput(f"convergence must be a mapping (GPAW's convergence dict), got {p['convergence']!r}")
        if p["symmetry"] not in ("auto", "off"):
            raise InvalidInput(f"symmetry must be 'auto' or 'off', got {p['symmetry']!r}")
        check_positive("timeout (s)", p["timeout"])

    def settings(self) -> dict[str, Any]:
        p = dict(self._params)
        p.update(kpts=self.kpts, kspacing=self.kspacing, threads=self.threads, mode="pw")
        p.update(self.retry_settings())
        return p

    def version(self) -> str:
        v = gpaw_version()
        return f"gpaw {v}" if v else "gpaw (not installed)"

    def supported_numbers(self) -> frozenset[int] | None:
        """Elements with a default PAW setup for ``xc`` (``<El>.<xc>[.gz]``) in GPAW's setup path.

        Looks at ``GPAW_SETUP_PATH`` and the ``gpaw-data`` package without importing GPAW into
        this process; ``None`` ("any") if no setup directory can be listed.
        """
        from ase.data import atomic_numbers

        directories = [d for d in os.environ.get("GPAW_SETUP_PATH", "").split(os.pathsep) if d]
        spec = importlib.util.find_spec("gpaw_data")
        if spec is not None and spec.submodule_search_locations:
            directories += [os.path.join(loc, "setups") for loc in spec.submodule_search_locations]
        xc = self._params["xc"]
        found = set()
        for directory in directories:
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                parts = name.split(".")
                if len(parts) >= 2 and parts[1] == xc and parts[0] in atomic_numbers:
                    found.add(atomic_numbers[parts[0]])
        return frozenset(found) or None

    def close(self) -> None:
        self._worker.close()

    def calculate_once(self, atoms: Atoms, properties: tuple[str, ...], overrides: Mapping[str, Any],
                       cancel: threading.Event | None = None) -> Labels:
        params = merge_settings(self._params, overrides)
        kgrid = kpoint_grid(atoms, self.kpts, self.kspacing)
        if "stress" in properties and not atoms.pbc.all():
            raise InvalidInput("gpaw: stress needs a structure periodic in all three directions")
        job = {
            "numbers": np.asarray(atoms.numbers),
            "positions": np.asarray(atoms.positions),
            "cell": np.asarray(atoms.cell.array),
            "pbc": np.asarray(atoms.pbc),
            "magmoms": np.asarray(atoms.get_initial_magnetic_moments()),
            "properties": list(properties),
            "params": params,
            "kpts": list(kgrid),
        }
        with self._lock, scratch_directory(self.scratch_dir, "epicycle-gpaw-", self.keep_scratch) as work:
            result = self._worker.call(job, cwd=work, log_path=work / "gpaw.txt", timeout=float(params["timeout"]),
                                       what="gpaw", cancel=cancel)
        info = {"backend": self.name, "scf_iterations": result.get("iterations"), "kpts": list(kgrid),
                "worker_starts": self._worker.starts}
        return Labels(energy=result["energy"], forces=result.get("forces"), stress=result.get("stress"), info=info)


# ---------------------------------------------------------------------------
# runs inside the worker process


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:  # pragma: no cover - exercised through the worker
    import sys

    try:
        from gpaw import GPAW, PW, KohnShamConvergenceError
    except ImportError as exc:
        raise SetupError(f"{GPAW_HINT} ({type(exc).__name__}: {exc})") from None

    p = job["params"]
    atoms = Atoms(numbers=job["numbers"], positions=job["positions"], cell=job["cell"], pbc=job["pbc"])
    magmoms = np.asarray(job["magmoms"])
    if np.any(magmoms):
        atoms.set_initial_magnetic_moments(magmoms)
    occupations: dict[str, Any] = {"name": p["smearing"]}
    if p["smearing"] in ("fermi-dirac", "marzari-vanderbilt", "methfessel-paxton"):
        occupations["width"] = float(p["width"])
    mixer = dict(p["mixer"]) if p.get("mixer") else None
    if p.get("mixer_beta") is not None:
        mixer = dict(mixer or {})
        mixer["beta"] = float(p["mixer_beta"])
    kwargs: dict[str, Any] = dict(
        mode=PW(float(p["ecut"])),
        xc=p["xc"],
        kpts={"size": tuple(job["kpts"]), "gamma": bool(p["gamma"])},
        occupations=occupations,
        convergence=dict(p["convergence"]),
        maxiter=int(p["maxiter"]),
        setups=p["setups"],
        txt=sys.stdout,  # the worker pointed fd 1 at the job's log file
    )
    if mixer is not None:
        kwargs["mixer"] = mixer
    if p.get("spinpol") is not None:
        kwargs["spinpol"] = bool(p["spinpol"])
    if p.get("symmetry") == "off":
        kwargs["symmetry"] = "off"
    if p.get("nbands") is not None:
        kwargs["nbands"] = p["nbands"]
    calc = GPAW(**kwargs)
    atoms.calc = calc
    try:
        energy = float(atoms.get_potential_energy(force_consistent=True))
        out: dict[str, Any] = {"energy": energy}
        if "forces" in job["properties"]:
            out["forces"] = np.array(atoms.get_forces())
        if "stress" in job["properties"]:
            out["stress"] = np.array(atoms.get_stress(voigt=True))
    except KohnShamConvergenceError as exc:
        raise CalculationFailed(
            f"SCF did not converge: GPAW raised {type(exc).__name__} after maxiter={p['maxiter']} iterations"
        ) from None
    finally:
        sys.stdout.flush()
    try:
        out["iterations"] = int(calc.dft.scf_loop.niter)  # new GPAW
    except Exception:  # noqa: BLE001 - informational only
        out["iterations"] = None
    return out
