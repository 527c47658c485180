"""CP2K oracle: Gaussian and plane waves (GPW) DFT with MOLOPT basis sets and GTH pseudopotentials.

Registered as ``cp2k``.  Each calculation writes a CP2K input (our own
writer, :func:`write_cp2k_input`), runs the ``cp2k`` executable in its own
scratch directory and process group, and parses its output
(:func:`parse_cp2k_output`) -- the same machinery as the ``qe`` backend
(:func:`~oracle_service.backends._subprocess.run_command`): the wall-time
limit kills the process group -> :class:`~protos.errors.CalculationTimeout`;
when nobody waits for the result any more (``cancel``) the process group is
killed the same way -> :class:`~oracle_service.base.CalculationCancelled`.

Why not ASE's CP2K calculator: it drives one long-lived ``cp2k_shell`` per
calculator, which cannot be killed per calculation without losing the shell,
and it returns labels from an SCF that CP2K only *warned* about -- CP2K 2023.1
prints "SCF run NOT converged", carries on and exits 0.  Here labels are only
returned when the output proves convergence: "SCF run converged in N steps",
no "SCF run NOT converged", no ``[ABORT]``, exit code 0, "PROGRAM ENDED AT",
the FORCE_EVAL energy, forces for every atom and, when asked, the analytical
stress tensor; anything else is :class:`~protos.errors.CalculationFailed`
with the reason and the tail of the log.  Retries with escalated settings and
quarantine: :mod:`oracle_service.backends._scf`.

Basis sets and pseudopotentials come from CP2K's data files (Debian package
``cp2k-data``: ``/usr/share/cp2k/BASIS_MOLOPT`` and ``GTH_POTENTIALS``),
found at run time (``data_dir`` setting, else ``$CP2K_DATA_DIR``, else the
usual install locations); a missing file is a :class:`~protos.errors.SetupError`
naming the package.  Each element gets the basis ``basis_set`` and the GTH
pseudopotential of the ``potential`` family with the valence that the basis
was made for (the ``-qN`` suffix of the basis name: Al DZVP-MOLOPT-SR-GTH-q3 ->
GTH-PBE-q3).

Settings (units: Ry for the grid cutoffs as in CP2K's input, K for the smearing, μB for moments):

``cutoff`` (Ry, 400)  ``rel_cutoff`` (Ry, 50)  ``ngrids`` (4)
``basis_set`` ("DZVP-MOLOPT-SR-GTH", or {element: name})  ``potential`` ("GTH-PBE" family, or {element: name})
``xc`` ("PBE")  ``data_dir`` (None: found at run time)  ``basis_file`` ("BASIS_MOLOPT")
``potential_file`` ("GTH_POTENTIALS")
``kpts`` ([4, 4, 4]; [1, 1, 1] or None = Γ point, CP2K's Γ-only code) or ``kspacing`` (Å⁻¹ incl. 2π),
``gamma`` (False: Monkhorst-Pack, shifted off Γ for even n; True: Γ-centred, as QE's ``koffset: [0, 0, 0]``)
``smearing`` ("fermi-dirac" or None for fixed occupations)  ``electronic_temperature`` (K, 1000)
``uks`` (False: closed shell; True: spin-polarised), ``magnetization`` (μB per atom in the initial guess:
a number or {element: μB}, default 1.0), ``multiplicity`` (2S+1; None: floats with smearing, else from
the initial moments)
``added_mos`` (None: max(10, 30 % of the occupied orbitals) with smearing, else 0)
``eps_scf`` (1e-7: CP2K's EPS_SCF, the largest density-matrix change)  ``max_scf`` (50)
``mixing_method`` ("broyden"; "pulay", "kerker", "direct")
``mixing_alpha`` (0.4)  ``eps_default`` (1e-12)
``command`` (None: the first of cp2k, cp2k.psmp, cp2k.ssmp, cp2k.popt, cp2k.sopt on PATH)
``mpi_procs`` (1 = no mpirun), ``mpirun`` ("mpirun"), ``threads`` (1: OMP threads), ``timeout`` (s, 3600),
``scratch_dir`` (None = system temp), ``keep_scratch`` ("never"; "on_failure", "always")
``retries`` (default :data:`DEFAULT_RETRIES`), ``retry_on_timeout``, ``quarantine_after``,
``quarantine_file`` (see ``_scf``)

All three directions periodic (a molecule goes in a vacuum box and is
treated as periodic, like the ``qe`` backend).  Units out: eV, eV/Å, eV/Å³
(ASE sign: CP2K prints the stress as a pressure, positive for a compressed cell).  With smearing, the energy is the
free energy (CP2K's total energy includes the electronic entropy term), the
quantity the forces and stress are derivatives of.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from ase.units import GPa, Bohr, Hartree

from protos.errors import CalculationFailed, InvalidInput, SetupError

from ..base import Labels, register_backend
from ._scf import ScfOracle, check_positive, checked_kpoints, kpoint_grid, merge_settings
from ._subprocess import (
    check_keep_policy,
    describe_returncode,
    find_executable,
    run_command,
    scratch_directory,
    tail_file,
    tail_text,
    thread_env,
)

__all__ = ["CP2KOracle", "parse_cp2k_output", "write_cp2k_input", "read_data_file", "find_data_dir", "CP2K_HINT"]

CP2K_HINT = (
    "Install CP2K with `bash oracle_service/setup/install_system_packages.sh` "
    "(Debian packages cp2k and cp2k-data), or set the cp2k backend's `command` to your cp2k executable."
)
DATA_HINT = (
    "CP2K's basis-set and pseudopotential files come with the Debian package cp2k-data "
    "(`bash oracle_service/setup/install_system_packages.sh`); or set the cp2k backend's `data_dir` "
    "(or $CP2K_DATA_DIR) to the directory that holds them."
)

#: executables tried in this order when ``command`` is not set (Debian: cp2k -> cp2k.psmp)
COMMANDS = ("cp2k", "cp2k.psmp", "cp2k.ssmp", "cp2k.popt", "cp2k.sopt")
#: where CP2K's data files are looked for when neither ``data_dir`` nor $CP2K_DATA_DIR is set
DATA_DIRS = ("/usr/share/cp2k", "/usr/share/cp2k/data", "/usr/local/share/cp2k", "/opt/cp2k/data")

#: conversions (ASE's CODATA constants)
HARTREE_TO_EV = Hartree
HARTREE_PER_BOHR_TO_EV_PER_ANG = Hartree / Bohr
GPA_TO_EV_PER_ANG3 = GPa

MIXINGS = {"broyden": "BROYDEN_MIXING", "pulay": "PULAY_MIXING", "kerker": "KERKER_MIXING",
           "direct": "DIRECT_P_MIXING"}
SMEARINGS = ("fermi-dirac",)
#: escalation used when ``retries`` is not given (``retries: []`` disables retrying); it changes only
#: how the SCF gets there, never the physics (cutoffs, smearing), so retried labels fit with the others
DEFAULT_RETRIES = (
    {"max_scf": 100, "mixing_alpha": 0.2},
    {"max_scf": 200, "mixing_alpha": 0.1, "mixing_method": "pulay"},
)


# ---------------------------------------------------------------------------
# data files


def find_data_dir(data_dir: str | os.PathLike | None, files: Sequence[str]) -> Path:
    """The directory holding CP2K's ``files`` (``data_dir``, else $CP2K_DATA_DIR, else :data:`DATA_DIRS`).

    Raises :class:`SetupError` naming the package when none has them.
    """
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        env = os.environ.get("CP2K_DATA_DIR")
        candidates = ([Path(env)] if env else []) + [Path(d) for d in DATA_DIRS]
    for path in candidates:
        if all((path / f).is_file() for f in files):
            return path
    where = ", ".join(str(p) for p in candidates)
    raise SetupError(f"cp2k: data files {list(files)} not found in {where}. {DATA_HINT}")


def read_data_file(path: str | os.PathLike) -> dict[str, dict[str, tuple[tuple[str, ...], str]]]:
    """Entries of a CP2K basis-set or GTH-potential file: {element: {name: (all names, line after the header)}}.

    A header is a non-comment line whose first word is an element symbol
    followed by one or more names (aliases of the same entry, e.g.
    ``Al GTH-PBE-q3 GTH-PBE``); every name maps to the entry's names and
    the line right after the header (for GTH potentials: the number of
    valence electrons per angular momentum).
    """
    entries: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {}
    lines = Path(path).read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        words = line.split("#", 1)[0].split()
        if len(words) < 2 or words[0] not in atomic_numbers or words[0] == "X":
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        for name in words[1:]:
            entries.setdefault(words[0], {}).setdefault(name, (tuple(words[1:]), following))
    return entries


def _valence(line: str) -> int:
    try:
        return sum(int(w) for w in line.split())
    except ValueError:
        return 0


# ---------------------------------------------------------------------------
# input


def initial_magnetization(params: Mapping[str, Any], element: str) -> float:
    """Initial moment (μB per atom, atomic guess) of ``element`` from the ``magnetization`` setting
    (a number for every element, or {element: μB}; default 1.0)."""
    mag = params.get("magnetization")
    if mag is None:
        return 1.0
    if isinstance(mag, Mapping):
        return float(mag.get(element, 0.0))
    return float(mag)


def spin_multiplicity(n_electrons: int, moment: float) -> int:
    """2S + 1 for ``n_electrons`` with a total moment near ``moment`` μB (parity fixed: n↑ - n↓ ≡ n mod 2)."""
    m = abs(int(round(moment)))
    if (n_electrons - m) % 2:
        m += 1
    return m + 1


def gamma_centred_kpoints(grid: Sequence[int]) -> list[tuple[tuple[float, float, float], float]]:
    """A Γ-centred n1×n2×n3 grid (fractions of the reciprocal vectors, in (-½, ½]) with weights summing to 1,
    k and -k merged (time reversal; no other symmetry is used)."""
    n = [int(g) for g in grid]
    total = n[0] * n[1] * n[2]
    merged: dict[tuple[int, int, int], int] = {}
    for i in range(n[0]):
        for j in range(n[1]):
            for k in range(n[2]):
                key = (i, j, k)
                partner = ((-i) % n[0], (-j) % n[1], (-k) % n[2])
                rep = min(key, partner)
                merged[rep] = merged.get(rep, 0) + 1
    points = []
    for (i, j, k), count in sorted(merged.items()):
        frac = tuple(float(c / m - (1.0 if c / m > 0.5 + 1e-12 else 0.0)) for c, m in zip((i, j, k), n))
        points.append((frac, count / total))
    return points  # type: ignore[return-value]


def write_cp2k_input(
    atoms: Atoms,
    kinds: Mapping[str, tuple[str, str]],
    params: Mapping[str, Any],
    basis_path: str,
    potential_path: str,
    kgrid: Sequence[int],
    stress: bool,
    added_mos: int,
    multiplicity: int | None = None,
) -> str:
    """The text of a CP2K ENERGY_FORCE input for ``atoms`` (cell and positions in Å, input order).

    kinds: element -> (basis set name, potential name); params: the backend
    settings merged with retry overrides; kgrid: the k-point grid,
    Monkhorst-Pack (CP2K's scheme: shifted off Γ for even n) or Γ-centred
    when ``params["gamma"]`` (an explicit list); (1, 1, 1) = Γ point, no
    &KPOINTS section (CP2K's Γ-only code).
    With ``params["uks"]``: spin-polarised (UKS), each element's atoms start
    from ``params["magnetization"][element]`` μB in the atomic guess, and
    ``multiplicity`` (if not None) fixes 2S + 1.
    """
    smear = bool(params.get("smearing"))
    lines = [
        "&GLOBAL",
        "  PROJECT epicycle",
        "  RUN_TYPE ENERGY_FORCE",
        "  PRINT_LEVEL LOW",
        "&END GLOBAL",
        "&FORCE_EVAL",
        "  METHOD QS",
        f"  STRESS_TENSOR {'ANALYTICAL' if stress else 'NONE'}",
        "  &PRINT",
        "    &FORCES ON",
        "    &END FORCES",
    ]
    if stress:
        lines += ["    &STRESS_TENSOR ON", "    &END STRESS_TENSOR"]
    lines += [
        "  &END PRINT",
        "  &DFT",
        f"    BASIS_SET_FILE_NAME {basis_path}",
        f"    POTENTIAL_FILE_NAME {potential_path}",
    ]
    uks = bool(params.get("uks"))
    if uks:
        lines.append("    UKS")
        if multiplicity is not None:
            lines.append(f"    MULTIPLICITY {int(multiplicity)}")
    lines += [
        "    &MGRID",
        f"      CUTOFF {float(params['cutoff']):.10g}",
        f"      REL_CUTOFF {float(params['rel_cutoff']):.10g}",
        f"      NGRIDS {int(params['ngrids'])}",
        "    &END MGRID",
        "    &QS",
        "      METHOD GPW",
        f"      EPS_DEFAULT {float(params['eps_default']):.3e}",
        "    &END QS",
        "    &SCF",
        f"      EPS_SCF {float(params['eps_scf']):.3e}",
        f"      MAX_SCF {int(params['max_scf'])}",
        f"      ADDED_MOS {int(added_mos)}",
        "      SCF_GUESS ATOMIC",
        "      &MIXING",
        f"        METHOD {MIXINGS[str(params['mixing_method']).lower()]}",
        f"        ALPHA {float(params['mixing_alpha']):.10g}",
        "      &END MIXING",
    ]
    if smear:
        lines += [
            "      &SMEAR ON",
            "        METHOD FERMI_DIRAC",
            f"        ELECTRONIC_TEMPERATURE [K] {float(params['electronic_temperature']):.10g}",
            "      &END SMEAR",
        ]
    lines += [
        "      &PRINT",
        "        &RESTART OFF",
        "        &END RESTART",
        "      &END PRINT",
        "    &END SCF",
    ]
    if tuple(int(k) for k in kgrid) != (1, 1, 1):
        lines.append("    &KPOINTS")
        if params.get("gamma"):
            lines.append("      SCHEME GENERAL")
            lines += [f"      KPOINT {k[0]:.12f} {k[1]:.12f} {k[2]:.12f} {w:.12f}"
                      for k, w in gamma_centred_kpoints(kgrid)]
        else:
            lines.append("      SCHEME MONKHORST-PACK " + " ".join(str(int(k)) for k in kgrid))
        lines.append("    &END KPOINTS")
    lines += [
        "    &XC",
        f"      &XC_FUNCTIONAL {str(params['xc']).upper()}",
        "      &END XC_FUNCTIONAL",
        "    &END XC",
        "  &END DFT",
        "  &SUBSYS",
        "    &CELL",
    ]
    for label, row in zip("ABC", atoms.cell.array):
        lines.append(f"      {label} " + " ".join(f"{x:.12f}" for x in row))
    lines += ["      PERIODIC XYZ", "    &END CELL", "    &COORD"]
    lines += [f"      {s} " + " ".join(f"{x:.12f}" for x in pos)
              for s, pos in zip(atoms.get_chemical_symbols(), atoms.positions)]
    lines.append("    &END COORD")
    for element, (basis, potential) in kinds.items():
        lines += [f"    &KIND {element}", f"      BASIS_SET {basis}", f"      POTENTIAL {potential}"]
        if uks:
            lines.append(f"      MAGNETIZATION {initial_magnetization(params, element):.10g}")
        lines.append("    &END KIND")
    lines += ["  &END SUBSYS", "&END FORCE_EVAL"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# output

_FLOAT = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eEdD][-+]?\d+)?"
_ENERGY = re.compile(r"^\s*ENERGY\| Total FORCE_EVAL \( QS \) energy \[a\.u\.\]:\s+(" + _FLOAT + ")", re.M)
_CONVERGED = re.compile(r"\*\*\* SCF run converged in\s+(\d+)\s+steps \*\*\*")
_NOT_CONVERGED = re.compile(r"SCF run NOT converged")
_LEAVING = re.compile(r"Leaving inner SCF loop after reaching\s+(\d+)\s+steps")
_FORCE_LINE = re.compile(r"^\s*(\d+)\s+\d+\s+([A-Z][a-z]?)\s+(" + _FLOAT + r")\s+(" + _FLOAT + r")\s+("
                         + _FLOAT + r")\s*$")
_STRESS_ROW = re.compile(r"^\s*STRESS\|\s+([xyz])\s+(" + _FLOAT + r")\s+(" + _FLOAT + r")\s+(" + _FLOAT + r")\s*$",
                         re.M)
_VERSION = re.compile(r"CP2K version\s+(\S+)")


def cp2k_log_tail(text: str, lines: int = 30) -> str:
    """The informative end of a CP2K output: the lines before the statistics/timing report, then its last lines."""
    cut = re.search(r"^ -\s+DBCSR STATISTICS\s+-\s*$", text, re.M)
    if cut is None:
        return tail_text(text, lines)
    return tail_text(text[: cut.start()], lines) + "\n [... statistics and timing report ...]\n" + \
        tail_text(text[cut.start():], 4)


def _abort_message(text: str) -> str | None:
    """The message of CP2K's ``[ABORT]`` box (the text right of the ASCII art), or None."""
    start = text.find("[ABORT]")
    if start < 0:
        return None
    box_start = text.rfind("\n", 0, start) + 1
    parts = []
    for line in text[box_start:].splitlines():
        stripped = line.strip()
        if stripped.startswith("****") and parts:
            break
        if not (stripped.startswith("*") and stripped.endswith("*")) or len(stripped) < 3:
            if parts:
                break
            continue
        inner = stripped[1:-1]
        content = inner[10:].strip() if len(inner) > 10 else ""
        if content:
            parts.append(content)
    return " ".join(parts) or "(no message)"


def parse_cp2k_output(text: str, n_atoms: int, want_stress: bool, returncode: int = 0) -> dict[str, Any]:
    """Energy (eV), forces (eV/Å), stress (eV/Å³, ASE sign, Voigt) from a CP2K ENERGY_FORCE output.

    Raises :class:`CalculationFailed` (message = the reason, ``log_tail`` =
    the end of ``text``) unless the output proves a converged calculation.
    """
    tail = cp2k_log_tail(text)
    abort = _abort_message(text)
    if abort is not None:
        raise CalculationFailed(f"cp2k stopped with an error: {abort}", tail)
    if _NOT_CONVERGED.search(text):
        steps = _LEAVING.findall(text)
        after = f" after {steps[-1]} steps" if steps else ""
        raise CalculationFailed(f"SCF did not converge: cp2k reports 'SCF run NOT converged'{after}", tail)
    if returncode != 0:
        raise CalculationFailed(f"cp2k crashed ({describe_returncode(returncode)})", tail)
    if "PROGRAM ENDED AT" not in text:
        raise CalculationFailed("cp2k output is incomplete (no 'PROGRAM ENDED AT'): the run was interrupted", tail)
    converged = _CONVERGED.findall(text)
    if not converged:
        raise CalculationFailed("cp2k output does not report SCF convergence ('SCF run converged in' missing)", tail)
    energies = _ENERGY.findall(text)
    if not energies:
        raise CalculationFailed("cp2k output has no final energy ('ENERGY| Total FORCE_EVAL ( QS ) energy')", tail)
    result: dict[str, Any] = {"energy": float(energies[-1]) * HARTREE_TO_EV, "scf_iterations": int(converged[-1])}

    start = text.rfind("ATOMIC FORCES in [a.u.]")
    if start < 0:
        raise CalculationFailed("cp2k output has no forces block ('ATOMIC FORCES in [a.u.]')", tail)
    forces = np.full((n_atoms, 3), np.nan)
    seen: set[int] = set()
    for line in text[start:].splitlines()[1:]:
        if line.lstrip().startswith("SUM OF ATOMIC FORCES"):
            break
        m = _FORCE_LINE.match(line)
        if m is None:
            continue
        i = int(m.group(1)) - 1
        if not 0 <= i < n_atoms or i in seen:
            break
        seen.add(i)
        forces[i] = [float(m.group(k)) for k in (3, 4, 5)]
    if len(seen) != n_atoms:
        raise CalculationFailed(f"cp2k forces block has {len(seen)} atoms, expected {n_atoms}", tail)
    result["forces"] = forces * HARTREE_PER_BOHR_TO_EV_PER_ANG

    if want_stress:
        block = text.rfind("STRESS| Analytical stress tensor [GPa]")
        if block < 0:
            raise CalculationFailed("cp2k output has no stress tensor ('STRESS| Analytical stress tensor [GPa]')",
                                    tail)
        rows = {}
        for m in _STRESS_ROW.finditer(text, block):
            if m.group(1) in rows:
                break
            rows[m.group(1)] = [float(m.group(k)) for k in (2, 3, 4)]
        if sorted(rows) != ["x", "y", "z"]:
            raise CalculationFailed("cp2k stress tensor is incomplete", tail)
        s = np.array([rows["x"], rows["y"], rows["z"]])
        # CP2K prints -(1/V) dE/dε in GPa (a pressure: positive when the cell wants to expand);
        # ASE's stress is +(1/V) dE/dε
        s = -s * GPA_TO_EV_PER_ANG3
        result["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    return result


# ---------------------------------------------------------------------------
# backend


@register_backend("cp2k")
class CP2KOracle(ScfOracle):
    """CP2K GPW backend (see the module docstring for the settings)."""

    name = "cp2k"
    implemented_properties = ("energy", "forces", "stress")
    thread_safe = True  # every call has its own scratch directory and process
    retry_keys = frozenset({"max_scf", "mixing_alpha", "mixing_method", "eps_scf", "electronic_temperature",
                            "added_mos", "cutoff", "rel_cutoff", "timeout"})

    def __init__(
        self,
        *,
        cutoff: float = 400.0,
        rel_cutoff: float = 50.0,
        ngrids: int = 4,
        basis_set: str | Mapping[str, str] = "DZVP-MOLOPT-SR-GTH",
        potential: str | Mapping[str, str] | None = None,
        xc: str = "PBE",
        data_dir: str | os.PathLike | None = None,
        basis_file: str = "BASIS_MOLOPT",
        potential_file: str = "GTH_POTENTIALS",
        kpts: Sequence[int] | None = (4, 4, 4),
        kspacing: float | None = None,
        gamma: bool = False,
        smearing: str | None = "fermi-dirac",
        electronic_temperature: float = 1000.0,
        uks: bool = False,
        magnetization: Mapping[str, float] | float | None = None,
        multiplicity: int | None = None,
        added_mos: int | None = None,
        eps_scf: float = 1e-7,
        max_scf: int = 50,
        mixing_method: str = "broyden",
        mixing_alpha: float = 0.4,
        eps_default: float = 1e-12,
        command: str | None = None,
        mpi_procs: int = 1,
        mpirun: str = "mpirun",
        threads: int = 1,
        timeout: float = 3600.0,
        scratch_dir: str | os.PathLike | None = None,
        keep_scratch: str = "never",
        retries: Sequence[Mapping[str, Any]] | None = DEFAULT_RETRIES,
        retry_on_timeout: bool = False,
        quarantine_after: int = 1,
        quarantine_file: str | None = None,
    ) -> None:
        self._params: dict[str, Any] = {
            "cutoff": cutoff,
            "rel_cutoff": rel_cutoff,
            "ngrids": ngrids,
            "xc": xc,
            "gamma": bool(gamma),
            "smearing": smearing,
            "electronic_temperature": electronic_temperature,
            "uks": bool(uks),
            "magnetization": dict(magnetization) if isinstance(magnetization, Mapping) else magnetization,
            "multiplicity": multiplicity,
            "added_mos": added_mos,
            "eps_scf": eps_scf,
            "max_scf": max_scf,
            "mixing_method": mixing_method,
            "mixing_alpha": mixing_alpha,
            "eps_default": eps_default,
            "timeout": timeout,
        }
        self.basis_set = dict(basis_set) if isinstance(basis_set, Mapping) else str(basis_set)
        if potential is None:
            potential = f"GTH-{str(xc).upper()}"
        self.potential = dict(potential) if isinstance(potential, Mapping) else str(potential)
        self.kpts, self.kspacing = checked_kpoints(kpts, kspacing)
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.basis_file = str(basis_file)
        self.potential_file = str(potential_file)
        self.command = command
        self.mpi_procs = int(mpi_procs)
        self.mpirun = mpirun
        self.threads = int(threads)
        self.scratch_dir = str(scratch_dir) if scratch_dir is not None else None
        self.keep_scratch = check_keep_policy(keep_scratch)
        self._validate(self._params)
        check_positive("mpi_procs", self.mpi_procs, integer=True)
        check_positive("threads", self.threads, integer=True)
        super().__init__(retries=retries, retry_on_timeout=retry_on_timeout, quarantine_after=quarantine_after,
                         quarantine_file=quarantine_file)
        for entry in self.retries:
            self._validate(merge_settings(self._params, entry))
        self._version: str | None = None
        self._lock = threading.Lock()
        self._data: dict[str, tuple[float, str, dict]] = {}
        self._argv()  # fail at start-up, not at the first request, when cp2k (or mpirun) is missing

    # -- settings -------------------------------------------------------------------

    @staticmethod
    def _validate(p: Mapping[str, Any]) -> None:
        check_positive("cutoff (Ry)", p["cutoff"])
        check_positive("rel_cutoff (Ry)", p["rel_cutoff"])
        check_positive("ngrids", p["ngrids"], integer=True)
        if p.get("smearing") is not None:
            if str(p["smearing"]).lower() not in SMEARINGS:
                raise InvalidInput(f"smearing must be one of {SMEARINGS} or None, got {p['smearing']!r}")
            check_positive("electronic_temperature (K)", p["electronic_temperature"])
        if p.get("added_mos") is not None:
            check_positive("added_mos", p["added_mos"], integer=True, allow_zero=True)
        if p.get("multiplicity") is not None:
            check_positive("multiplicity", p["multiplicity"], integer=True)
        mag = p.get("magnetization")
        values = list(mag.values()) if isinstance(mag, Mapping) else [] if mag is None else [mag]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise InvalidInput(f"magnetization must be a number of μB (or {{element: μB}}), got {mag!r}")
        check_positive("eps_scf", p["eps_scf"])
        check_positive("max_scf", p["max_scf"], integer=True)
        if str(p["mixing_method"]).lower() not in MIXINGS:
            raise InvalidInput(f"mixing_method must be one of {sorted(MIXINGS)}, got {p['mixing_method']!r}")
        if not (isinstance(p["mixing_alpha"], (int, float)) and 0 < p["mixing_alpha"] <= 1):
            raise InvalidInput(f"mixing_alpha must be in (0, 1], got {p['mixing_alpha']!r}")
        check_positive("eps_default", p["eps_default"])
        check_positive("timeout (s)", p["timeout"])
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(p["xc"])):
            raise InvalidInput(f"xc must be a CP2K XC_FUNCTIONAL shortcut such as PBE, got {p['xc']!r}")

    def settings(self) -> dict[str, Any]:
        p = dict(self._params)
        p.update(
            basis_set=self.basis_set,
            potential=self.potential,
            kpts=self.kpts,
            kspacing=self.kspacing,
            data_files=self._data_report(),
            mpi_procs=self.mpi_procs,
            threads=self.threads,
            command=self.command,
        )
        p.update(self.retry_settings())
        return p

    def _data_dir(self) -> Path:
        return find_data_dir(self.data_dir, (self.basis_file, self.potential_file))

    def _read(self, path: Path) -> tuple[str, dict]:
        """(sha256, entries) of a data file, cached by modification time."""
        mtime = path.stat().st_mtime
        with self._lock:
            cached = self._data.get(str(path))
            if cached and cached[0] == mtime:
                return cached[1], cached[2]
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        entries = read_data_file(path)
        with self._lock:
            self._data[str(path)] = (mtime, digest, entries)
        return digest, entries

    def _data_report(self) -> dict[str, str]:
        try:
            directory = self._data_dir()
        except SetupError:
            return {"basis_file": f"{self.basis_file} (missing)", "potential_file": f"{self.potential_file} (missing)"}
        return {key: f"{directory / name} sha256:{self._read(directory / name)[0]}"
                for key, name in (("basis_file", self.basis_file), ("potential_file", self.potential_file))}

    def _name_for(self, setting: str | dict, element: str) -> str | None:
        if isinstance(setting, dict):
            return setting.get(element)
        return setting

    def kinds(self, elements: Sequence[str]) -> tuple[dict[str, tuple[str, str]], dict[str, int]]:
        """element -> (basis name, potential name) and element -> valence electrons, or InvalidInput."""
        directory = self._data_dir()
        _, basis_entries = self._read(directory / self.basis_file)
        _, potential_entries = self._read(directory / self.potential_file)
        kinds: dict[str, tuple[str, str]] = {}
        valence: dict[str, int] = {}
        problems = []
        for el in elements:
            basis = self._name_for(self.basis_set, el)
            bases = basis_entries.get(el, {})
            if basis is None:
                problems.append(f"{el}: the basis_set mapping has no entry for it (available in {self.basis_file}: "
                                f"{sorted(bases)})")
                continue
            if basis not in bases:
                problems.append(f"{el}: no basis set {basis!r} in {self.basis_file} (available: {sorted(bases)})")
                continue
            family = self._name_for(self.potential, el)
            potentials = potential_entries.get(el, {})
            if family is None:
                problems.append(f"{el}: the potential mapping has no entry for it (available in "
                                f"{self.potential_file}: {sorted(potentials)})")
                continue
            # the valence the basis was optimised for: the -qN suffix of one of its names
            q = [m.group(1) for name in bases[basis][0] for m in [re.search(r"-q(\d+)$", name)] if m]
            candidates = ([f"{family}-q{q[0]}"] if q and not re.search(r"-q\d+$", family) else []) + [family]
            chosen = next((c for c in candidates if c in potentials), None)
            if chosen is None:
                problems.append(f"{el}: no potential {' or '.join(repr(c) for c in candidates)} in "
                                f"{self.potential_file} (available: {sorted(potentials)})")
                continue
            kinds[el] = (basis, chosen)
            valence[el] = _valence(potentials[chosen][1])
        if problems:
            raise InvalidInput("cp2k: " + "; ".join(problems))
        return kinds, valence

    def supported_numbers(self) -> frozenset[int] | None:
        try:
            directory = self._data_dir()
            _, basis_entries = self._read(directory / self.basis_file)
            _, potential_entries = self._read(directory / self.potential_file)
        except (SetupError, OSError):
            return None
        ok = []
        for el in sorted(set(basis_entries) & set(potential_entries)):
            try:
                self.kinds([el])
            except InvalidInput:
                continue
            ok.append(atomic_numbers[el])
        return frozenset(ok)

    def version(self) -> str:
        with self._lock:
            if self._version is None:
                try:
                    exe = self._executable()
                    with scratch_directory(self.scratch_dir, "epicycle-cp2k-version-", "never") as work:
                        out = subprocess.run([exe, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                                             timeout=30, env=thread_env(1), start_new_session=True, cwd=work)
                    m = _VERSION.search(out.stdout.decode(errors="replace"))
                    self._version = f"cp2k {m.group(1)}" if m else "cp2k (unknown version)"
                except (SetupError, OSError, subprocess.TimeoutExpired):
                    return "cp2k (not available)"
            return self._version

    # -- one attempt ------------------------------------------------------------------

    def _executable(self) -> str:
        if self.command is not None:
            return find_executable(self.command, CP2K_HINT)
        for name in COMMANDS:
            try:
                return find_executable(name, CP2K_HINT)
            except SetupError:
                continue
        raise SetupError(f"no cp2k executable ({', '.join(COMMANDS)}) found on PATH. {CP2K_HINT}")

    def _argv(self) -> list[str]:
        argv = [self._executable()]
        if self.mpi_procs > 1:
            runner = find_executable(self.mpirun, "Install an MPI launcher (openmpi-bin) or set mpi_procs: 1.")
            argv = [runner, "-np", str(self.mpi_procs), *argv]
        return argv

    def calculate_once(self, atoms: Atoms, properties: tuple[str, ...], overrides: Mapping[str, Any],
                       cancel: threading.Event | None = None) -> Labels:
        if atoms.cell.rank < 3:
            raise InvalidInput("cp2k needs a cell with three independent vectors (put molecules in a vacuum box); "
                               "directions with pbc=False are treated as periodic with one k-point")
        params = merge_settings(self._params, overrides)
        argv = self._argv()
        directory = self._data_dir()
        elements = list(dict.fromkeys(atoms.get_chemical_symbols()))
        kinds, valence = self.kinds(elements)
        symbols = atoms.get_chemical_symbols()
        electrons = sum(valence[s] for s in symbols)
        added = params.get("added_mos")
        if added is None:
            added = max(10, math.ceil(0.3 * electrons / 2)) if params.get("smearing") else 0
        multiplicity = params.get("multiplicity")
        if params.get("uks") and multiplicity is None and not params.get("smearing"):
            # fixed occupations need a spin state; with smearing the moment floats
            multiplicity = spin_multiplicity(electrons, sum(initial_magnetization(params, s) for s in symbols))
        want_stress = "stress" in properties
        kgrid = kpoint_grid(atoms, self.kpts, self.kspacing)
        text = write_cp2k_input(atoms, kinds, params, str((directory / self.basis_file).resolve()),
                                str((directory / self.potential_file).resolve()), kgrid, want_stress, int(added),
                                multiplicity)
        with scratch_directory(self.scratch_dir, "epicycle-cp2k-", self.keep_scratch) as work:
            (work / "cp2k.inp").write_text(text)
            log_path = work / "cp2k.out"
            rc = run_command([*argv, "-i", "cp2k.inp"], cwd=work, log_path=log_path,
                             timeout=float(params["timeout"]), env=thread_env(self.threads), what="cp2k",
                             cancel=cancel)
            try:
                output = log_path.read_text(errors="replace")
            except OSError:
                raise CalculationFailed(f"cp2k wrote no output ({describe_returncode(rc)})",
                                        tail_file(log_path)) from None
            result = parse_cp2k_output(output, len(atoms), want_stress, rc)
        info = {"backend": self.name, "scf_iterations": result["scf_iterations"], "kpts": list(kgrid),
                "added_mos": int(added)}
        if params.get("uks"):
            info["multiplicity"] = multiplicity  # None: the moment floats (smearing)
        return Labels(energy=result["energy"], forces=result["forces"], stress=result.get("stress"), info=info)
