"""Write a :class:`~learner_service.mapped.MappedModel` as stock LAMMPS potentials.

* ``pair_style uf3`` (ML-UF3 package, LAMMPS 2024+ unified file): one file with a
  ``#UF3 POT UNITS: metal ...`` block per species pair (``2B El1 El2 0 3 uk``) and, for 3-body
  models, per centre species and unordered neighbour pair (``3B Ec Ea Eb 0 3 uk``).  The layout
  is what ``PairUF3::uf3_read_unified_pot_file`` reads (``src/ML-UF3/pair_uf3.cpp``):
  2B -- cutoff and number of knots, the knots, the number of coefficients, the coefficients;
  3B -- ``Rjk_CUT Rij_CUT Rik_CUT N_jk N_ik N_ij``, the knot lines for jk, ik, ij (that order),
  the coefficient shape ``N_ij-4 N_ik-4 N_jk-4`` and one line of jk coefficients per (ij, ik)
  index pair.  ``leading_trim 0, trailing_trim 3`` is the only combination LAMMPS accepts; it is
  metadata there (the coefficients are used as written).  LAMMPS needs ``newton on`` and
  ``units metal``.
* ``pair_style table`` (2-body models): per pair a section of ``N`` points ``i r e f`` with
  ``e`` the *pair* energy ``2 phi2(r)`` (a bond is visited twice in our sum, once in LAMMPS's
  half list) and ``f = -de/dr``, on ``r`` from ``R`` to the cutoff.  Tables interpolate, so
  they reproduce the spline only to their own resolution; ``uf3`` is exact.
* :func:`lammps_snippet`: the ``pair_style`` / ``pair_coeff`` lines with the element mapping.

Numbers are written with ``repr`` (17 significant digits) so LAMMPS reads the same doubles.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Sequence

import numpy as np

from protos.errors import InvalidInput

from .mapped import MappedModel, design_matrix

__all__ = ["write_uf3", "write_table", "lammps_snippet", "export_lammps", "element_symbol", "uf3_compatible",
           "UF3_MAX_LINE"]


def element_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


#: LAMMPS's TextFileReader reads a uf3 potential through a 1024-character line buffer
#: (``text_file_reader.cpp``: ``set_bufsize(1024)``; ``next_line(n)`` concatenates lines only
#: within that buffer, ``skip_line`` skips one buffer-full): every knot vector, every 2-body
#: coefficient vector and every row of 3-body r_jk coefficients must fit in 1023 characters.
UF3_MAX_LINE = 1023
#: decimals (absolute precision 10^-d eV) tried for coefficients, most first
_DIGITS = (12, 11, 10, 9, 8, 7)


def _fmt(values, digits: int) -> str:
    return " ".join(f"{float(v):.{digits}g}" for v in np.asarray(values, dtype=np.float64).ravel())


def _nums(values) -> str:
    """Knots and cutoffs: 12 significant digits (uniform_knots makes them exact)."""
    return _fmt(values, 12)


def fits_uf3_line(knots) -> bool:
    """Whether a knot vector fits on one line of a pair_style uf3 file (LAMMPS's line buffer)."""
    return len(_nums(knots)) <= UF3_MAX_LINE


def _fixed(v: float, decimals: int) -> str:
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _coef_line(values, where: str) -> tuple[str, np.ndarray]:
    """The most precise line of ``values`` (fixed point, trailing zeros dropped: an absolute
    precision in eV, and exact zeros cost two characters) that fits LAMMPS's buffer, and the
    values it holds."""
    values = np.asarray(values, dtype=np.float64).ravel()
    for digits in _DIGITS:
        line = " ".join(_fixed(float(v), digits) for v in values)
        if len(line) <= UF3_MAX_LINE:
            return line, np.array(line.split(), dtype=np.float64)
    raise InvalidInput(f"{where}: {np.size(values)} coefficients do not fit LAMMPS's 1024-character uf3 line "
                       f"buffer even at {_DIGITS[-1]} decimals; use a coarser knot spacing")


def uf3_compatible(model: MappedModel) -> MappedModel:
    """The model with its coefficients rounded exactly as :func:`write_uf3` writes them (so
    our evaluator and LAMMPS use the same numbers); InvalidInput if a line cannot fit."""
    sym = [element_symbol(z) for z in model.species]
    two, three = {}, {}
    for (a, b), (knots, coef) in model.twobody.items():
        if len(_nums(knots)) > UF3_MAX_LINE:
            raise InvalidInput(f"2-body {sym[a]}-{sym[b]}: {len(knots)} knots do not fit LAMMPS's uf3 line buffer; "
                               f"use a coarser knot spacing")
        two[(a, b)] = (knots, _coef_line(coef, f"2-body {sym[a]}-{sym[b]}")[1])
    for (c, a, b), (k1, k2, k3, coef) in model.threebody.items():
        name = f"3-body {sym[c]}-{sym[a]}-{sym[b]}"
        for k in (k1, k2, k3):
            if len(_nums(k)) > UF3_MAX_LINE:
                raise InvalidInput(f"{name}: {len(k)} knots do not fit LAMMPS's uf3 line buffer")
        rounded = np.empty_like(coef)
        for i in range(coef.shape[0]):
            for j in range(coef.shape[1]):
                rounded[i, j] = _coef_line(coef[i, j], name)[1]
        three[(c, a, b)] = (k1, k2, k3, rounded)
    meta = dict(model.metadata)
    meta["uf3_rounded"] = True
    return MappedModel(model.species, two, three, meta)


def _header(author: str) -> str:
    date = _dt.date.today().isoformat()
    return f"#UF3 POT UNITS: metal DATE: {date} AUTHOR: {author} CITATION: epicycle-mapped-GP"


def write_uf3(model: MappedModel, path, author: str = "epicycle") -> Path:
    """One unified ``pair_style uf3`` potential file with every 2B (and 3B) block.  Coefficients
    are written in fixed point with the most decimals (12 .. 7) that fit LAMMPS's line buffer;
    pass the model through :func:`uf3_compatible` first to evaluate exactly what LAMMPS reads."""
    path = Path(path)
    sym = [element_symbol(z) for z in model.species]
    lines: list[str] = []
    for (a, b), (knots, coef) in sorted(model.twobody.items()):
        lines += [_header(author), f"2B {sym[a]} {sym[b]} 0 3 uk", f"{_nums(knots[-1:])} {len(knots)}", _nums(knots),
                  f"{len(coef)}", _coef_line(coef, f"2-body {sym[a]}-{sym[b]}")[0], "#"]
    for (c, a, b), (k1, k2, k3, coef) in sorted(model.threebody.items()):
        lines += [_header(author), f"3B {sym[c]} {sym[a]} {sym[b]} 0 3 uk",
                  f"{_nums(k3[-1:])} {_nums(k1[-1:])} {_nums(k2[-1:])} {len(k3)} {len(k2)} {len(k1)}",
                  _nums(k3), _nums(k2), _nums(k1), f"{coef.shape[0]} {coef.shape[1]} {coef.shape[2]}"]
        for i in range(coef.shape[0]):
            for j in range(coef.shape[1]):
                lines.append(_coef_line(coef[i, j], f"3-body {sym[c]}-{sym[a]}-{sym[b]}")[0])
        lines.append("#")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_table(model: MappedModel, path, n_points: int = 2000, r_min: float = 0.5) -> tuple[Path, list[str]]:
    """``pair_style table`` file of a 2-body model; returns the path and the section keywords
    (``El1_El2``) in pair order.  ``r_min`` (Å): first table point (the table's inner edge)."""
    if model.threebody:
        raise InvalidInput("pair_style table holds 2-body models only; this mapped model has a 3-body term "
                           "(use the uf3 file)")
    if n_points < 2:
        raise InvalidInput(f"a table needs at least 2 points, got {n_points}")
    path = Path(path)
    sym = [element_symbol(z) for z in model.species]
    lines = ["# Epicycle mapped GP, 2-body pair table (units metal: Å, eV, eV/Å)", ""]
    keys = []
    for (a, b), (knots, coef) in sorted(model.twobody.items()):
        rc = float(knots[-1])
        if not 0 < r_min < rc:
            raise InvalidInput(f"table r_min {r_min} Å must lie in (0, {rc}) Å")
        r = np.linspace(r_min, rc, n_points)
        r[-1] = np.nextafter(rc, 0.0)
        e = 2.0 * design_matrix(knots, r) @ coef
        f = -2.0 * design_matrix(knots, r, derivative=True) @ coef
        r[-1] = rc
        key = f"{sym[a]}_{sym[b]}"
        keys.append(key)
        lines += [key, f"N {n_points} R {float(r_min)!r} {rc!r}", ""]
        lines += [f"{i + 1} {float(r[i])!r} {float(e[i])!r} {float(f[i])!r}" for i in range(n_points)]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path, keys


def lammps_snippet(model: MappedModel, uf3_file: str, type_elements: Sequence[str] | None = None,
                   table_file: str | None = None, table_keys: Sequence[str] | None = None,
                   n_points: int = 2000) -> str:
    """LAMMPS input lines for the exported potential.  ``type_elements``: element of each LAMMPS
    atom type in order (default: the model's species in order)."""
    sym = [element_symbol(z) for z in model.species]
    types = list(type_elements) if type_elements is not None else sym
    unknown = [t for t in types if t not in sym]
    if unknown:
        raise InvalidInput(f"element(s) {unknown} are not in the mapped model's species {sym}")
    lines = ["# Epicycle mapped GP -> LAMMPS; needs 'units metal' (before the box) and 'newton on' (default)",
             "# atom types: " + ", ".join(f"{i + 1}={e}" for i, e in enumerate(types)),
             f"pair_style uf3 {model.body_order}",
             f"pair_coeff * * {uf3_file} {' '.join(types)}"]
    ref = model.energy_reference
    if np.any(ref != 0):
        lines[2:2] = ["# LAMMPS energies lack the model's per-atom energy reference (uf3 has no 1-body term; "
                      "forces and stress are unaffected), eV/atom: "
                      + ", ".join(f"{s} {mu:.6f}" for s, mu in zip(sym, ref))]
    if table_file is not None and table_keys is not None:
        lines += ["", "# alternative for this 2-body model (tabulated, interpolated by LAMMPS):",
                  f"# pair_style table spline {n_points}"]
        for i, ei in enumerate(types):
            for j in range(i, len(types)):
                ej = types[j]
                a, b = sorted((sym.index(ei), sym.index(ej)))
                lines.append(f"# pair_coeff {i + 1} {j + 1} {table_file} {sym[a]}_{sym[b]}")
    return "\n".join(lines) + "\n"


def export_lammps(model: MappedModel, out_dir, stem: str = "mapped", table_points: int = 2000) -> dict:
    """Write ``STEM.uf3``, (2-body models) ``STEM.table`` and ``STEM.lammps`` (the snippet) into
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out = {"uf3": write_uf3(model, out_dir / f"{stem}.uf3")}
    table_keys = None
    if not model.threebody:
        out["table"], table_keys = write_table(model, out_dir / f"{stem}.table", n_points=table_points)
    snippet = lammps_snippet(model, out["uf3"].name, table_file=out.get("table") and out["table"].name,
                             table_keys=table_keys, n_points=table_points)
    out["snippet"] = out_dir / f"{stem}.lammps"
    out["snippet"].write_text(snippet)
    return out
