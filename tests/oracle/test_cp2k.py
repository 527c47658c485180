"""The CP2K oracle beyond the shared contract (which is in test_dft_backends.py): a real cp2k.psmp
for extensivity on a Γ-centred grid (the k-point code against the Γ-only code), the default
DZVP-MOLOPT-SR-GTH basis, cancellation (the process is killed), setup errors naming the package,
bad settings, and a cp2k that crashes.

CP2K is required (``install_system_packages.sh`` installs it): a missing code is a failure with
the install hint, as in test_dft_backends.  Calculations are 1-9 atoms with the SZV basis and a
200 Ry grid (~1-2 s of CPU each).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from oracle_service.backends._subprocess import KILL_GRACE_SECONDS
from oracle_service.base import CalculationCancelled, create_oracle
from oracle_service.client import OracleClient
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos import errors
from protos.errors import CalculationFailed, InvalidInput, SetupError

from .contract import copy_structure
from .test_dft_backends import al3si, al4, cp2k_settings, need_cp2k


@pytest.fixture(autouse=True)
def _cp2k_installed():
    need_cp2k()


def cp2k_children() -> list[int]:
    """pids of live cp2k processes whose parent is this test process."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me and comm.startswith("cp2k") and fields[0] != "Z":
            found.append(int(entry))
    return found


def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_gamma_centred_grid_is_extensive_and_matches_the_gamma_point_code():
    """Al3Si on a Γ-centred 2×1×1 grid samples k = 0 and ½ b₁; its 2×1×1 supercell at the Γ point
    (CP2K's Γ-only code, no &KPOINTS) samples the same states: E doubles, forces repeat, stress is equal."""
    atoms = al3si(np.random.default_rng(5))
    small = create_oracle("cp2k", **cp2k_settings(kpts=[2, 1, 1], gamma=True))
    big = create_oracle("cp2k", **cp2k_settings(kpts=[1, 1, 1]))
    props = ("energy", "forces", "stress")
    cell = small.calculate(copy_structure(atoms), props)
    double = big.calculate(copy_structure(atoms).repeat((2, 1, 1)), props)
    assert cell.info["kpts"] == [2, 1, 1] and double.info["kpts"] == [1, 1, 1]
    assert double.energy == pytest.approx(2 * cell.energy, abs=2e-4)
    np.testing.assert_allclose(double.forces[:4], cell.forces, atol=2e-3)
    np.testing.assert_allclose(double.forces[4:], cell.forces, atol=2e-3)
    np.testing.assert_allclose(double.stress, cell.stress, atol=2e-4)
    # and the grid matters (the test would pass trivially if the k-points were ignored)
    gamma_only = big.calculate(copy_structure(atoms), ("energy",))
    assert abs(gamma_only.energy - cell.energy) > 0.05


def test_molecule_in_a_box_at_the_gamma_point():
    """H₂O in a vacuum box: CP2K's Γ-only code (no &KPOINTS), fixed occupations, two elements (H, O).
    Forces are -dE/dx there too (the contract checks the k-point code)."""
    atoms = molecule("H2O")
    atoms.center(vacuum=2.5)
    atoms.pbc = True
    atoms.positions[1] += [0.03, -0.02, 0.05]
    oracle = create_oracle("cp2k", **cp2k_settings(kpts=None, smearing=None))
    labels = oracle.calculate(copy_structure(atoms), ("energy", "forces"))
    assert labels.info["kpts"] == [1, 1, 1] and labels.info["added_mos"] == 0
    # (their sum is not zero: the real-space grid breaks translation invariance -- 0.3 eV/Å at 200 Ry,
    # 0.1 eV/Å at 400 Ry for this O atom -- which is why production settings need a high `cutoff`)
    h = 2e-3  # Å
    for i, k in ((1, 2), (0, 1)):
        plus, minus = copy_structure(atoms), copy_structure(atoms)
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        fd = -(oracle.calculate(plus, ("energy",)).energy - oracle.calculate(minus, ("energy",)).energy) / (2 * h)
        assert fd == pytest.approx(labels.forces[i, k], abs=2e-3), (i, k, fd, labels.forces[i, k])


def test_spin_polarised_oxygen_molecule():
    """O₂ with UKS: the initial moments (1 μB per O) give the triplet (multiplicity 3), which lies well below
    the quintet, and its forces are -dE/dx.  (Spin-restricted O₂ does not even converge: its two π* orbitals
    hold two electrons with fixed occupations.)"""
    atoms = Atoms("O2", positions=[[0, 0, 0], [0, 0, 1.23]], cell=[5.0, 5.5, 6.0], pbc=True)
    atoms.center()
    triplet = create_oracle("cp2k", **cp2k_settings(kpts=None, smearing=None, uks=True, magnetization={"O": 1.0}))
    labels = triplet.calculate(copy_structure(atoms), ("energy", "forces"))
    assert labels.info["multiplicity"] == 3
    np.testing.assert_allclose(labels.forces[0], -labels.forces[1], atol=1e-3)  # a symmetric dimer
    quintet = create_oracle("cp2k", **cp2k_settings(kpts=None, smearing=None, uks=True, multiplicity=5))
    assert quintet.calculate(copy_structure(atoms), ("energy",)).energy > labels.energy + 1.0
    h = 2e-3  # Å
    plus, minus = copy_structure(atoms), copy_structure(atoms)
    plus.positions[1, 2] += h
    minus.positions[1, 2] -= h
    fd = -(triplet.calculate(plus, ("energy",)).energy - triplet.calculate(minus, ("energy",)).energy) / (2 * h)
    assert fd == pytest.approx(labels.forces[1, 2], abs=2e-3)


def test_default_basis_labels_silicon():
    """The default DZVP-MOLOPT-SR-GTH basis with GTH-PBE-q4, fixed occupations (an insulator), CP2K's 2×2×2
    Monkhorst-Pack grid."""
    oracle = create_oracle("cp2k", cutoff=200.0, rel_cutoff=40.0, kpts=[2, 2, 2], smearing=None, eps_scf=1e-7,
                           retries=[])
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.positions[0] += [0.05, -0.03, 0.02]
    labels = oracle.calculate(atoms, ("energy", "forces", "stress"))
    settings = oracle.settings()
    assert settings["basis_set"] == "DZVP-MOLOPT-SR-GTH" and settings["potential"] == "GTH-PBE"
    assert "sha256:" in settings["data_files"]["basis_file"]
    assert labels.info["added_mos"] == 0
    # 4 valence electrons per atom: about -3.9 Ha = -106 eV per atom (a unit slip would be far off)
    assert -110 < labels.energy / 2 < -100
    np.testing.assert_allclose(labels.forces.sum(axis=0), 0.0, atol=1e-3)  # Newton's third law
    assert labels.forces[0] @ np.array([0.05, -0.03, 0.02]) < 0  # restoring force
    assert np.abs(labels.stress[:3]).max() < 0.03  # PBE Si at 5.43 Å is within a few GPa of equilibrium


def test_last_default_retry_converges_to_the_same_labels():
    """The last rung of the default ladder (Pulay mixing, α = 0.1) after a failed first attempt gives the
    labels of the plain Broyden run: retries change how the SCF converges, not the physics."""
    from oracle_service.backends.cp2k import DEFAULT_RETRIES

    atoms = al4(np.random.default_rng(7))
    retried = create_oracle("cp2k", **cp2k_settings(max_scf=2, retries=[DEFAULT_RETRIES[-1]]))
    labels = retried.calculate(copy_structure(atoms), ("energy", "forces"))
    assert labels.info["attempt"] == 2 and labels.info["overrides"]["mixing_method"] == "pulay"
    assert labels.info["failed_attempts"][0]["reason"].startswith("SCF did not converge")
    plain = create_oracle("cp2k", **cp2k_settings()).calculate(copy_structure(atoms), ("energy", "forces"))
    assert labels.energy == pytest.approx(plain.energy, abs=1e-4)
    np.testing.assert_allclose(labels.forces, plain.forces, atol=2e-3)


def test_cancel_kills_cp2k_and_is_not_a_failure():
    oracle = create_oracle("cp2k", **cp2k_settings(kpts=[4, 4, 4], quarantine_after=1))
    slow = al4(np.random.default_rng(3)).repeat((2, 2, 2))
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            oracle.calculate(slow, ("energy", "forces"), cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: cp2k_children(), 10), "cp2k never started"
    running = cp2k_children()
    cancel.set()
    start = time.monotonic()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - start < 5, "cp2k was not killed soon after the cancel"
    assert len(outcome) == 1 and isinstance(outcome[0], CalculationCancelled), outcome
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and pid in cp2k_children()
                                      for pid in running), 5), "the cp2k process survived its cancellation"
    assert oracle.quarantined() == []  # a cancelled run is no failure


def test_grpc_deadline_kills_cp2k_and_the_worker_serves_the_next_label():
    """Through the oracle service on 127.0.0.1: the only waiter's deadline passes -> cp2k is killed,
    nothing is cached or quarantined, and the one worker labels the next structure with CP2K."""
    config = OracleServiceConfig(backend="cp2k", settings=cp2k_settings(quarantine_after=1), workers=1,
                                 queue_limit=4)
    running = start_oracle_server(config)
    try:
        service = running.label_service
        slow = al4(np.random.default_rng(3)).repeat((2, 2, 2))
        failure: list[BaseException] = []

        def call() -> None:
            with OracleClient(running.address, timeout=30) as client:
                try:
                    client.label(slow, ("energy", "forces"), timeout=1.0)
                except errors.EpicycleError as exc:
                    failure.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        assert wait_until(lambda: cp2k_children(), 5), "cp2k never started"
        started = cp2k_children()
        thread.join(10)
        assert not thread.is_alive() and len(failure) == 1 and isinstance(failure[0], errors.CalculationTimeout)
        assert wait_until(lambda: not cp2k_children(), KILL_GRACE_SECONDS + 3), f"cp2k {started} still running"
        assert wait_until(lambda: service.stats()["in_flight"] == 0, 2)
        stats = service.stats()
        assert stats["calculations_cancelled"] == 1 and stats["cache_entries"] == 0 and stats["quarantined"] == 0
        with OracleClient(running.address, timeout=60) as client:
            labels = client.label(al3si(np.random.default_rng(2)), ("energy", "forces", "stress"), timeout=60)
        assert not labels.cached and np.isfinite(labels.labels.energy) and labels.labels.forces.shape == (4, 3)
        assert not cp2k_children()
    finally:
        running.stop(grace=0)


def test_missing_executable_and_data_are_setup_errors(tmp_path):
    with pytest.raises(SetupError, match="cp2k-does-not-exist.*install_system_packages.sh"):
        create_oracle("cp2k", **cp2k_settings(command="cp2k-does-not-exist"))
    with pytest.raises(SetupError, match="MPI launcher"):
        create_oracle("cp2k", **cp2k_settings(mpi_procs=2, mpirun="no-such-mpirun"))
    oracle = create_oracle("cp2k", **cp2k_settings(data_dir=str(tmp_path)))
    with pytest.raises(SetupError, match="BASIS_MOLOPT.*cp2k-data"):
        oracle.calculate(al4(), ("energy",))
    assert "missing" in oracle.settings()["data_files"]["basis_file"]
    # removed after start-up: the calculation reports it too
    fake = tmp_path / "bin" / "cp2k"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    oracle = create_oracle("cp2k", **cp2k_settings(command=str(fake)))
    fake.unlink()
    with pytest.raises(SetupError, match="does not exist"):
        oracle.calculate(al4(), ("energy",))
    assert "not available" in oracle.version()


def test_elements_basis_sets_and_potentials():
    oracle = create_oracle("cp2k", **cp2k_settings())
    numbers = oracle.supported_numbers()
    assert {1, 6, 8, 13, 14, 29} <= numbers and 118 not in numbers
    kinds, valence = oracle.kinds(["Al", "Si", "Cu"])
    # the potential's valence follows the basis (-qN): Cu SZV-MOLOPT-SR-GTH-q11 -> GTH-PBE-q11
    assert kinds == {"Al": ("SZV-MOLOPT-SR-GTH", "GTH-PBE-q3"), "Si": ("SZV-MOLOPT-SR-GTH", "GTH-PBE-q4"),
                     "Cu": ("SZV-MOLOPT-SR-GTH", "GTH-PBE-q11")}
    assert valence == {"Al": 3, "Si": 4, "Cu": 11}
    bad = create_oracle("cp2k", **cp2k_settings(basis_set={"Al": "NO-SUCH-BASIS"}))
    with pytest.raises(InvalidInput, match=r"Al: no basis set 'NO-SUCH-BASIS' in BASIS_MOLOPT \(available: .*SZV"):
        bad.calculate(al4(), ("energy",))
    with pytest.raises(InvalidInput, match="Si: the basis_set mapping has no entry for it"):
        bad.calculate(al3si(), ("energy",))  # a per-element mapping must name every element
    bad = create_oracle("cp2k", **cp2k_settings(potential="GTH-NOPE"))
    with pytest.raises(InvalidInput, match="no potential 'GTH-NOPE-q3' or 'GTH-NOPE' in GTH_POTENTIALS"):
        bad.calculate(al4(), ("energy",))


@pytest.mark.parametrize("settings, message", [
    ({"cutoff": -100}, r"cutoff \(Ry\) must be a positive number"),
    ({"rel_cutoff": 0}, r"rel_cutoff \(Ry\) must be a positive number"),
    ({"smearing": "gaussian"}, "smearing must be one of"),
    ({"electronic_temperature": -5}, r"electronic_temperature \(K\)"),
    ({"mixing_alpha": 1.5}, r"mixing_alpha must be in \(0, 1\]"),
    ({"mixing_method": "anderson"}, "mixing_method must be one of"),
    ({"max_scf": 2.5}, "max_scf must be a positive integer"),
    ({"multiplicity": 0}, "multiplicity must be a positive integer"),
    ({"magnetization": {"Fe": "high"}}, "magnetization must be a number"),
    ({"retries": [{"basis_set": "DZVP-MOLOPT-SR-GTH"}]}, "cannot change"),
    ({"retries": [{"mixing_alpha": 0}]}, "mixing_alpha"),
    ({"ecutwfc": 30}, "bad settings"),  # QE's name, not CP2K's
])
def test_bad_settings_are_invalid_input(settings, message):
    with pytest.raises(InvalidInput, match=message):
        create_oracle("cp2k", **cp2k_settings(**settings))


def fake_cp2k(tmp_path, body: str) -> str:
    path = tmp_path / "fake-cp2k"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_crash_is_a_calculation_failure_with_the_log(tmp_path):
    command = fake_cp2k(tmp_path, "echo ' CP2K| version string: CP2K version 2023.1'\necho 'partial output'\n"
                                  "kill -SEGV $$\n")
    oracle = create_oracle("cp2k", **cp2k_settings(command=command, quarantine_after=0))
    with pytest.raises(CalculationFailed) as info:
        oracle.calculate(al4(), ("energy", "forces"))
    assert "cp2k crashed (killed by signal SIGSEGV)" in str(info.value)
    assert "partial output" in info.value.log_tail


def test_labels_need_the_end_of_the_program(tmp_path):
    command = fake_cp2k(tmp_path, "echo '  *** SCF run converged in     5 steps ***'\n"
                                  "echo ' ENERGY| Total FORCE_EVAL ( QS ) energy [a.u.]:   -8.2'\nexit 0\n")
    oracle = create_oracle("cp2k", **cp2k_settings(command=command, quarantine_after=0))
    with pytest.raises(CalculationFailed, match="no 'PROGRAM ENDED AT'"):
        oracle.calculate(al4(), ("energy",))
