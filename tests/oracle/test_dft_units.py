"""DFT oracle plumbing that needs no DFT code: output parsing and units, k-point grids,
pw.x input writing, the retry/quarantine policy, process-group timeouts and the
persistent worker.  (The real codes are exercised in test_dft_backends.py.)"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk

from oracle_service.backends._scf import Quarantined, ScfOracle, kpoint_grid, structure_key
from oracle_service.backends._subprocess import (
    PersistentWorker,
    run_command,
    scratch_directory,
    tail_file,
    tail_text,
    thread_env,
)
from oracle_service.backends.cp2k import (
    gamma_centred_kpoints,
    parse_cp2k_output,
    read_data_file,
    write_cp2k_input,
)
from oracle_service.backends.qe import parse_pw_output, pw_log_tail, write_pw_input
from oracle_service.base import Labels
from protos.errors import CalculationFailed, CalculationTimeout, InvalidInput, SetupError

THIS_MODULE = "tests.oracle.test_dft_units"

# ---------------------------------------------------------------------------
# pw.x output: a tiny recorded-style snippet (QE 6.7 layout), numbers chosen by hand

PW_OK = """
     Program PWSCF v.6.7MaX starts on 21Nov2026 at  5:37:43
     number of atoms/cell      =            2
     total energy              =     -15.80000000 Ry
     estimated scf accuracy    <       0.00000001 Ry

     End of self-consistent calculation

!    total energy              =     -15.84345678 Ry
     smearing contrib. (-TS)   =      -0.00013670 Ry
     internal energy E=F+TS    =     -15.84332008 Ry

     convergence has been achieved in   6 iterations

     Forces acting on atoms (cartesian axes, Ry/au):

     atom    1 type  1   force =     0.01000000   -0.02000000    0.00000000
     atom    2 type  2   force =    -0.01000000    0.02000000    0.00300000
     The non-local contrib.  to forces
     atom    1 type  1   force =     0.00100000    0.00000000    0.00000000
     atom    2 type  2   force =    -0.00100000    0.00000000    0.00000000

     Total force =     0.031623     Total SCF correction =     0.000001

     Computing stress (Cartesian axis) and pressure

          total   stress  (Ry/bohr**3)                   (kbar)     P=       34.46
   0.00023305   0.00000100   0.00000200           34.28        0.15        0.29
   0.00000100   0.00023483   0.00000300            0.15       34.54        0.44
   0.00000200   0.00000300   0.00023483            0.29        0.44       34.54

     init_run     :      0.05s CPU      0.05s WALL (       1 calls)
     PWSCF        :      0.19s CPU      0.20s WALL

   JOB DONE.
"""

PW_NOT_CONVERGED = """
     total energy              =     -16.54909549 Ry
     estimated scf accuracy    <       0.00194892 Ry

     End of self-consistent calculation

     convergence NOT achieved after   2 iterations: stopping

     Writing output data file ./out/epicycle.save/
     init_run     :      0.02s CPU      0.02s WALL (       1 calls)
   JOB DONE.
STOP 2
"""

PW_ERROR = """
     Reading input from standard input

 %%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%
     Error in routine cdiaghg (191):
     S matrix not positive definite
 %%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%

     stopping ...
"""


class TestPwOutputUnits:
    def test_energy_forces_stress_units_and_signs(self):
        r = parse_pw_output(PW_OK, n_atoms=2, want_stress=True)
        # the '!' line is the free energy F = E - TS that forces are derivatives of (Ry -> eV)
        assert r["energy"] == pytest.approx(-15.84345678 * units.Ry, rel=1e-12)
        assert r["energy"] == pytest.approx(-215.5612, abs=1e-3)
        # first forces block only (not the non-local contributions); Ry/bohr -> eV/Å
        expected = np.array([[0.01, -0.02, 0.0], [-0.01, 0.02, 0.003]]) * units.Ry / units.Bohr
        np.testing.assert_allclose(r["forces"], expected, rtol=1e-12)
        assert r["forces"][0, 0] == pytest.approx(0.2571103, rel=1e-6)  # 1 Ry/bohr = 25.711 eV/Å
        # QE prints +P for a compressed cell; ASE's stress is (1/V) dE/dε: negative there
        s = r["stress"]
        assert s.shape == (6,)
        assert np.all(s[:3] < 0)
        # independent check against QE's own kbar columns (2 decimals): ASE GPa = -kbar / 10
        kbar_voigt = np.array([34.28, 34.54, 34.54, 0.44, 0.29, 0.15])
        np.testing.assert_allclose(s / units.GPa, -kbar_voigt / 10, rtol=2e-3, atol=2e-3)
        # Voigt order xx yy zz yz xz xy
        np.testing.assert_allclose(
            s, -np.array([0.00023305, 0.00023483, 0.00023483, 0.000003, 0.000002, 0.000001]) * units.Ry / units.Bohr**3,
            rtol=1e-12,
        )
        assert r["scf_iterations"] == 6

    def test_stress_not_required_when_not_asked(self):
        text = PW_OK[: PW_OK.index("     Computing stress")] + "\n   JOB DONE.\n"
        r = parse_pw_output(text, n_atoms=2, want_stress=False)
        assert "stress" not in r
        with pytest.raises(CalculationFailed, match="no stress tensor"):
            parse_pw_output(text, n_atoms=2, want_stress=True)

    def test_unconverged_scf_is_a_failure_with_log_tail(self):
        with pytest.raises(CalculationFailed) as info:
            parse_pw_output(PW_NOT_CONVERGED, n_atoms=4, want_stress=False, returncode=2)
        assert "convergence NOT achieved after 2 iterations" in str(info.value)
        assert "estimated scf accuracy" in info.value.log_tail
        assert "timing report" in info.value.log_tail  # the timing noise is cut out of the tail

    def test_end_of_scf_without_convergence_message_is_a_failure(self):
        text = PW_OK.replace("     convergence has been achieved in   6 iterations\n", "")
        with pytest.raises(CalculationFailed, match="does not report SCF convergence"):
            parse_pw_output(text, n_atoms=2, want_stress=True)

    def test_error_block_is_reported(self):
        with pytest.raises(CalculationFailed, match=r"cdiaghg: S matrix not positive definite"):
            parse_pw_output(PW_ERROR, n_atoms=2, want_stress=False, returncode=1)

    def test_crash_and_truncated_output(self):
        with pytest.raises(CalculationFailed, match="killed by signal SIGSEGV"):
            parse_pw_output(PW_OK, n_atoms=2, want_stress=True, returncode=-signal.SIGSEGV)
        truncated = PW_OK[: PW_OK.index("Forces acting")]
        with pytest.raises(CalculationFailed, match="no 'JOB DONE'"):
            parse_pw_output(truncated, n_atoms=2, want_stress=True)
        with pytest.raises(CalculationFailed, match="no forces block"):
            parse_pw_output(truncated + "\n   JOB DONE.\n", n_atoms=2, want_stress=False)

    def test_wrong_atom_count_in_forces(self):
        with pytest.raises(CalculationFailed, match="forces block has 2 atoms, expected 3"):
            parse_pw_output(PW_OK, n_atoms=3, want_stress=True)

    def test_log_tail_without_timing(self):
        assert pw_log_tail("a\nb\n") == "a\nb"


class TestPwInput:
    def test_input_has_cell_positions_species_and_settings(self):
        atoms = bulk("Si", "diamond", a=5.43) + Atoms("Al", positions=[[0.1, 0.2, 0.3]])
        params = dict(ecutwfc=25.0, ecutrho=None, smearing="mv", degauss=0.01, nspin=1, starting_magnetization=None,
                      conv_thr=1e-9, mixing_beta=0.3, mixing_mode="plain", electron_maxstep=77,
                      diagonalization="david", koffset=[1, 1, 1], extra_input={"system": {"nbnd": 12}})
        text = write_pw_input(atoms, {"Si": "Si.upf", "Al": "Al.upf"}, params, "/pp", (3, 3, 2), stress=True)
        assert "ecutwfc = 25.0" in text and "ecutrho = 100.0" in text  # 4 * ecutwfc for norm-conserving
        assert "electron_maxstep = 77" in text and "mixing_beta = 0.3" in text and "conv_thr = 1d-09" in text
        assert "tstress = .true." in text and "tprnfor = .true." in text and "nbnd = 12" in text
        assert "ntyp = 2" in text and "nat = 3" in text
        assert "K_POINTS automatic\n  3 3 2 1 1 1" in text
        assert "Si 28.085" in text and "Al.upf" in text
        cell_lines = text.split("CELL_PARAMETERS angstrom\n")[1].splitlines()[:3]
        np.testing.assert_allclose([[float(x) for x in ln.split()] for ln in cell_lines], atoms.cell.array, atol=1e-12)
        pos_lines = text.split("ATOMIC_POSITIONS angstrom\n")[1].splitlines()[:3]
        assert [ln.split()[0] for ln in pos_lines] == ["Si", "Si", "Al"]
        np.testing.assert_allclose([[float(x) for x in ln.split()[1:]] for ln in pos_lines], atoms.positions,
                                   atol=1e-12)

    def test_fixed_occupations_and_spin(self):
        atoms = bulk("Al", "fcc", a=4.05)
        params = dict(ecutwfc=20.0, ecutrho=160.0, smearing=None, degauss=0.0, nspin=2,
                      starting_magnetization={"Al": 0.5}, conv_thr=1e-8, mixing_beta=0.7, mixing_mode="plain",
                      electron_maxstep=10, diagonalization="cg", koffset=[0, 0, 0], extra_input={})
        text = write_pw_input(atoms, {"Al": "Al.upf"}, params, "/pp", (1, 1, 1), stress=False)
        assert "occupations = 'fixed'" in text and "smearing" not in text
        assert "nspin = 2" in text and "starting_magnetization(1) = 0.5" in text
        assert "tstress = .false." in text


# ---------------------------------------------------------------------------
# CP2K output: the layout of CP2K 2023.1 (Debian) at PRINT_LEVEL LOW, numbers from a real Al4 run

CP2K_OK = """
 SCF WAVEFUNCTION OPTIMIZATION

  Step     Update method      Time    Convergence         Total energy    Change
  ------------------------------------------------------------------------------
     1 NoMix/Diag. 0.30E+00    0.9     0.92020338        -8.8273676558 -8.83E+00
    12 Broy./Diag. 0.30E+00    1.2     0.00000003        -8.2641540187  2.92E-07

  *** SCF run converged in    12 steps ***

  Electronic entropic energy:                                  -0.01201309618497
  Total energy:                                                -8.26415401868430

 ENERGY| Total FORCE_EVAL ( QS ) energy [a.u.]:               -8.264153704278570

 ATOMIC FORCES in [a.u.]

 # Atom   Kind   Element          X              Y              Z
      1      1      Al         -0.00202333    -0.00000000    -0.00064051
      2      2      Si         -0.00317511     0.00000000     0.00052159
 SUM OF ATOMIC FORCES          -0.00519844     0.00000000    -0.00011892     0.00519980

 STRESS| Analytical stress tensor [GPa]
 STRESS|                        x                   y                   z
 STRESS|      x        1.21460100434E+00   3.00000000000E-03   7.47302620065E-03
 STRESS|      y        3.00000000000E-03   1.36122649662E+00   2.00000000000E-03
 STRESS|      z        7.47302620065E-03   2.00000000000E-03   1.35524740017E+00
 STRESS| 1/3 Trace                                             1.31035830038E+00

 STRESS| Eigenvectors and eigenvalues of the analytical stress tensor [GPa]
 STRESS|                        1                   2                   3
 STRESS| Eigenvalues   1.21420505149E+00   1.35564335303E+00   1.36122649662E+00
 STRESS|      x           0.998599281970      0.052910056218      0.000000005892
 STRESS|      y          -0.000000002339     -0.000000067210      1.000000000000
 STRESS|      z          -0.052910056218      0.998599281970      0.000000066993

 -------------------------------------------------------------------------------
 -                                                                             -
 -                                DBCSR STATISTICS                             -
 -                                                                             -
 -------------------------------------------------------------------------------
 CP2K                                 1  1.0    0.017    0.017   23.963   23.963
  **** **** ******  **  PROGRAM ENDED AT                 2026-12-06 03:34:23.173
"""

CP2K_NOT_CONVERGED = """
  Step     Update method      Time    Convergence         Total energy    Change
  ------------------------------------------------------------------------------
     1 NoMix/Diag. 0.30E+00    0.4     1.17894377        -8.3160261363 -8.32E+00
     2 Broy./Diag. 0.30E+00    0.4     0.01207933        -8.3277828533 -1.18E-02

  Leaving inner SCF loop after reaching     2 steps.

  Total energy:                                                -8.32778285326953

 *** WARNING in qs_scf.F:601 :: SCF run NOT converged ***

 ENERGY| Total FORCE_EVAL ( QS ) energy [a.u.]:               -8.095268285675996

 ATOMIC FORCES in [a.u.]

 # Atom   Kind   Element          X              Y              Z
      1      1      Al          0.00380207     0.00000000    -0.00206365
      2      1      Al         -0.01031126     0.00000000     0.00064172
  **** **** ******  **  PROGRAM ENDED AT                 2026-12-06 03:40:00.000
"""

CP2K_ABORT = r"""
 *******************************************************************************
 *   ___                                                                       *
 *  /   \                                                                      *
 * [ABORT]                                                                     *
 *  \___/    The requested atomic potential <GTH-PBE-q99> for element <Al> was *
 *    |      not found in the potential file </usr/share/cp2k/GTH_POTENTIALS>  *
 *  O/|                                                                        *
 * /| |                                                                        *
 * / \                                  subsys/external_potential_types.F:2324 *
 *******************************************************************************

 ===== Routine Calling Stack =====
MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD
"""


class TestCP2KOutputUnits:
    def test_energy_forces_stress_units_and_signs(self):
        r = parse_cp2k_output(CP2K_OK, n_atoms=2, want_stress=True)
        # the FORCE_EVAL energy (Hartree -> eV); it includes the entropic term: the free energy
        assert r["energy"] == pytest.approx(-8.264153704278570 * units.Hartree, rel=1e-14)
        assert r["energy"] == pytest.approx(-224.8791, abs=1e-3)
        expected = np.array([[-0.00202333, 0.0, -0.00064051], [-0.00317511, 0.0, 0.00052159]])
        np.testing.assert_allclose(r["forces"], expected * units.Hartree / units.Bohr, rtol=1e-12)
        assert r["forces"][1, 0] == pytest.approx(-0.00317511 * 51.42208619, rel=1e-6)  # 1 Ha/bohr = 51.42 eV/Å
        # CP2K prints a pressure (positive: the cell wants to expand); ASE: (1/V) dE/dε, negative there
        s = r["stress"]
        np.testing.assert_allclose(
            s / units.GPa, -np.array([1.21460100434, 1.36122649662, 1.35524740017, 2e-3, 7.47302620065e-3, 3e-3]),
            rtol=1e-12)  # Voigt order xx yy zz yz xz xy; the eigenvector block below is not read
        assert s[0] == pytest.approx(-1.21460100434 / 160.21766, rel=1e-6)  # 1 eV/Å³ = 160.2 GPa
        assert r["scf_iterations"] == 12

    def test_unconverged_scf_is_a_failure_with_the_scf_log(self):
        # CP2K 2023.1 only warns, prints energy and forces, and exits 0: those must not become labels
        with pytest.raises(CalculationFailed) as info:
            parse_cp2k_output(CP2K_NOT_CONVERGED, n_atoms=2, want_stress=False, returncode=0)
        assert str(info.value).startswith("SCF did not converge: cp2k reports 'SCF run NOT converged' after 2 steps")
        assert "Leaving inner SCF loop" in info.value.log_tail

    def test_abort_message_is_reported(self):
        with pytest.raises(CalculationFailed, match=r"cp2k stopped with an error: The requested atomic potential "
                                                    r"<GTH-PBE-q99> for element <Al> was not found"):
            parse_cp2k_output(CP2K_ABORT, n_atoms=1, want_stress=False, returncode=1)

    def test_crash_truncation_and_missing_blocks(self):
        with pytest.raises(CalculationFailed, match="cp2k crashed .killed by signal SIGSEGV."):
            parse_cp2k_output(CP2K_OK, n_atoms=2, want_stress=True, returncode=-signal.SIGSEGV)
        truncated = CP2K_OK[: CP2K_OK.index(" ATOMIC FORCES")]
        with pytest.raises(CalculationFailed, match="no 'PROGRAM ENDED AT'"):
            parse_cp2k_output(truncated, n_atoms=2, want_stress=False)
        with pytest.raises(CalculationFailed, match="no forces block"):
            parse_cp2k_output(truncated + " PROGRAM ENDED AT\n", n_atoms=2, want_stress=False)
        no_stress = CP2K_OK.replace("STRESS| Analytical stress tensor", "STRESS| something else")
        assert "stress" not in parse_cp2k_output(no_stress, n_atoms=2, want_stress=False)
        with pytest.raises(CalculationFailed, match="no stress tensor"):
            parse_cp2k_output(no_stress, n_atoms=2, want_stress=True)
        with pytest.raises(CalculationFailed, match="does not report SCF convergence"):
            parse_cp2k_output(CP2K_OK.replace("SCF run converged in", "SCF run finished in"), 2, False)
        with pytest.raises(CalculationFailed, match="forces block has 2 atoms, expected 3"):
            parse_cp2k_output(CP2K_OK, n_atoms=3, want_stress=False)


class TestCP2KInput:
    PARAMS = dict(cutoff=250.0, rel_cutoff=45.0, ngrids=4, xc="PBE", gamma=False, smearing="fermi-dirac",
                  electronic_temperature=800.0, eps_scf=1e-8, max_scf=33, mixing_method="broyden", mixing_alpha=0.3,
                  eps_default=1e-11)

    def test_input_has_cell_coordinates_kinds_and_settings(self):
        atoms = bulk("Si", "diamond", a=5.43) + Atoms("Al", positions=[[0.1, 0.2, 0.3]])
        kinds = {"Si": ("DZVP-MOLOPT-SR-GTH", "GTH-PBE-q4"), "Al": ("DZVP-MOLOPT-SR-GTH", "GTH-PBE-q3")}
        text = write_cp2k_input(atoms, kinds, self.PARAMS, "/d/BASIS_MOLOPT", "/d/GTH_POTENTIALS", (3, 3, 2),
                                stress=True, added_mos=12)
        for line in ("CUTOFF 250", "REL_CUTOFF 45", "MAX_SCF 33", "EPS_SCF 1.000e-08", "ADDED_MOS 12",
                     "STRESS_TENSOR ANALYTICAL", "ELECTRONIC_TEMPERATURE [K] 800", "METHOD BROYDEN_MIXING",
                     "ALPHA 0.3", "SCHEME MONKHORST-PACK 3 3 2", "BASIS_SET_FILE_NAME /d/BASIS_MOLOPT",
                     "&KIND Al", "POTENTIAL GTH-PBE-q3", "PERIODIC XYZ", "RUN_TYPE ENERGY_FORCE"):
            assert line in text, line
        cell = [ln.split()[1:] for ln in text.splitlines() if ln.strip()[:2] in ("A ", "B ", "C ")]
        np.testing.assert_allclose(np.array(cell, dtype=float), atoms.cell.array, atol=1e-12)
        coord = text.split("&COORD\n")[1].split("&END COORD")[0].strip().splitlines()
        assert [ln.split()[0] for ln in coord] == ["Si", "Si", "Al"]
        np.testing.assert_allclose([[float(x) for x in ln.split()[1:]] for ln in coord], atoms.positions, atol=1e-12)

    def test_gamma_point_fixed_occupations_and_no_stress(self):
        params = dict(self.PARAMS, smearing=None)
        text = write_cp2k_input(bulk("Al", "fcc", a=4.05), {"Al": ("SZV-MOLOPT-SR-GTH", "GTH-PBE-q3")}, params,
                                "/b", "/p", (1, 1, 1), stress=False, added_mos=0)
        assert "&KPOINTS" not in text and "&SMEAR" not in text and "STRESS_TENSOR NONE" in text

    def test_spin_polarised_input(self):
        from oracle_service.backends.cp2k import spin_multiplicity

        params = dict(self.PARAMS, uks=True, magnetization={"O": 1.5})
        text = write_cp2k_input(Atoms("O2", positions=[[0, 0, 0], [0, 0, 1.2]], cell=[5, 5, 5]),
                                {"O": ("b", "p")}, params, "/b", "/p", (1, 1, 1), stress=False, added_mos=0,
                                multiplicity=spin_multiplicity(12, 3.0))
        assert "    UKS\n    MULTIPLICITY 5\n" in text  # 12 electrons, 3 μB -> parity -> 4 unpaired
        assert "MAGNETIZATION 1.5" in text
        assert spin_multiplicity(12, 2.0) == 3 and spin_multiplicity(11, 0.0) == 2 and spin_multiplicity(8, -2) == 3
        assert "UKS" not in write_cp2k_input(Atoms("O2", positions=[[0, 0, 0], [0, 0, 1.2]], cell=[5, 5, 5]),
                                             {"O": ("b", "p")}, self.PARAMS, "/b", "/p", (1, 1, 1), False, 0)

    def test_gamma_centred_grid(self):
        points = gamma_centred_kpoints((2, 2, 2))
        assert len(points) == 8 and all(w == pytest.approx(1 / 8) for _, w in points)  # all time-reversal invariant
        points = gamma_centred_kpoints((4, 1, 1))  # 0, ±1/4 merged, 1/2
        assert [k for k, _ in points] == [(0.0, 0.0, 0.0), (0.25, 0.0, 0.0), (0.5, 0.0, 0.0)]
        assert [w for _, w in points] == [0.25, 0.5, 0.25]
        text = write_cp2k_input(bulk("Al", "fcc", a=4.05), {"Al": ("b", "p")}, dict(self.PARAMS, gamma=True),
                                "/b", "/p", (4, 1, 1), stress=False, added_mos=10)
        assert "SCHEME GENERAL" in text and "KPOINT 0.250000000000 0.000000000000 0.000000000000 0.500000000000" in text

    def test_data_file_entries_and_aliases(self, tmp_path):
        (tmp_path / "POT").write_text("# comment\nAl GTH-PBE-q3 GTH-PBE\n    2    1\n  0.45 1 -7.5\n"
                                      "Cu GTH-PBE-q11\n 1 0 10\n")
        entries = read_data_file(tmp_path / "POT")
        assert entries["Al"]["GTH-PBE"] == (("GTH-PBE-q3", "GTH-PBE"), "    2    1")
        assert set(entries["Cu"]) == {"GTH-PBE-q11"}


class TestKpointGrid:
    def test_explicit_and_spacing(self):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        assert kpoint_grid(atoms, [4, 3, 2], None) == (4, 3, 2)
        # 2π/4.05 Å = 1.551 Å⁻¹: spacing 0.8 -> 2 points, 0.3 -> 6 points
        assert kpoint_grid(atoms, [9, 9, 9], 0.8) == (2, 2, 2)
        assert kpoint_grid(atoms, None, 0.3) == (6, 6, 6)
        assert kpoint_grid(atoms.repeat((2, 1, 1)), None, 0.8) == (1, 2, 2)

    def test_non_periodic_directions_get_one_point(self):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        atoms.pbc = [True, True, False]
        assert kpoint_grid(atoms, [4, 4, 4], None) == (4, 4, 1)


# ---------------------------------------------------------------------------
# retries and quarantine (a scripted fake backend)


class ScriptedOracle(ScfOracle):
    """Converges only when ``maxstep`` >= ``needed``; counts its calls."""

    name = "scripted"
    implemented_properties = ("energy", "forces")
    retry_keys = frozenset({"maxstep", "beta"})

    def __init__(self, needed=10, maxstep=1, timeout_below=0, **kwargs):
        self.needed = needed
        self.maxstep = maxstep
        self.timeout_below = timeout_below
        self.calls: list[dict] = []
        super().__init__(**kwargs)

    def calculate_once(self, atoms, properties, overrides):
        self.calls.append(dict(overrides))
        maxstep = overrides.get("maxstep", self.maxstep)
        if maxstep < self.timeout_below:
            raise CalculationTimeout("took too long", "log: still iterating")
        if maxstep < self.needed:
            raise CalculationFailed(f"SCF did not converge in {maxstep} steps", f"log: iteration {maxstep}")
        return Labels(energy=-1.0, forces=np.zeros((len(atoms), 3)), info={"backend": "scripted"})


def _al():
    return bulk("Al", "fcc", a=4.05, cubic=True)


class TestRetryAndQuarantine:
    def test_retry_with_escalated_settings_succeeds(self):
        oracle = ScriptedOracle(needed=10, retries=[{"maxstep": 5, "beta": 0.3}, {"maxstep": 50, "beta": 0.1}])
        labels = oracle.calculate(_al(), ("energy",))
        assert labels.energy == -1.0
        assert oracle.calls == [{}, {"maxstep": 5, "beta": 0.3}, {"maxstep": 50, "beta": 0.1}]
        assert labels.info["attempt"] == 3 and labels.info["overrides"] == {"maxstep": 50, "beta": 0.1}
        assert [a["reason"] for a in labels.info["failed_attempts"]] == [
            "SCF did not converge in 1 steps", "SCF did not converge in 5 steps"]
        assert oracle.quarantined() == []

    def test_exhausted_ladder_fails_with_every_attempt_and_quarantines(self):
        oracle = ScriptedOracle(needed=100, retries=[{"maxstep": 5}, {"maxstep": 50}])
        atoms = _al()
        with pytest.raises(CalculationFailed) as info:
            oracle.calculate(atoms, ("energy",))
        text = str(info.value)
        assert "failed after 3 attempt(s)" in text
        assert "[1] configured settings: SCF did not converge in 1 steps" in text
        assert "[3] maxstep=50: SCF did not converge in 50 steps" in text
        assert "now quarantined" in text
        assert info.value.log_tail == "log: iteration 50"  # the last attempt's log
        assert not isinstance(info.value, Quarantined)
        n_calls = len(oracle.calls)
        # quarantined: fails at once, the code is not run again
        with pytest.raises(Quarantined, match="is quarantined: it failed 1 time"):
            oracle.calculate(atoms.copy(), ("energy",))
        assert len(oracle.calls) == n_calls
        report = oracle.quarantined()
        assert len(report) == 1 and report[0]["formula"] == "Al4" and report[0]["failures"] == 1
        assert report[0]["structure_hash"] == structure_key(atoms)
        # another structure is not affected
        other = _al()
        other.positions[0, 0] += 0.01
        with pytest.raises(CalculationFailed) as again:
            oracle.calculate(other, ("energy",))
        assert not isinstance(again.value, Quarantined)
        assert oracle.release_quarantine() == 2
        with pytest.raises(CalculationFailed) as released:
            oracle.calculate(atoms, ("energy",))
        assert not isinstance(released.value, Quarantined)

    def test_quarantine_after_n_failures_and_success_resets(self):
        oracle = ScriptedOracle(needed=100, quarantine_after=2)
        atoms = _al()
        for _ in range(2):
            with pytest.raises(CalculationFailed) as info:
                oracle.calculate(atoms, ("energy",))
            assert not isinstance(info.value, Quarantined)
        with pytest.raises(Quarantined):
            oracle.calculate(atoms, ("energy",))
        # a success in between resets the count
        oracle2 = ScriptedOracle(needed=100, quarantine_after=2)
        with pytest.raises(CalculationFailed):
            oracle2.calculate(atoms, ("energy",))
        oracle2.needed = 0
        oracle2.calculate(atoms, ("energy",))
        oracle2.needed = 100
        with pytest.raises(CalculationFailed) as info:
            oracle2.calculate(atoms, ("energy",))
        assert "now quarantined" not in str(info.value)

    def test_quarantine_disabled(self):
        oracle = ScriptedOracle(needed=100, quarantine_after=0)
        for _ in range(3):
            with pytest.raises(CalculationFailed) as info:
                oracle.calculate(_al(), ("energy",))
            assert not isinstance(info.value, Quarantined)
        assert oracle.quarantined() == []

    def test_quarantine_file_is_written_and_read_back(self, tmp_path):
        path = tmp_path / "q" / "quarantine.jsonl"
        oracle = ScriptedOracle(needed=100, quarantine_file=str(path))
        atoms = _al()
        with pytest.raises(CalculationFailed):
            oracle.calculate(atoms, ("energy",))
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(entries) == 1 and entries[0]["backend"] == "scripted"
        assert entries[0]["structure_hash"] == structure_key(atoms) and entries[0]["formula"] == "Al4"
        restarted = ScriptedOracle(needed=0, quarantine_file=str(path))
        with pytest.raises(Quarantined):
            restarted.calculate(atoms, ("energy",))
        assert restarted.calls == []

    def test_timeouts_are_not_retried_unless_asked(self):
        oracle = ScriptedOracle(needed=10, timeout_below=5, retries=[{"maxstep": 20}])
        with pytest.raises(CalculationTimeout) as info:
            oracle.calculate(_al(), ("energy",))
        assert oracle.calls == [{}]
        assert "timeouts are not retried" in str(info.value)
        oracle = ScriptedOracle(needed=10, timeout_below=5, retries=[{"maxstep": 20}], retry_on_timeout=True)
        assert oracle.calculate(_al(), ("energy",)).info["attempt"] == 2

    def test_bad_retry_entries_are_rejected(self):
        with pytest.raises(InvalidInput, match="cannot change \\['ecut'\\]"):
            ScriptedOracle(retries=[{"ecut": 500}])
        with pytest.raises(InvalidInput, match="non-empty mapping"):
            ScriptedOracle(retries=[{}])
        with pytest.raises(InvalidInput, match="quarantine_after"):
            ScriptedOracle(quarantine_after=-1)

    def test_structure_key_is_exact_content(self):
        a = _al()
        b = _al()
        assert structure_key(a) == structure_key(b)
        b.positions[1, 2] += 1e-12
        assert structure_key(a) != structure_key(b)
        c = _al()
        c.set_initial_magnetic_moments([1, 0, 0, 0])
        assert structure_key(a) != structure_key(c)


# ---------------------------------------------------------------------------
# subprocess helpers


class TestRunCommand:
    def test_output_goes_to_log_and_exit_code_is_returned(self, tmp_path):
        rc = run_command([sys.executable, "-c", "print('hello'); import sys; sys.exit(3)"], cwd=tmp_path,
                         log_path=tmp_path / "log")
        assert rc == 3 and (tmp_path / "log").read_text().strip() == "hello"

    def test_timeout_kills_the_whole_process_group(self, tmp_path):
        pidfile = tmp_path / "child.pid"
        script = (
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n"
        )
        start = time.monotonic()
        with pytest.raises(CalculationTimeout) as info:
            run_command([sys.executable, "-c", script], cwd=tmp_path, log_path=tmp_path / "log", timeout=1.5,
                        what="sleeper")
        assert time.monotonic() - start < 10
        assert "sleeper exceeded its wall-time limit of 1.5 s" in str(info.value)
        assert "started" in info.value.log_tail
        child = int(pidfile.read_text())
        for _ in range(50):  # the grandchild must be gone too (killed with its group)
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("grandchild process survived the timeout")

    def test_missing_program_is_a_setup_error(self, tmp_path):
        with pytest.raises(SetupError):
            run_command([str(tmp_path / "no-such-program")], cwd=tmp_path, log_path=tmp_path / "log")

    def test_scratch_directory_policies(self, tmp_path):
        with scratch_directory(tmp_path, "x-", "never") as d:
            assert d.is_dir()
        assert not d.exists()
        with pytest.raises(RuntimeError):
            with scratch_directory(tmp_path, "x-", "on_failure") as d:
                raise RuntimeError
        assert d.exists()
        with pytest.raises(InvalidInput):
            with scratch_directory(tmp_path, "x-", "sometimes"):
                pass

    def test_tails_and_thread_env(self, tmp_path):
        assert tail_text("\n".join(str(i) for i in range(100)), lines=3) == "97\n98\n99"
        assert tail_file(tmp_path / "missing") == ""
        env = thread_env(3, base={})
        assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3"


# jobs run by the persistent worker (imported in the child by module path)


def _job_echo(job):
    print("python print goes to the job log")
    os.write(1, b"raw fd 1 write (like Fortran) goes there too\n")
    return {"double": job["x"] * 2, "cwd": os.getcwd(), "array": np.arange(3.0)}


def _job_sleep(job):
    print("sleeping", flush=True)
    time.sleep(job["seconds"])
    return "woke up"


def _job_crash(job):
    print("about to crash", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _job_typed(job):
    print("iteration 1 ... iteration 2", flush=True)
    if job["kind"] == "failed":
        raise CalculationFailed("SCF did not converge")
    if job["kind"] == "setup":
        raise SetupError("the code is missing")
    if job["kind"] == "invalid":
        raise InvalidInput("bad element")
    return 1 / 0


class TestPersistentWorker:
    @pytest.fixture
    def worker(self):
        workers = []

        def make(target):
            w = PersistentWorker(f"{THIS_MODULE}:{target}", env=thread_env(1), name="testworker")
            workers.append(w)
            return w

        yield make
        for w in workers:
            w.close()

    def test_result_and_logs(self, worker, tmp_path):
        w = worker("_job_echo")
        out = w.call({"x": 21}, cwd=tmp_path, log_path=tmp_path / "job.log", timeout=60)
        assert out["double"] == 42 and os.path.samefile(out["cwd"], tmp_path)
        np.testing.assert_array_equal(out["array"], [0.0, 1.0, 2.0])
        log = (tmp_path / "job.log").read_text()
        assert "python print goes to the job log" in log and "raw fd 1 write" in log
        out = w.call({"x": 1}, cwd=tmp_path, log_path=tmp_path / "job2.log", timeout=60)
        assert out["double"] == 2 and w.starts == 1  # the same warm process

    def test_timeout_kills_and_next_call_restarts(self, worker, tmp_path):
        w = worker("_job_sleep")
        w.call({"seconds": 0.0}, cwd=tmp_path, log_path=tmp_path / "warm.log", timeout=60)  # start-up not timed
        start = time.monotonic()
        with pytest.raises(CalculationTimeout) as info:
            w.call({"seconds": 30}, cwd=tmp_path, log_path=tmp_path / "slow.log", timeout=1.0)
        assert time.monotonic() - start < 8
        assert "wall-time limit of 1 s" in str(info.value) and "sleeping" in info.value.log_tail
        assert not w.alive()
        assert w.call({"seconds": 0.0}, cwd=tmp_path, log_path=tmp_path / "again.log", timeout=60) == "woke up"
        assert w.starts == 2

    def test_crash_is_a_calculation_failure(self, worker, tmp_path):
        w = worker("_job_crash")
        with pytest.raises(CalculationFailed) as info:
            w.call({}, cwd=tmp_path, log_path=tmp_path / "crash.log", timeout=60)
        assert not isinstance(info.value, CalculationTimeout)
        assert "worker process died" in str(info.value) and "SIGKILL" in str(info.value)
        assert "about to crash" in info.value.log_tail

    def test_typed_errors_cross_the_process_boundary(self, worker, tmp_path):
        w = worker("_job_typed")
        with pytest.raises(CalculationFailed) as info:
            w.call({"kind": "failed"}, cwd=tmp_path, log_path=tmp_path / "a.log", timeout=60)
        assert str(info.value).startswith("SCF did not converge") and "iteration 2" in info.value.log_tail
        with pytest.raises(SetupError, match="the code is missing"):
            w.call({"kind": "setup"}, cwd=tmp_path, log_path=tmp_path / "b.log", timeout=60)
        with pytest.raises(InvalidInput, match="bad element"):
            w.call({"kind": "invalid"}, cwd=tmp_path, log_path=tmp_path / "c.log", timeout=60)
        with pytest.raises(CalculationFailed, match="ZeroDivisionError"):
            w.call({"kind": "bug"}, cwd=tmp_path, log_path=tmp_path / "d.log", timeout=60)
        assert "Traceback" in (tmp_path / "d.log").read_text()
        assert w.starts == 1  # errors do not cost the warm process

    def test_unloadable_target_is_a_setup_error(self, worker, tmp_path):
        w = worker("_no_such_function")
        with pytest.raises(SetupError, match="cannot load"):
            w.call({}, cwd=tmp_path, log_path=tmp_path / "x.log", timeout=60)
