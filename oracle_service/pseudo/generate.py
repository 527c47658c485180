"""Generate and verify the ld1.x pseudopotentials (see the package docstring).

Input files: ``inputs/<El>.ld1.in``, a plain ld1.x generation input
(``iswitch=3``) preceded by ``!`` comment lines; one of them lists the test
configurations for the transferability check::

    ! test-configs: 3s2 3p1 | 3s1 3p2 | 3s2 3p0

Checks on every generated file (all energies in Ry):

* ld1.x finished, wrote the UPF, and the UPF header says norm-conserving PBE;
* reference configuration: |e_AE - e_PS| <= ``MAX_REFERENCE_EIGENVALUE_ERROR``
  for every pseudised state;
* each test configuration (ld1.x ``iswitch=2`` run): eigenvalue errors
  <= ``MAX_TEST_EIGENVALUE_ERROR`` and excitation-energy error
  |ΔE_AE - ΔE_PS| <= ``MAX_EXCITATION_ERROR`` (frozen-core transferability);
* no ghost: in ld1.x's spherical-Bessel-basis test the lowest pseudo-atom
  eigenvalue of each angular momentum lies no deeper than
  ``GHOST_MARGIN`` below the lowest valence state of that angular momentum;
* the cutoff at which those eigenvalues converge to 1 mRy is recorded as
  ``converged_ecutwfc`` (Ry) in the manifest: a guide for ``ecutwfc``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from protos.errors import CalculationFailed, SetupError

from ..backends._subprocess import find_executable, run_command, tail_file, thread_env

INPUT_DIR = Path(__file__).resolve().parent / "inputs"
#: where generated files go by default (git-ignored)
DEFAULT_DIR = Path(__file__).resolve().parent / "generated"
MANIFEST = "manifest.json"

LD1_HINT = (
    "ld1.x is part of Debian's quantum-espresso package: run "
    "`bash oracle_service/setup/install_system_packages.sh` (as root)."
)

MAX_REFERENCE_EIGENVALUE_ERROR = 1e-3  # Ry
MAX_TEST_EIGENVALUE_ERROR = 1e-2  # Ry
MAX_EXCITATION_ERROR = 5e-3  # Ry
GHOST_MARGIN = 2e-2  # Ry
CUTOFF_TOLERANCE = 1e-3  # Ry
LD1_TIMEOUT = 120.0  # s

#: cutoffs of the Bessel-basis test (Ry)
ECUT_MIN, ECUT_MAX, ECUT_STEP = 20.0, 120.0, 10.0


@dataclass(frozen=True)
class Ld1Input:
    element: str
    path: Path
    text: str  # the ld1.x input without the comment header
    test_configs: tuple[str, ...]

    @property
    def upf_name(self) -> str:
        return upf_filename(self.element)


@dataclass
class GeneratedPseudo:
    element: str
    file: str
    sha256: str
    z_valence: float
    functional: str
    converged_ecutwfc: float | None
    checks: dict = field(default_factory=dict)


def upf_filename(element: str) -> str:
    return f"{element}.pbe-tm-epicycle.UPF"


def available_elements() -> list[str]:
    """Elements with an ld1.x input shipped in ``inputs/``."""
    return sorted(p.name.split(".")[0] for p in INPUT_DIR.glob("*.ld1.in"))


def read_input(element: str) -> Ld1Input:
    path = INPUT_DIR / f"{element}.ld1.in"
    if not path.is_file():
        raise SetupError(
            f"no ld1.x input for element {element!r} in {INPUT_DIR} (available: {', '.join(available_elements())}); "
            "add one, or provide your own UPF files through the qe backend's pseudo_dir/pseudopotentials settings"
        )
    raw = path.read_text()
    configs: tuple[str, ...] = ()
    body = []
    for line in raw.splitlines():
        stripped = line.strip()
        if stripped.startswith("!"):
            m = re.match(r"!\s*test-configs:\s*(.*)$", stripped)
            if m:
                configs = tuple(c.strip() for c in m.group(1).split("|") if c.strip())
            continue
        body.append(line)
    text = "\n".join(body) + "\n"
    if f"file_pseudopw='{upf_filename(element)}'" not in text:
        raise SetupError(f"{path}: file_pseudopw must be '{upf_filename(element)}'")
    return Ld1Input(element, path, text, configs)


# ---------------------------------------------------------------------------
# parsing ld1.x output

_EIG_ROW = re.compile(
    r"^\s*\d+\s+\d+\s+(\d[SPDF])\s+1\(\s*([-\d.]+)\)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s*!?\s*$", re.M
)
_DELTA_E = re.compile(r"dEtot_ae\s*=\s*([-\d.]+)\s*Ry\s*\n\s*dEtot_ps\s*=\s*([-\d.]+)\s*Ry,\s*Delta E=\s*([-\d.]+)\s*Ry")
_BESSEL_BLOCK = re.compile(r"Cutoff \(Ry\)\s*:\s*([\d.]+)\s*\n\s*N = 1.*\n((?:\s*E\(L=\d\)\s*=.*\n)+)")
_BESSEL_ROW = re.compile(r"E\(L=(\d)\)\s*=\s*([-\d.]+)\s*Ry")


def _ld1_error(text: str) -> str:
    m = re.search(r"Error in routine\s+(.*?)\n\s*(.*?)\n", text)
    return f"{m.group(1).strip()}: {m.group(2).strip()}" if m else ""


def _test_sections(text: str) -> list[str]:
    """The 'Testing the pseudopotential' sections of an ld1.x output, in order.

    Each runs up to the next section, so it includes the spherical-Bessel-basis
    test that ld1.x prints after "End of pseudopotential test".
    """
    parts = re.split(r"-+ Testing the pseudopotential -+\n", text)
    return parts[1:]


def _eigenvalues(section: str) -> list[tuple[str, float, float, float, float]]:
    """(label, occupation, e_AE, e_PS, e_AE - e_PS) rows of one test section (Ry)."""
    m = re.search(r"e AE \(Ry\)\s+e PS \(Ry\)\s+De AE-PS \(Ry\)[^\n]*\n((?:[^\n]*\S[^\n]*\n)+?)\s*(?:\n|eps)", section)
    if m is None:
        return []
    return [(r.group(1), float(r.group(2)), float(r.group(3)), float(r.group(4)), float(r.group(5)))
            for r in _EIG_ROW.finditer(m.group(1))]


def _bessel(section: str) -> dict[float, dict[int, float]]:
    """cutoff (Ry) -> {l: lowest eigenvalue (Ry)} from the spherical-Bessel-basis test."""
    out: dict[float, dict[int, float]] = {}
    for m in _BESSEL_BLOCK.finditer(section):
        rows = {int(r.group(1)): float(r.group(2)) for r in _BESSEL_ROW.finditer(m.group(2))}
        out[float(m.group(1))] = rows
    return out


_L = {"S": 0, "P": 1, "D": 2, "F": 3}


def check_outputs(element: str, gen_text: str, test_text: str, n_configs: int) -> tuple[dict, float | None]:
    """Verify ld1.x's generation and test outputs; return (checks, converged cutoff in Ry).

    Raises :class:`CalculationFailed` naming the failed check.
    """
    problems: list[str] = []
    gen_sections = _test_sections(gen_text)
    if not gen_sections:
        raise CalculationFailed(f"{element}: ld1.x generation output has no pseudopotential test section")
    ref = _eigenvalues(gen_sections[-1])
    if not ref:
        raise CalculationFailed(f"{element}: no eigenvalues in ld1.x's reference-configuration test")
    ref_err = max(abs(r[4]) for r in ref)
    if ref_err > MAX_REFERENCE_EIGENVALUE_ERROR:
        problems.append(f"reference configuration: |e_AE - e_PS| = {ref_err:.2e} Ry > {MAX_REFERENCE_EIGENVALUE_ERROR}")

    if re.search(r"convergence not achieved", test_text, re.I):
        problems.append("an all-electron or pseudo-atom calculation of a test configuration did not converge "
                        "(unbound state? choose other test configurations)")
    sections = _test_sections(test_text)
    if len(sections) != n_configs:
        raise CalculationFailed(
            f"{element}: ld1.x test run produced {len(sections)} test sections for {n_configs} configurations"
        )
    deltas = [(float(a), float(p), float(d)) for a, p, d in _DELTA_E.findall(test_text)]
    if len(deltas) != n_configs - 1:
        raise CalculationFailed(f"{element}: expected {n_configs - 1} excitation energies in the ld1.x test output, "
                                f"found {len(deltas)}")
    worst_eig = 0.0
    worst_ghost = 0.0
    cutoffs: list[float] = []
    for k, section in enumerate(sections):
        rows = _eigenvalues(section)
        if not rows:
            problems.append(f"test configuration {k + 1}: no eigenvalues")
            continue
        worst_eig = max(worst_eig, max(abs(r[4]) for r in rows))
        bessel = _bessel(section)
        if not bessel:
            problems.append(f"test configuration {k + 1}: no spherical-Bessel-basis test")
            continue
        top = max(bessel)
        lowest_by_l: dict[int, float] = {}
        for label, _occ, _ae, ps, _d in rows:
            lval = _L[label[1]]
            lowest_by_l[lval] = min(lowest_by_l.get(lval, ps), ps)
        for lval, e_val in lowest_by_l.items():
            e_basis = bessel[top].get(lval)
            if e_basis is None:
                continue
            depth = e_val - e_basis  # > 0: basis found a state deeper than the true valence state
            worst_ghost = max(worst_ghost, depth)
            if depth > GHOST_MARGIN:
                problems.append(
                    f"test configuration {k + 1}: ghost state for l={lval}: {e_basis:.4f} Ry below the "
                    f"valence state at {e_val:.4f} Ry"
                )
            # smallest cutoff from which this eigenvalue stays within CUTOFF_TOLERANCE of the top-cutoff value
            converged = top
            for ecut in sorted(bessel, reverse=True):
                e = bessel[ecut].get(lval)
                if e is None or abs(e - e_basis) > CUTOFF_TOLERANCE:
                    break
                converged = ecut
            cutoffs.append(converged)
    if worst_eig > MAX_TEST_EIGENVALUE_ERROR:
        problems.append(f"test configurations: |e_AE - e_PS| up to {worst_eig:.2e} Ry > {MAX_TEST_EIGENVALUE_ERROR}")
    worst_delta = max((abs(d) for _, _, d in deltas), default=0.0)
    if worst_delta > MAX_EXCITATION_ERROR:
        problems.append(f"transferability: |ΔE_AE - ΔE_PS| up to {worst_delta:.2e} Ry > {MAX_EXCITATION_ERROR}")
    if problems:
        raise CalculationFailed(f"{element}: pseudopotential failed verification: " + "; ".join(problems))
    converged_ecut = max(cutoffs) if cutoffs else None
    checks = {
        "reference_eigenvalue_error_Ry": ref_err,
        "test_eigenvalue_error_Ry": worst_eig,
        "excitation_energy_error_Ry": worst_delta,
        "ghost_depth_Ry": worst_ghost,
        "test_configurations": n_configs,
    }
    return checks, converged_ecut


def read_upf_header(path: Path) -> dict[str, str]:
    """Attributes of the UPF ``<PP_HEADER ...>`` element (UPF v2) as strings."""
    text = path.read_text(errors="replace")
    m = re.search(r"<PP_HEADER(.*?)/?>", text, re.S)
    if not m:
        raise CalculationFailed(f"{path}: no <PP_HEADER> (not a UPF v2 file?)")
    return {k: v.strip() for k, v in re.findall(r'(\w+)\s*=\s*"([^"]*)"', m.group(1))}


def _test_input(inp: Ld1Input, upf: str) -> str:
    m = re.search(r"&input\b.*?\n\s*/", inp.text, re.S | re.I)
    if m is None:
        raise SetupError(f"{inp.path}: no &input namelist")
    head = re.sub(r"iswitch\s*=\s*3", "iswitch=2", m.group(0), flags=re.I)
    configs = inp.test_configs or ()
    lines = [head, " &test", f"    file_pseudo='{upf}',", f"    nconf={len(configs)},"]
    lines += [f"    configts({i + 1})='{c}'," for i, c in enumerate(configs)]
    lines += [f"    ecutmin={ECUT_MIN}, ecutmax={ECUT_MAX}, decut={ECUT_STEP}", " /", ""]
    return "\n".join(lines)


def ld1_version(text: str) -> str:
    m = re.search(r"Program LD1 v\.(\S+)", text)
    return m.group(1) if m else ""


def generate_one(element: str, out_dir: Path, ld1x: str = "ld1.x", timeout: float = LD1_TIMEOUT) -> GeneratedPseudo:
    """Generate, verify and install ``<out_dir>/<El>.pbe-tm-epicycle.UPF``."""
    inp = read_input(element)
    if not inp.test_configs:
        raise SetupError(f"{inp.path}: no '! test-configs:' line; every pseudopotential must be tested")
    exe = find_executable(ld1x, LD1_HINT)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = thread_env(1)
    with tempfile.TemporaryDirectory(prefix=f"ld1-{element}-", dir=out_dir) as tmp:
        work = Path(tmp)
        (work / "gen.in").write_text(inp.text)
        rc = run_command([exe], cwd=work, stdin_path=work / "gen.in", log_path=work / "gen.out",
                         timeout=timeout, env=env, what=f"ld1.x ({element})")
        gen_text = (work / "gen.out").read_text(errors="replace")
        upf = work / inp.upf_name
        if rc != 0 or not upf.is_file():
            reason = _ld1_error(gen_text) or (f"exit code {rc}" if rc else "no UPF file written")
            raise CalculationFailed(f"{element}: ld1.x failed to generate the pseudopotential: {reason}",
                                    tail_file(work / "gen.out"))
        (work / "test.in").write_text(_test_input(inp, inp.upf_name))
        rc = run_command([exe], cwd=work, stdin_path=work / "test.in", log_path=work / "test.out",
                         timeout=timeout, env=env, what=f"ld1.x test ({element})")
        test_text = (work / "test.out").read_text(errors="replace")
        if rc != 0:
            raise CalculationFailed(f"{element}: ld1.x test run failed: {_ld1_error(test_text) or f'exit code {rc}'}",
                                    tail_file(work / "test.out"))
        checks, ecut = check_outputs(element, gen_text, test_text, len(inp.test_configs))
        header = read_upf_header(upf)
        if header.get("pseudo_type", "").upper() not in ("NC", "SL"):
            raise CalculationFailed(f"{element}: UPF pseudo_type is {header.get('pseudo_type')!r}, expected NC")
        functional = header.get("functional", "")
        if "PBE" not in functional.upper() and "PBX" not in functional.upper():
            raise CalculationFailed(f"{element}: UPF functional is {functional!r}, expected PBE")
        checks["ld1x_version"] = ld1_version(gen_text)
        digest = hashlib.sha256(upf.read_bytes()).hexdigest()
        os.replace(upf, out_dir / inp.upf_name)  # atomic: readers never see half a file
    return GeneratedPseudo(
        element=element,
        file=inp.upf_name,
        sha256=digest,
        z_valence=float(header.get("z_valence", "nan")),
        functional=functional,
        converged_ecutwfc=ecut,
        checks=checks,
    )


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("pseudopotentials", {})
    except (OSError, ValueError):
        return {}


def _write_manifest(out_dir: Path, entries: dict[str, dict]) -> None:
    data = {"generator": "oracle_service.pseudo (ld1.x)", "pseudopotentials": dict(sorted(entries.items()))}
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def generate(out_dir: str | os.PathLike = DEFAULT_DIR, elements: Iterable[str] | None = None,
             ld1x: str = "ld1.x", force: bool = True) -> dict[str, GeneratedPseudo | dict]:
    """Generate and verify pseudopotentials for ``elements`` (default: all) into ``out_dir``.

    With ``force=False`` an element whose UPF already exists with the
    sha256 recorded in the manifest is skipped.  Returns element -> result
    (a :class:`GeneratedPseudo`, or the manifest entry of a skipped one).
    Raises :class:`CalculationFailed` / :class:`SetupError` on the first failure.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(elements) if elements is not None else available_elements()
    manifest = read_manifest(out)
    results: dict[str, GeneratedPseudo | dict] = {}
    for element in wanted:
        entry = manifest.get(element)
        upf = out / upf_filename(element)
        if not force and entry and upf.is_file() and hashlib.sha256(upf.read_bytes()).hexdigest() == entry.get("sha256"):
            results[element] = entry
            continue
        made = generate_one(element, out, ld1x=ld1x)
        manifest = read_manifest(out)  # another process may have added entries meanwhile
        manifest[element] = asdict(made)
        _write_manifest(out, manifest)
        results[element] = made
    return results


def ensure_pseudopotentials(out_dir: str | os.PathLike, elements: Iterable[str], ld1x: str = "ld1.x",
                            generate_missing: bool = True) -> dict[str, Path]:
    """Paths of ``<El>.pbe-tm-epicycle.UPF`` in ``out_dir``, generating missing ones if allowed."""
    out = Path(out_dir)
    paths = {el: out / upf_filename(el) for el in elements}
    missing = [el for el, p in paths.items() if not p.is_file()]
    if missing:
        if not generate_missing:
            raise SetupError(
                f"no pseudopotential for {', '.join(missing)} in {out}; generate them with "
                f"`python -m oracle_service.pseudo generate --out {out}`"
            )
        try:
            generate(out, missing, ld1x=ld1x)
        except CalculationFailed as exc:
            raise SetupError(f"could not generate pseudopotentials for {', '.join(missing)}: {exc}") from None
        except OSError as exc:
            raise SetupError(f"could not write pseudopotentials to {out}: {exc}; set pseudo_dir to a writable "
                             "directory or generate them at setup time") from None
    return paths


# ---------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oracle_service.pseudo",
                                     description="Generate and verify ld1.x norm-conserving PBE pseudopotentials.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run ld1.x for the shipped inputs and verify the results")
    gen.add_argument("--out", default=str(DEFAULT_DIR), help=f"output directory (default {DEFAULT_DIR})")
    gen.add_argument("--elements", nargs="+", metavar="EL", help="only these elements (default: all shipped)")
    gen.add_argument("--ld1", default="ld1.x", help="ld1.x executable (default: ld1.x on PATH)")
    gen.add_argument("--keep-existing", action="store_true",
                     help="skip elements whose UPF exists with the checksum recorded in the manifest")
    sub.add_parser("list", help="list the elements with a shipped ld1.x input")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(" ".join(available_elements()))
        return 0
    start = time.monotonic()
    try:
        results = generate(args.out, args.elements, ld1x=args.ld1, force=not args.keep_existing)
    except (CalculationFailed, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'element':8} {'file':28} {'Zval':>5} {'ecut(Ry)':>9} {'dE_transf(Ry)':>14} {'ghost(Ry)':>10}")
    for element, res in results.items():
        r = asdict(res) if isinstance(res, GeneratedPseudo) else res
        c = r.get("checks", {})
        ecut = r.get("converged_ecutwfc")
        print(f"{element:8} {r['file']:28} {r['z_valence']:5.1f} {ecut if ecut is not None else '-':>9} "
              f"{c.get('excitation_energy_error_Ry', float('nan')):14.2e} {c.get('ghost_depth_Ry', float('nan')):10.2e}")
    print(f"wrote {len(results)} verified pseudopotential(s) to {args.out} in {time.monotonic() - start:.1f} s")
    return 0
