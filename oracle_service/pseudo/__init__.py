"""Norm-conserving PBE pseudopotentials for the Quantum ESPRESSO oracle, made by ``ld1.x``.

No pseudopotential library ships with Debian's ``quantum-espresso`` package,
so Epicycle generates its own with QE's atomic code ``ld1.x`` (same package
as ``pw.x``) from the inputs in ``inputs/<El>.ld1.in``: scalar-relativistic
Troullier–Martins pseudopotentials, PBE, one projector per channel.  Each
element takes well under a second.

Every generated file is *verified* before it is used (see
:func:`generate`): the pseudo-atom must reproduce the all-electron
eigenvalues of the reference configuration, the excitation energies of the
test configurations listed in the input header must agree with the
all-electron ones (transferability), and the spherical-Bessel-basis test
must show no ghost state below the true valence states.  The result and
the cutoff at which the pseudo-atom eigenvalues converge are written to
``manifest.json`` next to the UPF files.

Command line::

    python -m oracle_service.pseudo generate [--out DIR] [--elements Al Si ...]
    python -m oracle_service.pseudo list

Generated files go to :data:`DEFAULT_DIR` (``oracle_service/pseudo/generated``,
git-ignored) unless ``--out`` says otherwise.
"""

from __future__ import annotations

from .generate import (  # noqa: F401
    DEFAULT_DIR,
    INPUT_DIR,
    GeneratedPseudo,
    Ld1Input,
    available_elements,
    ensure_pseudopotentials,
    generate,
    read_input,
    read_manifest,
    upf_filename,
)
