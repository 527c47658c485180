"""The MD engine contract over real gRPC: both engines, driven through a Sampler server.

Each class starts one in-process Sampler server on 127.0.0.1:0 whose provider
factory hands out the providers the contract builds (real EMT, EMT + σ
function, the flaky one), keyed by the ``learner_address`` each
:class:`RemoteEngine` sends.  Everything the tests see — settings errors,
frames, stop reports, checkpoints, supplied forces — crosses the wire.

Three tests are overridden, each for a reason of the API, not of tolerance:

* ``request_stop`` over gRPC cancels the call, and a cancelled call returns
  no checkpoint: the engine stays where the call started (locally it stops
  before the next step and keeps those steps);
* likewise a failing learner/provider or a raising ``on_frame`` leaves the
  engine at the start of the failed call (locally: at the failing step);
* velocities cannot be set on a remote engine between calls, so the
  image-flag test gives them in the structure of the new run.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from ase import units

from protos.errors import CalculationFailed
from protos.server import ServerConfig
from sampler_service.client import SamplerClient
from sampler_service.remote import RemoteEngine, RemoteForces, md_settings
from sampler_service.server import SamplerServiceConfig, start_sampler_server

from .contract import EngineContract, FlakyProvider, cu32, emt_provider


class Serialized:
    """A provider used by one call at a time.  A cancelled call's engine may still be finishing its
    step on the server when the next call starts; in a deployment each call opens its own learner
    stream, here the calls share one provider object (and one EMT calculator, which is not
    thread-safe)."""

    def __init__(self, provider) -> None:
        self.provider = provider
        self._lock = threading.Lock()

    def compute(self, *args):
        with self._lock:
            return self.provider.compute(*args)


class Providers:
    """provider_factory for the test server: ``learner_address`` -> the provider registered under it."""

    def __init__(self) -> None:
        self._by_key: dict[str, object] = {}
        self._ids = itertools.count()

    def add(self, provider) -> str:
        key = f"test-provider:{next(self._ids)}"
        self._by_key[key] = Serialized(provider)
        return key

    def __call__(self, address: str, want_stress: bool):
        return self._by_key[address]


class GrpcEngineContract(EngineContract):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _sampler_server(cls):
        cls.providers = Providers()
        running = start_sampler_server(SamplerServiceConfig(server=ServerConfig(max_workers=4)),
                                       provider_factory=cls.providers)
        cls.client = SamplerClient(running.address, timeout=120.0)
        cls.client.wait_ready(10)
        yield
        cls.client.close()
        running.stop(0)

    def make(self, atoms=None, provider=None, **kw) -> RemoteEngine:
        atoms = cu32() if atoms is None else atoms
        kw.setdefault("timestep_fs", 2.0)
        kw.setdefault("seed", 11)
        # MDSettings straight from the keywords: the *server* validates them
        settings = md_settings(engine=self.engine, **kw)
        key = self.providers.add(provider if provider is not None else emt_provider())
        return RemoteEngine(settings, RemoteForces(self.client, key), atoms)

    def from_checkpoint(self, blob, provider) -> RemoteEngine:
        return RemoteEngine.from_checkpoint(blob, RemoteForces(self.client, self.providers.add(provider)))

    # -- overridden (see the module docstring) ---------------------------------------
    def test_request_stop_cancels_before_the_next_step_and_resumes_exactly(self):
        kw = dict(ensemble="nve", initial_temperature_K=400.0)
        ref = self.make(**kw)
        ref.run(30)
        eng = self.make(**kw)
        seen = []

        def stop_at_7(frame):
            seen.append(frame.step)
            if frame.step == 7:
                eng.request_stop()

        report = eng.run(30, on_frame=stop_at_7)
        assert report.reason == "cancelled" and report.steps_taken == 0 and eng.step == 0
        assert seen == list(range(8))  # nothing after the stop reached the callback
        eng.run(30)
        np.testing.assert_array_equal(eng.positions(), ref.positions())
        eng.request_stop()  # with no run active: the next run returns at once
        assert eng.run(5).reason == "cancelled" and eng.step == 30
        assert eng.run(1).reason == "max_steps"

    def test_a_failing_provider_or_callback_leaves_a_resumable_state(self):
        kw = dict(ensemble="nve", initial_temperature_K=400.0)
        ref = self.make(**kw)
        ref.run(30)
        eng = self.make(provider=FlakyProvider(), **kw)
        with pytest.raises(CalculationFailed, match="went away"):  # ABORTED, the message kept
            eng.run(30)
        assert eng.step == 0  # the failed call returned no checkpoint: back where it started
        eng.run(30 - eng.step)
        np.testing.assert_allclose(eng.positions(), ref.positions(), atol=1e-12)

        def bad_callback(frame):
            if frame.step == 40:
                raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            eng.run(20, on_frame=bad_callback)
        assert eng.step == 30
        ref.run(20)
        eng.run(ref.step - eng.step)
        np.testing.assert_allclose(eng.positions(), ref.positions(), atol=1e-12)

    def test_atoms_snapshot_and_image_flags(self):
        atoms = cu32()
        atoms.set_velocities(np.tile([0.05, 0.0, 0.0], (32, 1)) / units.fs)  # given with the structure
        eng = self.make(atoms=atoms, ensemble="nve")
        np.testing.assert_allclose(eng.velocities(), np.tile([0.05, 0.0, 0.0], (32, 1)), rtol=1e-12)
        x0 = eng.positions()
        eng.run(100)  # 10 Å along x in a 7.22 Å cell
        unwrapped = eng.positions() + eng.images @ eng.cell()
        np.testing.assert_allclose((unwrapped - x0)[:, 0], 10.0, atol=1e-6)
        a = eng.atoms()
        assert len(a) == 32 and list(a.numbers) == [29] * 32
        np.testing.assert_allclose(a.get_velocities() * units.fs, eng.velocities())
        np.testing.assert_allclose(a.get_masses(), eng.masses)


class TestBuiltinEngineOverGrpc(GrpcEngineContract):
    engine = "builtin"
    ensembles = ("nve", "nvt_langevin", "nvt_berendsen", "nvt_csvr", "npt_berendsen", "npt_langevin")


class TestLammpsEngineOverGrpc(GrpcEngineContract):
    engine = "lammps"
    ensembles = ("nve", "nvt_langevin")
