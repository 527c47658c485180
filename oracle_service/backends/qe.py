"""Quantum ESPRESSO (``pw.x``) oracle: plane-wave DFT with norm-conserving pseudopotentials.

Registered as ``qe``.  Each calculation writes a ``pw.x`` input, runs
``pw.x`` in its own scratch directory and process group (killed as a whole
on the wall-time limit -> :class:`~protos.errors.CalculationTimeout`), and
parses the output.  When nobody waits for the result any more (``cancel``
set by the service), pw.x is killed the same way
(:class:`~oracle_service.base.CalculationCancelled`).  Labels are only returned when the output proves that
the SCF converged ("convergence has been achieved", no "convergence NOT
achieved", ``JOB DONE``, forces for every atom, the stress tensor when
asked); anything else is :class:`~protos.errors.CalculationFailed` with the
reason and the tail of the log.  Retries with escalated settings and
quarantine: :mod:`oracle_service.backends._scf`.

Settings (units are QE's own: Ry for energies):

``ecutwfc`` (Ry, 30)  ``ecutrho`` (Ry, default 4·ecutwfc)
``kpts`` ([4, 4, 4]) or ``kspacing`` (Å⁻¹ incl. 2π; overrides kpts), ``koffset`` ([0, 0, 0])
``smearing`` ("mv"; "gaussian", "mp", "fd", or None for fixed occupations), ``degauss`` (Ry, 0.02)
``nspin`` (1 or 2), ``starting_magnetization`` ({element: fraction}, default 0.2 each when nspin=2)
``conv_thr`` (Ry per cell, 1e-8), ``mixing_beta`` (0.7), ``mixing_mode`` ("plain"),
``electron_maxstep`` (100), ``diagonalization`` ("david")
``pseudo_dir`` (default: ``oracle_service/pseudo/generated``), ``pseudopotentials``
({element: UPF file name in pseudo_dir}, default: the Epicycle ld1.x files),
``generate_pseudopotentials`` (True: make missing Epicycle files with ld1.x on first use)
``command`` ("pw.x"), ``mpi_procs`` (1 = no mpirun), ``mpirun`` ("mpirun"), ``pw_args`` ([]),
``threads`` (1: OMP/OpenBLAS threads), ``timeout`` (s, 3600), ``scratch_dir`` (None = system temp),
``keep_scratch`` ("never"; "on_failure" keeps the directory of a failed run), ``extra_input``
({"system": {"nbnd": 20}, ...})
``retries`` (default :data:`DEFAULT_RETRIES`), ``retry_on_timeout``, ``quarantine_after``,
``quarantine_file`` (see ``_scf``)

The exchange-correlation functional is the one the pseudopotentials were
made for (PBE for the Epicycle set); :meth:`QEOracle.settings` reports it
with each file's SHA-256.

Units out: eV, eV/Å, eV/Å³ (ASE sign: QE prints the stress with the opposite sign).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers
from ase.units import Bohr, Ry

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

__all__ = ["QEOracle", "parse_pw_output", "write_pw_input", "PW_HINT"]

PW_HINT = (
    "Install Quantum ESPRESSO with `bash oracle_service/setup/install_system_packages.sh` "
    "(Debian package quantum-espresso), or set the qe backend's `command` to your pw.x."
)

#: conversions (ASE's CODATA constants)
RY_TO_EV = Ry
RY_PER_BOHR_TO_EV_PER_ANG = Ry / Bohr
RY_PER_BOHR3_TO_EV_PER_ANG3 = Ry / Bohr**3

SMEARINGS = ("gaussian", "mp", "mv", "fd", "m-p", "m-v", "f-d", "cold", "marzari-vanderbilt",
             "methfessel-paxton", "fermi-dirac", "gauss")
#: settings the backend controls itself; extra_input may not touch them
RESERVED = {"calculation", "tprnfor", "tstress", "outdir", "pseudo_dir", "prefix", "nat", "ntyp", "ibrav",
            "celldm", "a", "b", "c", "cosab", "cosac", "cosbc", "disk_io"}
NAMELISTS = ("control", "system", "electrons")
#: escalation used when ``retries`` is not given (``retries: []`` disables retrying)
DEFAULT_RETRIES = (
    {"electron_maxstep": 200, "mixing_beta": 0.3},
    {"electron_maxstep": 300, "mixing_beta": 0.1, "mixing_mode": "local-TF"},
)


# ---------------------------------------------------------------------------
# input


def _fortran(value: Any) -> str:
    if isinstance(value, bool):
        return ".true." if value else ".false."
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)).replace("e", "d")
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    raise InvalidInput(f"cannot write {value!r} ({type(value).__name__}) into a pw.x namelist")


def write_pw_input(
    atoms: Atoms,
    species: Mapping[str, str],
    params: Mapping[str, Any],
    pseudo_dir: str,
    kgrid: Sequence[int],
    stress: bool,
) -> str:
    """The text of a ``pw.x`` scf input for ``atoms`` (positions and cell in Å, in input order).

    species: element -> UPF file name; params: the backend settings (merged with retry overrides).
    """
    symbols = atoms.get_chemical_symbols()
    kinds = list(dict.fromkeys(symbols))
    control = {
        "calculation": "scf",
        "prefix": "epicycle",
        "outdir": "./out",
        "pseudo_dir": pseudo_dir,
        "tprnfor": True,
        "tstress": bool(stress),
        "disk_io": "none",
        "verbosity": "low",
    }
    system: dict[str, Any] = {
        "ibrav": 0,
        "nat": len(atoms),
        "ntyp": len(kinds),
        "ecutwfc": float(params["ecutwfc"]),
        "ecutrho": float(params["ecutrho"] if params.get("ecutrho") else 4.0 * float(params["ecutwfc"])),
    }
    if params.get("smearing"):
        system.update(occupations="smearing", smearing=str(params["smearing"]), degauss=float(params["degauss"]))
    else:
        system["occupations"] = "fixed"
    nspin = int(params.get("nspin", 1))
    if nspin == 2:
        system["nspin"] = 2
        mags = params.get("starting_magnetization") or {}
        for i, kind in enumerate(kinds, start=1):
            system[f"starting_magnetization({i})"] = float(mags.get(kind, 0.2) if isinstance(mags, Mapping) else mags)
    electrons = {
        "conv_thr": float(params["conv_thr"]),
        "mixing_beta": float(params["mixing_beta"]),
        "mixing_mode": str(params["mixing_mode"]),
        "electron_maxstep": int(params["electron_maxstep"]),
        "diagonalization": str(params["diagonalization"]),
    }
    blocks = {"control": control, "system": system, "electrons": electrons}
    for namelist, entries in (params.get("extra_input") or {}).items():
        blocks[namelist.lower()].update(entries)

    lines: list[str] = []
    for name in NAMELISTS:
        lines.append(f"&{name.upper()}")
        lines += [f"  {key} = {_fortran(value)}" for key, value in blocks[name].items()]
        lines.append("/")
    lines.append("ATOMIC_SPECIES")
    for kind in kinds:
        lines.append(f"  {kind} {atomic_masses[atomic_numbers[kind]]:.6f} {species[kind]}")
    lines.append("CELL_PARAMETERS angstrom")
    lines += ["  " + " ".join(f"{x:.12f}" for x in row) for row in atoms.cell.array]
    lines.append("ATOMIC_POSITIONS angstrom")
    lines += [f"  {s} " + " ".join(f"{x:.12f}" for x in pos) for s, pos in zip(symbols, atoms.positions)]
    offset = params.get("koffset") or (0, 0, 0)
    lines.append("K_POINTS automatic")
    lines.append("  " + " ".join(str(int(k)) for k in kgrid) + " " + " ".join(str(int(o)) for o in offset))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# output

_FLOAT = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eEdD][-+]?\d+)?"
_ENERGY = re.compile(r"^!\s+total energy\s+=\s+(" + _FLOAT + r")\s+Ry", re.M)
_FORCE = re.compile(r"^\s*atom\s+(\d+)\s+type\s+\d+\s+force\s+=\s+(" + _FLOAT + r")\s+(" + _FLOAT + r")\s+("
                    + _FLOAT + r")", re.M)
_STRESS = re.compile(r"total\s+stress\s+\(Ry/bohr\*\*3\)\s+\(kbar\)\s+P=\s*(" + _FLOAT + r")\s*\n"
                     + r"\s*(" + _FLOAT + r")\s+(" + _FLOAT + r")\s+(" + _FLOAT + r").*\n"
                     + r"\s*(" + _FLOAT + r")\s+(" + _FLOAT + r")\s+(" + _FLOAT + r").*\n"
                     + r"\s*(" + _FLOAT + r")\s+(" + _FLOAT + r")\s+(" + _FLOAT + r")")
_ITER = re.compile(r"convergence has been achieved in\s+(\d+)\s+iterations")
_NOT_CONVERGED = re.compile(r"convergence NOT achieved after\s+(\d+)\s+iterations")
_ERROR = re.compile(r"Error in routine\s+(\S+)\s*\((\s*-?\d+)\):\s*\n(.*?)\n\s*%{5,}", re.S)
_MAGNETIZATION = re.compile(r"total magnetization\s+=\s+(" + _FLOAT + r")\s+Bohr mag/cell")


def _num(s: str) -> float:
    return float(s.replace("d", "e").replace("D", "e"))


def pw_log_tail(text: str, lines: int = 30) -> str:
    """The informative end of a pw.x output: the lines before the timing report, then its last lines."""
    cut = re.search(r"^\s+init_run\s+:", text, re.M)
    if cut is None:
        return tail_text(text, lines)
    return tail_text(text[: cut.start()], lines) + "\n     [... timing report ...]\n" + tail_text(text[cut.start():], 4)


def parse_pw_output(text: str, n_atoms: int, want_stress: bool, returncode: int = 0) -> dict[str, Any]:
    """Energy (eV), forces (eV/Å), stress (eV/Å³, ASE sign, Voigt) from a pw.x scf output.

    Raises :class:`CalculationFailed` (message = the reason, ``log_tail`` =
    the end of ``text``) unless the output proves a converged calculation.
    """
    tail = pw_log_tail(text)
    err = _ERROR.search(text)
    if err:
        message = " ".join(line.strip() for line in err.group(3).splitlines() if line.strip())
        raise CalculationFailed(f"pw.x stopped with an error in routine {err.group(1)}: {message}", tail)
    nc = _NOT_CONVERGED.search(text)
    if nc:
        raise CalculationFailed(f"SCF did not converge: pw.x reports 'convergence NOT achieved after "
                                f"{nc.group(1)} iterations'", tail)
    if returncode != 0:
        raise CalculationFailed(f"pw.x crashed ({describe_returncode(returncode)})", tail)
    if "JOB DONE" not in text:
        raise CalculationFailed("pw.x output is incomplete (no 'JOB DONE'): the run was interrupted", tail)
    iters = _ITER.search(text)
    if not iters or "End of self-consistent calculation" not in text:
        raise CalculationFailed("pw.x output does not report SCF convergence "
                                "('End of self-consistent calculation' / 'convergence has been achieved' missing)", tail)
    energies = _ENERGY.findall(text)
    if not energies:
        raise CalculationFailed("pw.x output has no final total energy ('!    total energy')", tail)
    result: dict[str, Any] = {"energy": _num(energies[-1]) * RY_TO_EV, "scf_iterations": int(iters.group(1))}

    block_start = text.rfind("Forces acting on atoms")
    if block_start < 0:
        raise CalculationFailed("pw.x output has no forces block ('Forces acting on atoms')", tail)
    forces = np.full((n_atoms, 3), np.nan)
    seen = set()
    for m in _FORCE.finditer(text, block_start):
        i = int(m.group(1)) - 1
        if i in seen or not 0 <= i < n_atoms:
            break  # the next block (non-local contributions etc.) starts again at atom 1
        seen.add(i)
        forces[i] = [_num(m.group(k)) for k in (2, 3, 4)]
        if len(seen) == n_atoms:
            break
    if len(seen) != n_atoms:
        raise CalculationFailed(f"pw.x forces block has {len(seen)} atoms, expected {n_atoms}", tail)
    result["forces"] = forces * RY_PER_BOHR_TO_EV_PER_ANG

    if want_stress:
        stresses = list(_STRESS.finditer(text))
        if not stresses:
            raise CalculationFailed("pw.x output has no stress tensor ('total   stress')", tail)
        s = np.array([_num(stresses[-1].group(k)) for k in range(2, 11)]).reshape(3, 3)
        # QE prints -(1/V) dE/dε (positive = wants to expand); ASE uses +(1/V) dE/dε
        s = -s * RY_PER_BOHR3_TO_EV_PER_ANG3
        result["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    mags = _MAGNETIZATION.findall(text)
    if mags:
        result["magnetization"] = _num(mags[-1])
    return result


# ---------------------------------------------------------------------------
# backend


def _default_pseudo_dir() -> Path:
    from ..pseudo import DEFAULT_DIR

    return DEFAULT_DIR


@register_backend("qe")
class QEOracle(ScfOracle):
    """Quantum ESPRESSO pw.x backend (see the module docstring for the settings)."""

    name = "qe"
    implemented_properties = ("energy", "forces", "stress")
    thread_safe = True  # every call has its own scratch directory and process
    retry_keys = frozenset({"electron_maxstep", "mixing_beta", "mixing_mode", "conv_thr", "diagonalization",
                            "degauss", "smearing", "ecutwfc", "ecutrho", "timeout"})

    def __init__(
        self,
        *,
        ecutwfc: float = 30.0,
        ecutrho: float | None = None,
        kpts: Sequence[int] | None = (4, 4, 4),
        kspacing: float | None = None,
        koffset: Sequence[int] = (0, 0, 0),
        smearing: str | None = "mv",
        degauss: float = 0.02,
        nspin: int = 1,
        starting_magnetization: Mapping[str, float] | float | None = None,
        conv_thr: float = 1e-8,
        mixing_beta: float = 0.7,
        mixing_mode: str = "plain",
        electron_maxstep: int = 100,
        diagonalization: str = "david",
        pseudo_dir: str | os.PathLike | None = None,
        pseudopotentials: Mapping[str, str] | None = None,
        generate_pseudopotentials: bool = True,
        command: str = "pw.x",
        mpi_procs: int = 1,
        mpirun: str = "mpirun",
        pw_args: Sequence[str] = (),
        threads: int = 1,
        timeout: float = 3600.0,
        scratch_dir: str | os.PathLike | None = None,
        keep_scratch: str = "never",
        extra_input: Mapping[str, Mapping[str, Any]] | None = None,
        retries: Sequence[Mapping[str, Any]] | None = DEFAULT_RETRIES,
        retry_on_timeout: bool = False,
        quarantine_after: int = 1,
        quarantine_file: str | None = None,
    ) -> None:
        self._params: dict[str, Any] = {
            "ecutwfc": ecutwfc,
            "ecutrho": ecutrho,
            "smearing": smearing,
            "degauss": degauss,
            "nspin": nspin,
            "starting_magnetization": dict(starting_magnetization) if isinstance(starting_magnetization, Mapping)
            else starting_magnetization,
            "conv_thr": conv_thr,
            "mixing_beta": mixing_beta,
            "mixing_mode": mixing_mode,
            "electron_maxstep": electron_maxstep,
            "diagonalization": diagonalization,
            "koffset": [int(o) for o in koffset],
            "extra_input": {k.lower(): dict(v) for k, v in (extra_input or {}).items()},
            "timeout": timeout,
        }
        self.kpts, self.kspacing = checked_kpoints(kpts, kspacing)
        self.pseudo_dir = Path(pseudo_dir) if pseudo_dir is not None else _default_pseudo_dir()
        self.pseudopotentials = dict(pseudopotentials or {})
        self.generate_pseudopotentials = bool(generate_pseudopotentials)
        self.command = command
        self.mpi_procs = int(mpi_procs)
        self.mpirun = mpirun
        self.pw_args = [str(a) for a in pw_args]
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
        self._hashes: dict[str, tuple[float, str]] = {}
        self._argv()  # fail at start-up, not at the first request, when pw.x (or mpirun) is missing

    # -- settings -------------------------------------------------------------------

    @staticmethod
    def _validate(p: Mapping[str, Any]) -> None:
        check_positive("ecutwfc (Ry)", p["ecutwfc"])
        if p.get("ecutrho") is not None:
            check_positive("ecutrho (Ry)", p["ecutrho"])
            if p["ecutrho"] < 4 * p["ecutwfc"] - 1e-9:
                raise InvalidInput(f"ecutrho ({p['ecutrho']} Ry) must be >= 4 * ecutwfc ({4 * p['ecutwfc']} Ry)")
        if p.get("smearing"):
            if str(p["smearing"]).lower() not in SMEARINGS:
                raise InvalidInput(f"smearing must be one of {SMEARINGS} or None, got {p['smearing']!r}")
            check_positive("degauss (Ry)", p["degauss"])
        if p["nspin"] not in (1, 2):
            raise InvalidInput(f"nspin must be 1 or 2, got {p['nspin']!r}")
        check_positive("conv_thr (Ry)", p["conv_thr"])
        if not (isinstance(p["mixing_beta"], (int, float)) and 0 < p["mixing_beta"] <= 1):
            raise InvalidInput(f"mixing_beta must be in (0, 1], got {p['mixing_beta']!r}")
        check_positive("electron_maxstep", p["electron_maxstep"], integer=True)
        check_positive("timeout (s)", p["timeout"])
        for namelist, entries in p["extra_input"].items():
            if namelist not in NAMELISTS:
                raise InvalidInput(f"extra_input: unknown namelist {namelist!r}; use one of {NAMELISTS}")
            clash = sorted(set(k.lower() for k in entries) & RESERVED)
            if clash:
                raise InvalidInput(f"extra_input may not set {clash}: the qe backend controls them")

    def settings(self) -> dict[str, Any]:
        p = dict(self._params)
        p.update(
            kpts=self.kpts,
            kspacing=self.kspacing,
            pseudo_dir=str(self.pseudo_dir),
            pseudopotentials=self._pseudo_report(),
            mpi_procs=self.mpi_procs,
            threads=self.threads,
            command=self.command,
        )
        p.update(self.retry_settings())
        return p

    def _pseudo_files(self) -> dict[str, str]:
        from ..pseudo import available_elements, upf_filename

        # the shipped set is always known; generate_pseudopotentials only decides whether a missing
        # file is made on first use or reported as a SetupError with the command that makes it
        files = {el: upf_filename(el) for el in available_elements()}
        if self.pseudo_dir.is_dir():
            for path in self.pseudo_dir.glob("*.pbe-tm-epicycle.UPF"):
                files.setdefault(path.name.split(".")[0], path.name)
        files.update(self.pseudopotentials)
        return files

    def _sha256(self, path: Path) -> str:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return "missing (generated on first use)" if self.generate_pseudopotentials else "missing"
        cached = self._hashes.get(str(path))
        if cached and cached[0] == mtime:
            return cached[1]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._hashes[str(path)] = (mtime, digest)
        return digest

    def _pseudo_report(self) -> dict[str, str]:
        return {el: f"{name} sha256:{self._sha256(self.pseudo_dir / name)}"
                for el, name in sorted(self._pseudo_files().items())}

    def supported_numbers(self) -> frozenset[int]:
        return frozenset(atomic_numbers[el] for el in self._pseudo_files() if el in atomic_numbers)

    def version(self) -> str:
        with self._lock:
            if self._version is None:
                try:
                    exe = find_executable(self.command, PW_HINT)
                    # pw.x without input prints its banner and stops (writing a CRASH file: keep it out of cwd)
                    with scratch_directory(self.scratch_dir, "epicycle-qe-version-", "never") as work:
                        out = subprocess.run([exe], stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                             env=thread_env(1), start_new_session=True, cwd=work)
                    m = re.search(r"Program PWSCF v\.(\S+)", out.stdout.decode(errors="replace"))
                    self._version = f"pw.x {m.group(1)}" if m else "pw.x (unknown version)"
                except (SetupError, OSError, subprocess.TimeoutExpired):
                    return "pw.x (not available)"
            return self._version

    # -- one attempt ------------------------------------------------------------------

    def _species(self, atoms: Atoms) -> dict[str, str]:
        from ..pseudo import ensure_pseudopotentials

        kinds = list(dict.fromkeys(atoms.get_chemical_symbols()))
        files = self._pseudo_files()
        unknown = [k for k in kinds if k not in files]
        if unknown:
            raise InvalidInput(
                f"qe: no pseudopotential for {unknown}; available: {sorted(files)}. Add an ld1.x input to "
                "oracle_service/pseudo/inputs or map the element to a UPF file with the `pseudopotentials` setting"
            )
        own = [k for k in kinds if k not in self.pseudopotentials]
        if own:
            ensure_pseudopotentials(self.pseudo_dir, own, generate_missing=self.generate_pseudopotentials)
        for k in kinds:
            if not (self.pseudo_dir / files[k]).is_file():
                raise SetupError(f"qe: pseudopotential file {self.pseudo_dir / files[k]} for {k} does not exist")
        return {k: files[k] for k in kinds}

    def _argv(self) -> list[str]:
        exe = find_executable(self.command, PW_HINT)
        argv = [exe, *self.pw_args]
        if self.mpi_procs > 1:
            runner = find_executable(self.mpirun, "Install an MPI launcher (openmpi-bin) or set mpi_procs: 1.")
            argv = [runner, "-np", str(self.mpi_procs), *argv]
        return argv

    def calculate_once(self, atoms: Atoms, properties: tuple[str, ...], overrides: Mapping[str, Any],
                       cancel: threading.Event | None = None) -> Labels:
        if atoms.cell.rank < 3:
            raise InvalidInput("qe needs a cell with three independent vectors (put molecules in a vacuum box); "
                               "directions with pbc=False are treated as periodic with one k-point")
        params = merge_settings(self._params, overrides)
        argv = self._argv()
        species = self._species(atoms)
        want_stress = "stress" in properties
        kgrid = kpoint_grid(atoms, self.kpts, self.kspacing)
        text = write_pw_input(atoms, species, params, str(self.pseudo_dir.resolve()), kgrid, want_stress)
        with scratch_directory(self.scratch_dir, "epicycle-qe-", self.keep_scratch) as work:
            (work / "pw.in").write_text(text)
            log_path = work / "pw.out"
            rc = run_command(argv, cwd=work, stdin_path=work / "pw.in", log_path=log_path,
                             timeout=float(params["timeout"]), env=thread_env(self.threads), what="pw.x",
                             cancel=cancel)
            try:
                output = log_path.read_text(errors="replace")
            except OSError:
                raise CalculationFailed(f"pw.x wrote no output ({describe_returncode(rc)})",
                                        tail_file(work / "CRASH")) from None
            result = parse_pw_output(output, len(atoms), want_stress, rc)
        info = {"backend": self.name, "scf_iterations": result["scf_iterations"], "kpts": list(kgrid)}
        if "magnetization" in result:
            info["magnetization_bohr_mag"] = result["magnetization"]
        return Labels(
            energy=result["energy"],
            forces=result["forces"],
            stress=result.get("stress"),
            info=info,
        )
