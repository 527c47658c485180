"""Check the FLARE 0.2.4 kernel conventions we rely on (run under the FLARE venv's python).

An independent brute-force implementation of the conventions (own image neighbour list,
unordered 2-body species match, 6 species-respecting 3-body bijections, fc = (rc - r)^2) is
compared with FLARE's mc_simple kernels on a random Al/Cu cluster:
  * energy/energy   == k~2/4 + k~3/9                         (to round-off)
  * force/force     == d2 k~ / dx_centre1 dx_centre2           (central differences)
  * force/energy    == -(d k~2/dx)/2 - (d k~3/dx)/3            (central differences)
Slow-ish (pure Python, ~1 min).  Usage: $EPICYCLE_FLARE_PYTHON verify_conventions.py
"""
import itertools, numpy as np
from flare.struc import Structure
from flare.env import AtomicEnvironment
from flare.kernels import mc_simple as mc
from flare.kernels.cutoffs import quadratic_cutoff

rng = np.random.default_rng(0)
r2c, r3c = 6.0, 4.0
hyps = np.array([0.7, 1.3, 0.4, 0.9, 0.05])
cutoffs = np.array([r2c, r3c])

def fc(r, rc): return (rc - r) ** 2

def clusters(pos, cell, spec, i):
    # my own neighbour list: all images within r2 (orthorhombic cell, generous sweep)
    nb = []
    for j in range(len(pos)):
        for s in itertools.product(range(-3, 4), repeat=3):
            v = pos[j] + np.array(s) @ cell - pos[i]
            r = np.linalg.norm(v)
            if 0 < r < r2c:
                nb.append((v, spec[j]))
    pairs = [(np.linalg.norm(v), s) for v, s in nb]
    n3 = [(v, s) for v, s in nb if np.linalg.norm(v) < r3c]
    trips = []
    for (a, (va, sa)), (b, (vb, sb)) in itertools.combinations(enumerate(n3), 2):
        ra, rb, rab = np.linalg.norm(va), np.linalg.norm(vb), np.linalg.norm(vb - va)
        if rab < r3c:
            trips.append(((ra, rb, rab), (spec[i], sa, sb)))
    return spec[i], pairs, trips

# edge index: 0=(c,m) 1=(c,n) 2=(m,n); atoms 0=c,1=m,2=n
EDGES = [(0, 1), (0, 2), (1, 2)]
def k_tilde(A, B):
    cA, pA, tA = A; cB, pB, tB = B
    k2 = 0.0
    for r, s in pA:
        for rp, sp in pB:
            if (cA == cB and s == sp) or (cA == sp and cB == s):
                k2 += fc(r, r2c) * fc(rp, r2c) * np.exp(-(r - rp) ** 2 / (2 * hyps[1] ** 2))
    k3 = 0.0
    for d, sp in tA:
        F = np.prod([fc(x, r3c) for x in d])
        for e, sq in tB:
            G = np.prod([fc(x, r3c) for x in e])
            for perm in itertools.permutations(range(3)):
                if any(sp[k] != sq[perm[k]] for k in range(3)):
                    continue
                D = 0.0
                for ei, (a, b) in enumerate(EDGES):
                    img = tuple(sorted((perm[a], perm[b])))
                    D += (d[ei] - e[EDGES.index(img)]) ** 2
                k3 += F * G * np.exp(-D / (2 * hyps[3] ** 2))
    return hyps[0] ** 2 * k2, hyps[2] ** 2 * k3

# random two-species cluster in a big box (so only the centre moves under finite differences)
L = 30.0
cell = np.eye(3) * L
n = 9
pos = 10 + rng.uniform(0, 4.5, size=(n, 3))
spec = np.array([13, 29] * 5)[:n]
def env(p, i): return AtomicEnvironment(Structure(cell, spec, p), i, cutoffs)
def mine(p, i): return clusters(p, cell, spec, i)

worst = 0
for (i, j) in [(0, 1), (2, 2), (3, 0), (4, 7)]:
    A, B = env(pos, i), env(pos, j)
    k2, k3 = k_tilde(mine(pos, i), mine(pos, j))
    fl_ee = mc.two_plus_three_mc_en(A, B, hyps, cutoffs)
    rel = abs(fl_ee - (k2 / 4 + k3 / 9)) / abs(fl_ee)
    print("EE", i, j, fl_ee, k2 / 4 + k3 / 9, rel); worst = max(worst, rel)
    # force-force: mixed second derivative of k_tilde wrt centres (central differences)
    h = 1e-4
    for a in range(3):
        for b in range(3):
            val = 0
            for sa, sb in itertools.product([1, -1], repeat=2):
                pa = pos.copy(); pa[i, a] += sa * h
                pb = pos.copy(); pb[j, b] += sb * h
                val += sa * sb * sum(k_tilde(mine(pa, i), mine(pb, j)))
            fd = val / (4 * h * h)
            fl = mc.two_plus_three_body_mc(A, B, a + 1, b + 1, hyps, cutoffs)
            rel = abs(fl - fd) / max(abs(fl), 1e-12)
            worst = max(worst, rel) if abs(fl) > 1e-8 else worst
            if a == b: print("FF", i, j, a, b, fl, fd, rel)
            # force-energy: -dk2/dx/2 - dk3/dx/3 (force on A)
        p1 = pos.copy(); p1[i, a] += h; p0 = pos.copy(); p0[i, a] -= h
        k2p, k3p = k_tilde(mine(p1, i), mine(pos, j)); k2m, k3m = k_tilde(mine(p0, i), mine(pos, j))
        fd = -((k2p - k2m) / 2 + (k3p - k3m) / 3) / (2 * h)
        fl = mc.two_plus_three_mc_force_en(A, B, a + 1, hyps, cutoffs)
        print("FE", i, j, a, fl, fd, abs(fl - fd) / abs(fl)); worst = max(worst, abs(fl - fd) / abs(fl))
print("worst rel (EE/FF/FE)", worst)
# finite differences (h = 1e-4 Å) are good to ~1e-6 here; the energy kernel must be exact
assert worst < 1e-5, "FLARE kernels do not follow the documented conventions"
print("OK: FLARE 0.2.4 mc_simple kernels follow the documented conventions")
