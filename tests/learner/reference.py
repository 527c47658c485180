"""Slow pure-NumPy reference implementations (tests only).

* environments by brute force over explicit periodic images;
* the 2- and 3-body force/force kernels written directly from FLARE 0.2.4's formulas
  (``force_helper`` with A = c_i c_j, B = r11 c_i, C = r11 c_j, D = r11^2; the six species
  permutations of ``three_body_mc_jit``), one Cartesian component pair at a time —
  independent of the bond-derivative formulation used by ``learner_service.kernels``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def brute_neighbours(positions, cell, center, r_cut, n_img=3):
    """List of (distance, vector, atom) with 0 < d < r_cut over images -n_img..n_img."""
    out = []
    for shift in itertools.product(range(-n_img, n_img + 1), repeat=3):
        off = np.asarray(shift) @ cell
        for j, x in enumerate(positions):
            v = x + off - positions[center]
            d = float(np.linalg.norm(v))
            if 0 < d < r_cut:
                out.append((d, v, j))
    out.sort(key=lambda t: t[0])
    return out


def brute_environment(positions, numbers, cell, center, r2, r3, n_img=3):
    """dict(center=Z, bonds=[(r, u, Z)], triplets=[(r1, r2, r12, u1, u2, Z1, Z2)])"""
    neigh = brute_neighbours(positions, cell, center, max(r2, r3), n_img)
    bonds = [(d, v / d, int(numbers[j])) for d, v, j in neigh if d < r2]
    three = [(d, v, int(numbers[j])) for d, v, j in neigh if d < r3]
    trips = []
    for a in range(len(three)):
        for b in range(a + 1, len(three)):
            d1, v1, z1 = three[a]
            d2, v2, z2 = three[b]
            d12 = float(np.linalg.norm(v2 - v1))
            if d12 < r3:
                trips.append((d1, d2, d12, v1 / d1, v2 / d2, z1, z2))
    return {"center": int(numbers[center]), "bonds": bonds, "triplets": trips}


def _force_helper(A, B, C, D, fi, fj, fdi, fdj, ls, sig):
    ls1 = 1 / (2 * ls * ls)
    ls2 = 1 / (ls * ls)
    ls3 = ls2 * ls2
    E = math.exp(-D * ls1)
    return sig * sig * (fdi * fdj + B * ls2 * fi * fdj - C * ls2 * fdi * fj + (A * ls2 - B * C * ls3) * fi * fj) * E


def twobody_ff(env1, env2, sig, ls, rc):
    """3x3 2-body force/force kernel (FLARE two_body_mc_jit, all d1, d2)."""
    K = np.zeros((3, 3))
    c1, c2 = env1["center"], env2["center"]
    for r1, u1, e1 in env1["bonds"]:
        for r2, u2, e2 in env2["bonds"]:
            if not ((c1 == c2 and e1 == e2) or (c1 == e2 and c2 == e1)):
                continue
            fi, fj = (rc - r1) ** 2, (rc - r2) ** 2
            r11 = r1 - r2
            for d1 in range(3):
                for d2 in range(3):
                    ci, cj = u1[d1], u2[d2]
                    fdi, fdj = 2 * (rc - r1) * ci, 2 * (rc - r2) * cj
                    K[d1, d2] += _force_helper(ci * cj, r11 * ci, r11 * cj, r11 * r11, fi, fj, fdi, fdj, ls, sig)
    return K


# bonds of a triplet as atom pairs: 0 = (centre, j), 1 = (centre, k), 2 = (j, k)
_BONDS = [(0, 1), (0, 2), (1, 2)]


def threebody_ff(env1, env2, sig, ls, rc):
    """3x3 3-body force/force kernel: sum over triplet pairs and species-matching atom
    permutations of d^2/dx_c1 dx_c2 [sig^2 exp(-|d1 - P d2|^2/2ls^2) fcut1 fcut2]."""
    K = np.zeros((3, 3))
    for t1 in env1["triplets"]:
        a = np.array(t1[:3])
        us1 = [t1[3], t1[4]]
        sp1 = (env1["center"], t1[5], t1[6])
        f1 = [(rc - x) ** 2 for x in a]
        for t2 in env2["triplets"]:
            b = np.array(t2[:3])
            us2 = [t2[3], t2[4]]
            sp2 = (env2["center"], t2[5], t2[6])
            f2 = [(rc - x) ** 2 for x in b]
            for sigma in itertools.permutations(range(3)):
                if any(sp1[i] != sp2[sigma[i]] for i in range(3)):
                    continue
                # bond k of triplet 1 maps onto bond pi[k] of triplet 2
                pi = [_BONDS.index(tuple(sorted((sigma[p], sigma[q])))) for p, q in _BONDS]
                delta = a - b[pi]
                D = float(delta @ delta)
                for d1 in range(3):
                    for d2 in range(3):
                        ci = [us1[0][d1], us1[1][d1], 0.0]
                        cj = [us2[0][d2], us2[1][d2], 0.0]
                        A = sum(ci[k] * cj[pi[k]] for k in range(3))
                        B = sum(delta[k] * ci[k] for k in range(3))
                        C = sum(delta[k] * cj[pi[k]] for k in range(3))
                        fi = f1[0] * f1[1] * f1[2]
                        fj = f2[0] * f2[1] * f2[2]
                        fdi = 2 * (rc - a[0]) * ci[0] * f1[1] * f1[2] + f1[0] * 2 * (rc - a[1]) * ci[1] * f1[2]
                        fdj = 2 * (rc - b[0]) * cj[0] * f2[1] * f2[2] + f2[0] * 2 * (rc - b[1]) * cj[1] * f2[2]
                        K[d1, d2] += _force_helper(A, B, C, D, fi, fj, fdi, fdj, ls, sig)
    return K
