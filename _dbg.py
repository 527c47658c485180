import time, sys
from sampler_service.lammps_pair import LammpsPairPotential
from ase.build import bulk
pot = LammpsPairPotential.from_snippet(sys.argv[1])
print(pot, flush=True)
a = bulk('Al','fcc',a=4.05,cubic=True).repeat(2)
t=time.time()
r = pot.compute(a.positions, a.cell.array, a.numbers, a.pbc)
print(r.energy, time.time()-t, flush=True)
