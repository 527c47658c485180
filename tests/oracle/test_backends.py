"""The embedded backends (emt, lj, the ASE adapter) against the oracle contract,
plus what is specific to each."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes
from ase.calculators.calculator import CalculationFailed as AseCalculationFailed
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.cluster import Icosahedron

from oracle_service.backends.analytic import (
    AseCalculatorOracle,
    EMTOracle,
    LennardJonesOracle,
    load_object,
)
from oracle_service.base import REGISTRY, available_backends, create_oracle
from protos.errors import CalculationFailed, InvalidInput, SetupError

from .contract import OracleContract, copy_structure

AR_FCC_A = 5.26  # Å, argon lattice constant near the LJ minimum
CU_FCC_A = 3.61  # Å


def rattled(atoms: Atoms, rng: np.random.Generator, sigma: float = 0.05) -> Atoms:
    atoms = copy_structure(atoms)
    atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
    return atoms


# ---------------------------------------------------------------------------
# contract


class TestEMTCopper(OracleContract):
    registered_name = "emt"

    def make_oracle(self):
        return EMTOracle()

    def sample_structure(self, rng):
        return rattled(bulk("Cu", "fcc", a=CU_FCC_A, cubic=True).repeat(2), rng)  # 32 atoms

    def symmetric_structure(self):
        return bulk("Cu", "fcc", a=CU_FCC_A, cubic=True).repeat(2)


class TestEMTAlloySlab(OracleContract):
    """Cu(111) slab with Au and Al substituted: mixed pbc (T, T, F), vacuum."""

    registered_name = "emt"
    check_supercell = False  # not fully periodic

    def make_oracle(self):
        return create_oracle("emt")

    def sample_structure(self, rng):
        slab = fcc111("Cu", size=(2, 2, 3), a=CU_FCC_A, vacuum=6.0)
        slab.numbers[[1, 6]] = 79  # Au
        slab.numbers[[4]] = 13  # Al
        return rattled(slab, rng, 0.04)


class TestLennardJonesArgon(OracleContract):
    registered_name = "lj"
    fd_components = 48  # of 96; the rest are equivalent

    def make_oracle(self):
        return LennardJonesOracle()

    def sample_structure(self, rng):
        return rattled(bulk("Ar", "fcc", a=AR_FCC_A, cubic=True).repeat(2), rng)

    def symmetric_structure(self):
        return bulk("Ar", "fcc", a=AR_FCC_A, cubic=True).repeat(2)


ARKR_SPECIES = {"Ar": {"epsilon": 0.0104, "sigma": 3.40}, "Kr": {"epsilon": 0.0140, "sigma": 3.65}}


class TestLennardJonesArKrCluster(OracleContract):
    """A 55-atom Ar/Kr Mackay icosahedron, no cell: stress not applicable."""

    registered_name = "lj"
    registry_settings = {"species": ARKR_SPECIES, "cutoff": 9.0}

    def make_oracle(self):
        return create_oracle("lj", species=ARKR_SPECIES, cutoff=9.0)

    def sample_structure(self, rng):
        cluster = Icosahedron("Ar", noshells=3, latticeconstant=AR_FCC_A)
        atoms = Atoms(numbers=cluster.numbers, positions=cluster.positions)  # no cell, pbc False
        kr = rng.choice(len(atoms), size=12, replace=False)
        atoms.numbers[kr] = 36
        return rattled(atoms, rng)


class TestAseAdapterEMTAluminium(OracleContract):
    """The generic adapter around a calculator factory, one calculator per thread."""

    def make_oracle(self):
        return AseCalculatorOracle(EMT, name="ase-emt", reuse="thread")

    def sample_structure(self, rng):
        return rattled(bulk("Al", "fcc", a=4.05, cubic=True).repeat(2), rng)


class TestAseDottedPathLennardJones(OracleContract):
    """``ase`` backend from a config-style import path: ASE's own smooth LJ."""

    registered_name = "ase"
    registry_settings = {
        "calculator": "ase.calculators.lj:LennardJones",
        "parameters": {"epsilon": 0.0104, "sigma": 3.40, "rc": 8.0, "smooth": True},
    }
    fd_components = 24  # ASE's LJ loops over atoms in Python; keep it quick

    def make_oracle(self):
        return create_oracle("ase", **self.registry_settings)

    def sample_structure(self, rng):
        return rattled(bulk("Ar", "fcc", a=AR_FCC_A, cubic=True).repeat(2), rng)


# ---------------------------------------------------------------------------
# registry


def test_builtin_backends_are_registered():
    assert {"emt", "lj", "ase"} <= set(available_backends())
    assert REGISTRY["emt"] is EMTOracle and REGISTRY["lj"] is LennardJonesOracle


def test_unknown_backend_names_known_ones():
    with pytest.raises(InvalidInput, match="unknown oracle backend 'nope'.*emt"):
        create_oracle("nope")


def test_unknown_setting_is_invalid_input():
    with pytest.raises(InvalidInput, match="bad settings for oracle backend 'emt'"):
        create_oracle("emt", temperature=300)


# ---------------------------------------------------------------------------
# EMT


def test_emt_supports_exactly_the_elements_with_parameters():
    from ase.calculators.emt import parameters
    from ase.data import atomic_numbers

    assert EMTOracle().supported_numbers() == frozenset(atomic_numbers[s] for s in parameters)
    assert 26 not in EMTOracle().supported_numbers()  # Fe


def test_emt_matches_ase_emt(rng=np.random.default_rng(7)):
    atoms = rattled(bulk("Cu", "fcc", a=CU_FCC_A, cubic=True).repeat(2), rng)
    labels = EMTOracle().calculate(copy_structure(atoms), ("energy", "forces", "stress"))
    ref = copy_structure(atoms)
    ref.calc = EMT()
    assert labels.energy == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(labels.forces, ref.get_forces(), atol=1e-12)
    np.testing.assert_allclose(labels.stress, ref.get_stress(), atol=1e-14)


def test_emt_compressed_crystal_has_negative_stress():
    """ASE sign convention: compressed -> negative (compressive) stress."""
    atoms = bulk("Cu", "fcc", a=CU_FCC_A * 0.97, cubic=True)
    stress = EMTOracle().calculate(atoms, ("stress",)).stress
    assert np.all(stress[:3] < 0) and np.allclose(stress[3:], 0, atol=1e-10)


# ---------------------------------------------------------------------------
# Lennard-Jones


def test_lj_single_species_equals_ase_smooth_lennard_jones():
    rng = np.random.default_rng(11)
    atoms = rattled(bulk("Ar", "fcc", a=AR_FCC_A, cubic=True).repeat(2), rng)
    ours = LennardJonesOracle(epsilon=0.0104, sigma=3.40, cutoff=8.5, onset=6.0)
    labels = ours.calculate(copy_structure(atoms), ("energy", "forces", "stress"))
    ref = copy_structure(atoms)
    ref.calc = LennardJones(epsilon=0.0104, sigma=3.40, rc=8.5, ro=6.0, smooth=True)
    assert labels.energy == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(labels.forces, ref.get_forces(), atol=1e-12)
    np.testing.assert_allclose(labels.stress, ref.get_stress(), atol=1e-14)


def test_lj_dimer_uses_lorentz_berthelot_mixing():
    lj = LennardJonesOracle(species=ARKR_SPECIES, cutoff=12.0, onset=11.0)
    sigma = 0.5 * (3.40 + 3.65)
    epsilon = np.sqrt(0.0104 * 0.0140)
    r_min = 2 ** (1 / 6) * sigma
    dimer = Atoms("ArKr", positions=[[0, 0, 0], [r_min, 0, 0]])
    labels = lj.calculate(dimer, ("energy", "forces"))
    assert labels.energy == pytest.approx(-epsilon, rel=1e-12)
    np.testing.assert_allclose(labels.forces, 0.0, atol=1e-12)  # at the minimum
    r = 3.5
    dimer.positions[1, 0] = r
    labels = lj.calculate(dimer, ("energy", "forces"))
    assert labels.energy == pytest.approx(4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6), rel=1e-12)
    assert labels.forces[0, 0] < 0 < labels.forces[1, 0]  # repulsive inside r_min
    np.testing.assert_allclose(labels.forces.sum(axis=0), 0.0, atol=1e-14)


def test_lj_energy_and_force_vanish_smoothly_at_the_cutoff():
    lj = LennardJonesOracle(cutoff=8.0, onset=6.0)
    for r in (8.0 - 1e-6, 8.0, 8.5):
        labels = lj.calculate(Atoms("Ar2", positions=[[0, 0, 0], [r, 0, 0]]), ("energy", "forces"))
        assert abs(labels.energy) < 1e-12 and np.abs(labels.forces).max() < 1e-9


def test_lj_settings_are_resolved_and_json_ready():
    settings = LennardJonesOracle(sigma=3.0).settings()
    assert settings == {"epsilon": 0.0104, "sigma": 3.0, "cutoff": 9.0, "onset": pytest.approx(0.66 * 9.0),
                        "species": {}}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma": -1.0}, "sigma must be finite and > 0"),
        ({"epsilon": float("nan")}, "epsilon must be finite"),
        ({"cutoff": 5.0, "onset": 6.0}, "onset .* must be smaller than cutoff"),
        ({"species": {"Xx": {"sigma": 3.0}}}, "unknown element 'Xx'"),
        ({"species": {"Ar": {"sigma": 3.0, "rmin": 1}}}, "species\\['Ar'\\] must be a mapping"),
    ],
)
def test_lj_rejects_bad_settings(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        create_oracle("lj", **kwargs)


def test_lj_stress_without_cell_is_invalid_input():
    with pytest.raises(InvalidInput, match="stress"):
        LennardJonesOracle().calculate(Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]]), ("stress",))


# ---------------------------------------------------------------------------
# ASE adapter


class StrictCalculator(Calculator):
    """An ASE calculator that accepts only its own keyword and can be told to fail."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, mode: str = "ok"):
        super().__init__()
        self.mode = mode

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.mode == "scf":
            raise AseCalculationFailed("SCF did not converge in 100 iterations")
        if self.mode == "setup":
            raise CalculatorSetupError("pseudopotential Cu.upf not found")
        if self.mode == "crash":
            raise RuntimeError("segmentation fault in libxc")
        self.results = {"energy": 1.0, "forces": np.zeros((len(atoms), 3))}


def _strict(mode):
    return create_oracle("ase", calculator=f"{__name__}:StrictCalculator", mode=mode)


def test_ase_backend_maps_ase_errors_to_typed_errors():
    atoms = Atoms("Cu", positions=[[0, 0, 0]])
    with pytest.raises(CalculationFailed, match="SCF did not converge"):
        _strict("scf").calculate(atoms, ("energy",))
    with pytest.raises(SetupError, match="pseudopotential Cu.upf not found"):
        _strict("setup").calculate(atoms, ("energy",))
    with pytest.raises(CalculationFailed, match="RuntimeError: segmentation fault"):
        _strict("crash").calculate(atoms, ("energy",))
    assert _strict("ok").calculate(atoms, ("energy", "forces")).energy == 1.0


def test_ase_backend_properties_follow_the_calculator():
    oracle = _strict("ok")
    assert oracle.implemented_properties == ("energy", "forces")
    assert oracle.settings() == {"calculator": f"{__name__}:StrictCalculator", "parameters": {"mode": "ok"}}
    with pytest.raises(InvalidInput, match="does not implement \\['stress'\\]"):
        create_oracle("ase", calculator=f"{__name__}:StrictCalculator", properties=["energy", "stress"])


@pytest.mark.parametrize(
    "path, error, message",
    [
        ("not a path", InvalidInput, "bad import path"),
        ("no_such_package_xyz.calc:Calc", SetupError, "cannot import 'no_such_package_xyz.calc'"),
        ("ase.calculators.emt:NoSuchCalculator", InvalidInput, "has no attribute 'NoSuchCalculator'"),
    ],
)
def test_load_object_errors(path, error, message):
    with pytest.raises(error, match=message):
        load_object(path)


def test_load_object_accepts_dotted_and_colon_forms():
    assert load_object("ase.calculators.emt:EMT") is EMT
    assert load_object("ase.calculators.emt.EMT") is EMT


def test_ase_backend_rejects_unknown_calculator_keywords():
    with pytest.raises(InvalidInput, match="cannot construct the calculator"):
        create_oracle("ase", calculator=f"{__name__}:StrictCalculator", colour="blue")
    with pytest.raises(InvalidInput, match="given both"):
        create_oracle("ase", calculator=f"{__name__}:StrictCalculator", parameters={"mode": "ok"}, mode="ok")


def test_ase_backend_restricts_elements_when_told():
    oracle = create_oracle("ase", calculator="ase.calculators.emt:EMT", elements=["Cu", 79])
    assert oracle.supported_numbers() == frozenset({29, 79})


def test_adapter_makes_a_calculator_per_call_by_default():
    made = []

    def factory():
        calc = EMT()
        made.append(calc)
        return calc

    oracle = AseCalculatorOracle(factory, name="counted")
    atoms = bulk("Cu", "fcc", a=CU_FCC_A)
    n0 = len(made)  # one probe at construction
    oracle.calculate(atoms, ("energy",))
    oracle.calculate(atoms, ("energy",))
    assert len(made) == n0 + 2


def test_adapter_reuse_thread_keeps_one_calculator_per_thread():
    made = []
    lock = threading.Lock()

    def factory():
        with lock:
            made.append(threading.get_ident())
        return EMT()

    oracle = AseCalculatorOracle(factory, name="per-thread", reuse="thread")
    atoms = bulk("Cu", "fcc", a=CU_FCC_A)
    n0 = len(made)
    for _ in range(3):
        oracle.calculate(atoms, ("energy",))
    worker = threading.Thread(target=oracle.calculate, args=(atoms, ("energy",)))
    worker.start()
    worker.join()
    assert len(made) == n0 + 2  # one for this thread, one for the worker thread


def test_adapter_unsupported_element_becomes_calculation_failed():
    # without supported_numbers the adapter cannot pre-screen; EMT then fails on Fe
    oracle = AseCalculatorOracle(EMT, name="emt-unscreened")
    with pytest.raises(CalculationFailed, match="No EMT-potential for Fe"):
        oracle.calculate(bulk("Fe", "bcc", a=2.87), ("energy",))
