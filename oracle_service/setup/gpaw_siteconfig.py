# GPAW build configuration used by oracle_service/setup/install_python_packages.sh
# (passed as GPAW_CONFIG=...; executed by GPAW's setup.py).
#
# Serial build (no MPI: the oracle runs one GPAW process per calculation and
# parallelises over labelling requests, not inside one), linked against
# Debian's libxc-dev, libopenblas-dev and libfftw3-dev.  Without `mpi = False`
# GPAW picks up the `mpic++` wrapper that Quantum ESPRESSO's openmpi
# dependency installs and fails to link, because libopenmpi-dev is absent.
mpi = False
compiler = 'g++'  # GPAW's C sources are compiled as C++17
noblas = False
nolibxc = False
libraries = ['xc', 'openblas']
fftw = True
libraries += ['fftw3']
