"""The contract every oracle backend honours, as one reusable test class.

Use it by inheriting in a ``Test*`` class and implementing the two hooks::

    from .contract import OracleContract

    class TestMyBackend(OracleContract):
        registered_name = "mybackend"          # optional: check the registry too
        fd_components = 3                      # expensive backend: check 3 force components
        force_atol = 5e-3                      # eV/Å, DFT finite-difference noise

        def make_oracle(self):
            return create_oracle("mybackend", ...)

        def sample_structure(self, rng):
            atoms = bulk("Si", "diamond", a=5.43, cubic=True)
            atoms.positions += rng.normal(0.0, 0.03, atoms.positions.shape)
            return atoms

What is checked (units eV, Å, eV/Å, eV/Å³; ASE stress sign and Voigt order):

* interface: name, implemented properties, settings (JSON), version, elements;
* shapes and types: energy float, forces (n, 3), stress (6,), all finite;
* every implemented property can be requested alone and agrees with a full call;
* forces = -dE/dx by central finite differences;
* stress = (1/V) dE/dε by central finite differences of a symmetric strain;
* translation invariance (energy and forces, also after wrapping into the cell);
* rotation equivariance (positions *and* cell rotated: E invariant,
  F -> F Rᵀ, σ -> R σ Rᵀ), permutation equivariance;
* determinism, thread safety (if the backend claims it), extensivity of a
  periodic supercell, vanishing forces on a symmetric structure (optional hook);
* the registry builds an equivalent backend; the LabelService returns the
  same labels as the bare backend.

A backend whose program is missing (``make_oracle`` raises SetupError)
fails the whole class with the setup message: a backend test never passes by
skipping a missing code (a subclass that is deliberately optional on some
machine must decide that itself, before ``make_oracle``, and say why).  Expensive backends tune the class attributes below (fewer finite-difference
components, looser tolerances, skip the supercell or thread checks); the
reference labels of the sample are computed once per class.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ase import Atoms

from oracle_service.base import ALL_PROPERTIES, Labels, Oracle, create_oracle
from oracle_service.core import LabelService, ServiceConfig
from oracle_service.validation import Limits, validate_structure
from protos.errors import SetupError

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def voigt_to_matrix(s: np.ndarray) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix (det = +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def copy_structure(atoms: Atoms) -> Atoms:
    """Atoms without a calculator or extra arrays (what a backend receives)."""
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


class OracleContract:
    """Physics and interface contract of :class:`oracle_service.base.Oracle`.

    Subclasses implement :meth:`make_oracle` and :meth:`sample_structure`
    and may override the attributes below.
    """

    # -- hooks ----------------------------------------------------------------

    #: registry name; if set, ``create_oracle(registered_name, **registry_settings)``
    #: must give a backend with the same settings and labels
    registered_name: str | None = None
    registry_settings: dict = {}

    #: seed of the generator handed to :meth:`sample_structure` and used for
    #: rotations, translations, permutations and FD components
    seed: int = 1234

    # -- tolerances (override for noisy/expensive backends) --------------------

    #: finite-difference displacement, Å
    fd_step: float = 1e-4
    #: how many (atom, direction) components to check by finite differences;
    #: None = all 3n
    fd_components: int | None = None
    #: |F_analytic - F_fd|, eV/Å
    force_atol: float = 1e-5
    #: finite strain step (dimensionless)
    strain_step: float = 1e-5
    #: |σ_analytic - σ_fd|, eV/Å³
    stress_atol: float = 1e-6
    #: energy differences under symmetry operations, eV (absolute) ...
    energy_atol: float = 1e-9
    #: ... and relative to |E|
    energy_rtol: float = 1e-12
    #: force differences under symmetry operations, eV/Å
    symmetry_force_atol: float = 1e-8
    #: stress differences under symmetry operations, eV/Å³
    symmetry_stress_atol: float = 1e-10
    #: repeated identical calls, absolute (0 = bitwise identical)
    determinism_atol: float = 0.0
    #: run the thread-safety check (only if the backend says thread_safe)
    check_threads: bool = True
    #: run the periodic supercell (2×1×1) extensivity check
    check_supercell: bool = True
    #: plausibility bounds (catch unit mistakes like Ry or Hartree/Bohr)
    max_abs_energy_per_atom: float = 1e4  # eV
    max_abs_force: float = 50.0  # eV/Å for a gently displaced structure

    def make_oracle(self) -> Oracle:
        raise NotImplementedError

    def sample_structure(self, rng: np.random.Generator) -> Atoms:
        """A realistic structure with small random displacements (use ``rng``)."""
        raise NotImplementedError

    def symmetric_structure(self) -> Atoms | None:
        """Optionally, a structure whose forces vanish by symmetry (perfect crystal)."""
        return None

    # -- fixtures ---------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def oracle(cls):
        try:
            oracle = cls().make_oracle()
        except SetupError as exc:  # the code (pw.x, GPAW, ...) is not installed: that is a failure
            pytest.fail(f"{cls.__name__}: backend not set up: {exc}", pytrace=False)
        yield oracle
        oracle.close()

    @pytest.fixture(scope="class")
    @classmethod
    def structure(cls) -> Atoms:
        return cls().sample_structure(np.random.default_rng(cls.seed))

    @pytest.fixture(scope="class")
    @classmethod
    def properties(cls, oracle, structure) -> tuple[str, ...]:
        """Implemented properties that make sense for the sample (stress needs a cell)."""
        props = tuple(p for p in ALL_PROPERTIES if p in oracle.implemented_properties)
        if structure.cell.rank < 3:
            props = tuple(p for p in props if p != "stress")
        return props

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, oracle, structure, properties) -> Labels:
        return oracle.calculate(copy_structure(structure), properties)

    @pytest.fixture
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed + 1)

    # -- helpers -----------------------------------------------------------------

    def energy(self, oracle: Oracle, atoms: Atoms) -> float:
        return oracle.calculate(copy_structure(atoms), ("energy",)).energy

    def assert_energy_close(self, a: float, b: float, what: str) -> None:
        tol = self.energy_atol + self.energy_rtol * max(abs(a), abs(b))
        assert abs(a - b) <= tol, f"{what}: energies differ by {a - b:.3e} eV (tolerance {tol:.1e})"

    def need(self, properties, *names) -> None:
        for name in names:
            if name not in properties:
                pytest.skip(f"{name} not implemented or not applicable to the sample")

    # -- interface ---------------------------------------------------------------

    def test_interface(self, oracle, structure):
        assert isinstance(oracle, Oracle)
        assert isinstance(oracle.name, str) and oracle.name
        props = tuple(oracle.implemented_properties)
        assert props and set(props) <= set(ALL_PROPERTIES), props
        json.dumps(oracle.settings(), sort_keys=True)  # settings must be JSON-serialisable
        assert isinstance(oracle.version(), str)
        numbers = oracle.supported_numbers()
        if numbers is not None:
            assert all(1 <= int(z) <= 118 for z in numbers)
            assert set(structure.numbers.tolist()) <= set(numbers), "sample uses unsupported elements"

    def test_sample_passes_validation(self, oracle, structure, properties):
        validate_structure(structure, Limits(), oracle, properties)

    def test_shapes_types_and_units(self, structure, properties, reference):
        n = len(structure)
        assert set(properties) <= set(reference.properties())
        if "energy" in properties:
            assert isinstance(reference.energy, float) and np.isfinite(reference.energy)
            assert abs(reference.energy) / n < self.max_abs_energy_per_atom
        if "forces" in properties:
            f = reference.forces
            assert f.shape == (n, 3) and f.dtype == np.float64
            assert np.all(np.isfinite(f))
            assert np.abs(f).max() < self.max_abs_force, "implausible forces: check units (eV/Å)"
        if "stress" in properties:
            s = reference.stress
            assert s.shape == (6,) and s.dtype == np.float64
            assert np.all(np.isfinite(s))

    def test_each_property_alone(self, oracle, structure, properties, reference):
        for prop in properties:
            alone = oracle.calculate(copy_structure(structure), (prop,))
            assert getattr(alone, prop) is not None, f"{prop} requested alone was not returned"
            np.testing.assert_allclose(
                getattr(alone, prop),
                getattr(reference, prop),
                rtol=1e-10,
                atol=max(self.determinism_atol, 1e-12),
                err_msg=f"{prop} alone differs from {prop} in a full call",
            )

    def test_determinism(self, oracle, structure, properties, reference):
        again = oracle.calculate(copy_structure(structure), properties)
        for prop in properties:
            np.testing.assert_allclose(
                getattr(again, prop), getattr(reference, prop), rtol=0, atol=self.determinism_atol,
                err_msg=f"{prop} differs between two identical calls",
            )

    # -- derivatives ----------------------------------------------------------------

    def test_forces_are_minus_energy_gradient(self, oracle, structure, properties, reference, rng):
        self.need(properties, "energy", "forces")
        n = len(structure)
        components = [(i, k) for i in range(n) for k in range(3)]
        if self.fd_components is not None and self.fd_components < len(components):
            chosen = rng.choice(len(components), size=self.fd_components, replace=False)
            components = [components[c] for c in sorted(chosen)]
        h = self.fd_step
        worst = (0.0, None)
        for i, k in components:
            plus, minus = copy_structure(structure), copy_structure(structure)
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            fd = -(self.energy(oracle, plus) - self.energy(oracle, minus)) / (2 * h)
            err = abs(fd - reference.forces[i, k])
            if err > worst[0]:
                worst = (err, (i, k, fd, reference.forces[i, k]))
        assert worst[0] <= self.force_atol, (
            f"F != -dE/dx: atom {worst[1][0]} direction {'xyz'[worst[1][1]]}: finite difference "
            f"{worst[1][2]:.8f} vs forces {worst[1][3]:.8f} eV/Å (|diff| {worst[0]:.2e} > {self.force_atol:.1e})"
        )

    def test_stress_is_strain_derivative(self, oracle, structure, properties, reference):
        self.need(properties, "energy", "stress")
        d = self.strain_step
        volume = structure.get_volume()
        fd = np.zeros(6)
        for v, (a, b) in enumerate(VOIGT):
            energies = []
            for sign in (+1, -1):
                eps = np.zeros((3, 3))
                eps[a, b] += sign * d
                if a != b:
                    eps[b, a] += sign * d
                strained = copy_structure(structure)
                strained.set_cell(structure.cell.array @ (np.eye(3) + eps), scale_atoms=True)
                energies.append(self.energy(oracle, strained))
            denominator = (2 if a == b else 4) * d * volume
            fd[v] = (energies[0] - energies[1]) / denominator
        np.testing.assert_allclose(
            reference.stress, fd, rtol=0, atol=self.stress_atol,
            err_msg="stress != (1/V) dE/dε (ASE sign and Voigt order xx yy zz yz xz xy)",
        )

    # -- symmetries ---------------------------------------------------------------

    def test_translation_invariance(self, oracle, structure, properties, reference, rng):
        moved = copy_structure(structure)
        moved.positions += rng.uniform(-3.0, 3.0, 3)
        if moved.pbc.any():
            moved.wrap()  # atoms leave the cell: the periodic images must not care
        labels = oracle.calculate(moved, properties)
        if "energy" in properties:
            self.assert_energy_close(labels.energy, reference.energy, "translated structure")
        if "forces" in properties:
            np.testing.assert_allclose(labels.forces, reference.forces, rtol=0, atol=self.symmetry_force_atol)
        if "stress" in properties:
            np.testing.assert_allclose(labels.stress, reference.stress, rtol=0, atol=self.symmetry_stress_atol)

    def test_rotation_equivariance(self, oracle, structure, properties, reference, rng):
        R = random_rotation(rng)
        rotated = copy_structure(structure)
        center = structure.positions.mean(axis=0)
        # rotate positions and cell together: every periodic setup allows it
        rotated.positions = (structure.positions - center) @ R.T + center
        rotated.set_cell(structure.cell.array @ R.T, scale_atoms=False)
        labels = oracle.calculate(rotated, properties)
        if "energy" in properties:
            self.assert_energy_close(labels.energy, reference.energy, "rotated structure")
        if "forces" in properties:
            np.testing.assert_allclose(labels.forces, reference.forces @ R.T, rtol=0, atol=self.symmetry_force_atol)
        if "stress" in properties:
            expected = R @ voigt_to_matrix(reference.stress) @ R.T
            np.testing.assert_allclose(
                voigt_to_matrix(labels.stress), expected, rtol=0, atol=self.symmetry_stress_atol
            )

    def test_permutation_equivariance(self, oracle, structure, properties, reference, rng):
        perm = rng.permutation(len(structure))
        permuted = copy_structure(structure)[perm]
        labels = oracle.calculate(permuted, properties)
        if "energy" in properties:
            self.assert_energy_close(labels.energy, reference.energy, "permuted atoms")
        if "forces" in properties:
            np.testing.assert_allclose(labels.forces, reference.forces[perm], rtol=0, atol=self.symmetry_force_atol)
        if "stress" in properties:
            np.testing.assert_allclose(labels.stress, reference.stress, rtol=0, atol=self.symmetry_stress_atol)

    def test_periodic_supercell_is_extensive(self, oracle, structure, properties, reference):
        if not (self.check_supercell and structure.pbc.all() and structure.cell.rank == 3):
            pytest.skip("needs a fully periodic sample (and check_supercell)")
        n = len(structure)
        double = copy_structure(structure).repeat((2, 1, 1))
        labels = oracle.calculate(double, properties)
        if "energy" in properties:
            self.assert_energy_close(labels.energy, 2 * reference.energy, "2x1x1 supercell energy")
        if "forces" in properties:
            np.testing.assert_allclose(labels.forces[:n], reference.forces, rtol=0, atol=self.symmetry_force_atol)
            np.testing.assert_allclose(labels.forces[n:], reference.forces, rtol=0, atol=self.symmetry_force_atol)
        if "stress" in properties:
            np.testing.assert_allclose(labels.stress, reference.stress, rtol=0, atol=self.symmetry_stress_atol)

    def test_symmetric_structure_has_no_forces(self, oracle):
        atoms = self.symmetric_structure()
        if atoms is None:
            pytest.skip("no symmetric_structure() given")
        if "forces" not in oracle.implemented_properties:
            pytest.skip("forces not implemented")
        forces = oracle.calculate(copy_structure(atoms), ("forces",)).forces
        assert np.abs(forces).max() <= self.force_atol, f"max |F| = {np.abs(forces).max():.2e} eV/Å"

    # -- concurrency, registry, service ---------------------------------------------

    def test_thread_safety(self, oracle, structure, properties):
        if not (self.check_threads and oracle.thread_safe):
            pytest.skip("backend is not thread-safe (the service serialises it) or check disabled")
        rng = np.random.default_rng(self.seed + 2)
        variants = []
        for _ in range(4):
            atoms = copy_structure(structure)
            atoms.positions += rng.normal(0.0, 0.01, atoms.positions.shape)
            variants.append(atoms)
        serial = [oracle.calculate(copy_structure(a), properties) for a in variants]
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(lambda a: oracle.calculate(copy_structure(a), properties), variants * 2))
        for k, labels in enumerate(parallel):
            for prop in properties:
                np.testing.assert_allclose(
                    getattr(labels, prop), getattr(serial[k % 4], prop), rtol=0,
                    atol=max(self.determinism_atol, 1e-12),
                    err_msg=f"{prop} computed concurrently differs from the serial result",
                )

    def test_registry_builds_equivalent_backend(self, oracle, structure, properties, reference):
        if self.registered_name is None:
            pytest.skip("no registered_name")
        other = create_oracle(self.registered_name, **self.registry_settings)
        try:
            assert other.name == oracle.name
            assert other.settings() == oracle.settings()
            labels = other.calculate(copy_structure(structure), properties)
            for prop in properties:
                np.testing.assert_allclose(getattr(labels, prop), getattr(reference, prop), rtol=1e-12,
                                           atol=max(self.determinism_atol, 1e-12))
        finally:
            other.close()

    def test_label_service_returns_backend_labels(self, oracle, structure, properties, reference):
        service = LabelService(oracle, ServiceConfig(workers=1, queue_limit=0, cache_size=4))
        first = service.label(structure, properties)
        second = service.label(structure, properties)
        assert not first.cached and second.cached
        assert first.structure_hash == second.structure_hash
        for prop in properties:
            np.testing.assert_allclose(getattr(first.labels, prop), getattr(reference, prop), rtol=1e-12,
                                       atol=max(self.determinism_atol, 1e-12))
            np.testing.assert_array_equal(getattr(second.labels, prop), getattr(first.labels, prop))
