"""The cycle's decisions, replayed without servers: OnTheFlyRun on in-process ports (coordinator.inprocess).

A recorded EMT aluminium trajectory (32 atoms, Langevin at 1000 K) is replayed step by step; the
in-process learner is the learner service's own model store, the oracle is EMT.  The trajectory
is fixed, so these tests check *when* the cycle calls the oracle and what it trains on — not MD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

from coordinator.config import ConfigError, parse_config
from coordinator.cycle import OnTheFlyRun, Progress, RunStopped
from coordinator.inprocess import InProcessLearner, InProcessOracle, ReplaySampler, replay_ports
from coordinator.ports import LearnerPort, OraclePort, SamplerPort
from coordinator.rundir import RunDirectory
from protos.epicycle.v1 import sampler_pb2
from protos.errors import CalculationFailed, InvalidInput

STEPS = 200


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> Path:
    """201 frames of 32-atom fcc Al under EMT, Langevin 1000 K, Δt = 5 fs, as extended XYZ."""
    import ase.io

    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(7)
    atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
    MaxwellBoltzmannDistribution(atoms, temperature_K=1000, rng=rng)
    Stationary(atoms)
    atoms.calc = EMT()
    dyn = Langevin(atoms, 5 * units.fs, temperature_K=1000, friction=0.02, rng=np.random.default_rng(8))
    frames = []

    def record():
        a = atoms.copy()
        a.calc = None
        a.info = {"time_fs": len(frames) * 5.0}
        frames.append(a)

    record()
    for _ in range(STEPS):
        dyn.run(1)
        record()
    path = tmp_path_factory.mktemp("traj") / "al_1000K.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def config_for(trajectory: Path, checkpoint_interval: int = 50, **policy) -> dict:
    return {
        "name": "replay", "seed": 5,
        "structure": {"file": str(trajectory), "index": 0},
        "learner": {"cutoffs": [5.0, 3.5],
                    "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                    "optimize": {"every": 0}},
        "sampler": {"timestep_fs": 5.0, "steps": STEPS, "frame_interval": 1,
                    "checkpoint_interval": checkpoint_interval},
        "policy": {"absolute_threshold": 0.12, "initial_atoms": 4, "atoms_per_call": 1, **policy},
    }


def replay(tmp_path: Path, data: dict, trajectory: Path, name: str = "run", resume: bool = False, oracle=None):
    config = parse_config(data)
    path = tmp_path / name
    rd = RunDirectory.open(path) if resume else RunDirectory.create(path, yaml.safe_dump(config.to_dict()))
    ports = replay_ports(config, rd, trajectory, oracle=oracle)
    try:
        state = OnTheFlyRun(config, rd, progress=Progress(STEPS, 5.0, quiet=True), ports=ports).run()
        _, problems = rd.check(state)
        assert not problems, problems
        assert rd.audit(state) == state.oracle_calls
    finally:
        rd.close()
    return state, rd, ports


def events(rd: RunDirectory, kind: str) -> list[dict]:
    return [e for e in rd.events() if e["event"] == kind]


def test_the_grpc_clients_and_the_in_process_ports_satisfy_the_protocols(trajectory: Path, tmp_path: Path) -> None:
    from coordinator.services import OraclePool
    from learner_service.client import LearnerClient
    from sampler_service.client import SamplerClient

    learner = InProcessLearner([13], (5.0, 3.5), model_dir=tmp_path / "m")
    assert isinstance(learner, LearnerPort) and isinstance(ReplaySampler(trajectory, learner), SamplerPort)
    assert isinstance(InProcessOracle(), OraclePort)
    wanted = {LearnerClient: ("wait_ready", "info", "predict", "add_data_batch", "optimize", "checkpoint",
                              "restore_checkpoint", "close"),
              SamplerClient: ("wait_ready", "open_run", "close"), OraclePool: ("wait_ready", "label")}
    for cls, names in wanted.items():
        assert all(callable(getattr(cls, m, None)) for m in names), cls.__name__


def test_a_replayed_run_calls_the_oracle_exactly_where_the_model_of_the_time_was_uncertain(
        trajectory: Path, tmp_path: Path) -> None:
    state, rd, ports = replay(tmp_path, config_for(trajectory), trajectory)
    assert state.finished and state.stop_reason == "every walker has done its steps"
    calls = events(rd, "oracle_call")
    assert 3 <= len(calls) == state.oracle_calls == ports.oracle.calls
    learner: InProcessLearner = ports.learner
    frames = ports.samplers[0].frames
    threshold = 0.12
    steps = [c["step"] for c in calls]
    assert steps[0] == 0 and steps == sorted(steps) and len(set(steps)) == len(steps)
    for k in range(1, len(calls)):
        label = rd.read_label(k)
        model = learner.history[label.model_version]
        # the stopped frame: the model of the time found some σ above the threshold, as recorded
        sigma = model.predict(frames[label.step]).atom_std  # the per-atom σ the sampler's rule compares
        assert sigma.max() > threshold
        assert sigma.max() == pytest.approx(calls[k]["max_sigma"], rel=1e-9)
        assert np.allclose(label.positions, frames[label.step].positions)
        # every step since the previous call ran on that same model and was below the threshold
        for s in range(steps[k - 1] + 1, label.step):
            assert model.predict(frames[s]).atom_std.max() <= threshold, (k, s)
        # max_sigma acquisition: the trained atom is the most uncertain one
        assert label.selection == [int(np.argmax(sigma))]
    # after the last call, no step was uncertain under the final model
    final = learner.history[max(learner.history)]
    assert all(final.predict(frames[s]).atom_std.max() <= threshold for s in range(steps[-1] + 1, STEPS))
    thr = events(rd, "threshold")
    assert thr and thr[0]["rule"] == "absolute" and thr[0]["value"] == threshold


def test_two_replays_with_the_same_seed_make_the_same_decisions(trajectory: Path, tmp_path: Path) -> None:
    def decisions(name):
        _, rd, _ = replay(tmp_path, config_for(trajectory, atoms_per_call=2), trajectory, name)
        return [(e["event"], e.get("step"), e.get("selection"), e.get("atoms"))
                for e in rd.events() if e["event"] in ("oracle_call", "frame_queued", "training_update")]

    a, b = decisions("a"), decisions("b")
    assert a == b and len(a) > 3


class BrokenOracle(InProcessOracle):
    """EMT that cannot label from its ``fail_at``-th call on (a crashed DFT code)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def label(self, atoms, properties=()):
        if self.calls + 1 >= self.fail_at:
            raise CalculationFailed("SCF did not converge (test)")
        return super().label(atoms, properties)


@pytest.mark.parametrize("min_steps", [0, 15])
def test_a_replay_stopped_by_the_oracle_resumes_to_the_same_run(trajectory: Path, tmp_path: Path,
                                                                 min_steps: int) -> None:
    data = config_for(trajectory, checkpoint_interval=10, min_steps_between_calls=min_steps)
    full, rd_full, _ = replay(tmp_path, data, trajectory, "full")
    with pytest.raises(RunStopped, match="could not label frame"):
        replay(tmp_path, data, trajectory, "part", oracle=BrokenOracle(fail_at=4))
    rd = RunDirectory.open(tmp_path / "part")
    st = rd.load_state()
    assert not st.finished and st.oracle_calls == 3 and rd.queued_seqs()
    if min_steps:  # the window after the last call is in state.json
        assert st.walker("w0").ungated_until == rd.read_label(2).step + min_steps
    rd.close()
    # a new learner object on the run's model directory, a working oracle: the run goes on from the queue
    resumed, rd2, _ = replay(tmp_path, data, trajectory, "part", resume=True)
    assert resumed.finished and resumed.oracle_calls == full.oracle_calls
    assert [e["step"] for e in events(rd2, "oracle_call")] == [e["step"] for e in events(rd_full, "oracle_call")]
    assert len(events(rd2, "resumed")) == 1


def test_min_steps_between_calls_leaves_n_steps_ungated_after_each_call(trajectory: Path, tmp_path: Path) -> None:
    n = 15
    base, rd0, _ = replay(tmp_path, config_for(trajectory), trajectory, "base")
    # MD checkpoints every 10 steps: the 15-step window spans chunks (it is state, not a chunk property)
    state, rd, ports = replay(tmp_path, config_for(trajectory, checkpoint_interval=10, min_steps_between_calls=n),
                              trajectory, "gap")
    steps = [e["step"] for e in events(rd, "oracle_call")]
    assert all(b - a > n for a, b in zip(steps, steps[1:])), steps
    # the gap is real: without it two calls were closer than n steps
    base_steps = [e["step"] for e in events(rd0, "oracle_call")]
    assert any(b - a <= n for a, b in zip(base_steps, base_steps[1:])), base_steps
    assert state.oracle_calls < base.oracle_calls
    # each call is the first uncertain step after the ungated window, under the model of the time
    learner, frames = ports.learner, ports.samplers[0].frames
    for k in range(1, len(steps)):
        model = learner.history[rd.read_label(k).model_version]
        first = next(s for s in range(steps[k - 1] + n + 1, STEPS)
                     if model.predict(frames[s]).atom_std.max() > 0.12)
        assert steps[k] == first
    ws = state.walker("w0")
    assert ws.ungated_until == steps[-1] + n


def test_the_threshold_is_the_smaller_of_relative_and_absolute(trajectory: Path, tmp_path: Path) -> None:
    # σn = 0.05 eV/Å (not optimised): 2·σn = 0.10 < 0.12 → the relative rule decides
    state, rd, _ = replay(tmp_path, config_for(trajectory, sigma_factor=2.0), trajectory, "min")
    thr = events(rd, "threshold")
    assert [(e["rule"], round(e["value"], 12)) for e in thr] == [("relative", 0.1)]
    assert all(e["threshold"] == pytest.approx(0.1) for e in events(rd, "frame_queued"))
    # 3·σn = 0.15 > 0.12 → the absolute one does
    _, rd2, _ = replay(tmp_path, config_for(trajectory, sigma_factor=3.0), trajectory, "abs")
    assert [e["rule"] for e in events(rd2, "threshold")] == ["absolute"]
    assert all(e["threshold"] == pytest.approx(0.12) for e in events(rd2, "frame_queued"))
    from coordinator.report import summarize

    assert summarize(rd.path)["threshold_rule"] == "relative"


def test_threshold_rules_in_the_config() -> None:
    def thr(policy, noise=0.05):
        return parse_config({"policy": policy}).policy.threshold(noise)

    assert thr({}) == pytest.approx((0.05, "relative"))                   # default 1·σn
    assert thr({"sigma_factor": 2.0}) == pytest.approx((0.1, "relative"))
    assert thr({"absolute_threshold": 0.3}) == (0.3, "absolute")          # absolute alone
    assert thr({"sigma_factor": None, "absolute_threshold": 0.3}) == (0.3, "absolute")
    assert thr({"sigma_factor": 2.0, "absolute_threshold": 0.3}) == pytest.approx((0.1, "relative"))
    assert thr({"sigma_factor": 2.0, "absolute_threshold": 0.3}, noise=0.2) == (0.3, "absolute")
    with pytest.raises(ConfigError, match="policy.sigma_factor: must be > 0"):
        parse_config({"policy": {"sigma_factor": 0}})
    with pytest.raises(ConfigError, match="policy.min_steps_between_calls: must be >= 0"):
        parse_config({"policy": {"min_steps_between_calls": -1}})
    with pytest.raises(ConfigError, match="policy.min_steps_between_calls: expected an integer"):
        parse_config({"policy": {"min_steps_between_calls": 2.5}})


def test_the_replay_sampler_refuses_what_it_cannot_replay(trajectory: Path, tmp_path: Path) -> None:
    learner = InProcessLearner([13], (5.0, 3.5), model_dir=tmp_path / "m")
    sampler = ReplaySampler(trajectory, learner)
    req = sampler_pb2.RunRequest(checkpoint=b"not a replay position")
    with pytest.raises(InvalidInput, match="not a replay position"):
        sampler.open_run(req)
    from coordinator.inprocess import _Position

    req = sampler_pb2.RunRequest(checkpoint=_Position(STEPS, b"").encode())
    req.control.max_steps = 5
    with pytest.raises(InvalidInput, match=r"step 201 was asked for, but the recording has 201 frames"):
        list(sampler.open_run(req))


def test_two_walkers_replay_their_own_recordings_through_one_queue(trajectory: Path, tmp_path: Path) -> None:
    """Two walkers (two recordings of the same system) park, queue and resume through the one learner."""
    import ase.io

    frames = ase.io.read(trajectory, index=":")
    shifted = frames[:1] + frames[100:] + frames[1:100]  # the same system, other configurations in another order
    data = config_for(trajectory)
    data["walkers"] = [{"name": "a"}, {"name": "b"}]
    data["policy"]["dedupe"] = False  # every uncertain frame of both walkers is labelled
    state, rd, ports = replay(tmp_path, data, [frames, shifted], "two")
    assert state.finished and all(w["step"] == STEPS for w in state.walkers.values())
    recordings = {"a": ports.samplers[0].frames, "b": ports.samplers[1].frames}
    for k in range(1, state.oracle_calls):
        label = rd.read_label(k)
        assert np.allclose(label.positions, recordings[label.walker][label.step].positions)
    assert {rd.read_label(k).walker for k in range(1, state.oracle_calls)} == {"a", "b"}
    # a finished run's trajectory can be replayed in turn: every streamed step of walker a, in order
    from coordinator.inprocess import read_trajectory

    with pytest.raises(InvalidInput, match="has 2 walker trajectories; name one"):
        read_trajectory(rd.path)
    recorded = read_trajectory(rd.path / "walkers" / "a")
    assert [f.info["step"] for f in recorded] == list(range(STEPS))
    assert np.allclose(recorded[57].positions, frames[57].positions)


def test_the_replay_sampler_streams_stops_and_resumes_like_an_engine(trajectory: Path, tmp_path: Path) -> None:
    from protos import wire

    from coordinator.inprocess import read_trajectory

    frames = read_trajectory(trajectory)
    learner = InProcessLearner([13], (5.0, 3.5), {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                               model_dir=tmp_path / "m")
    first = InProcessOracle().label(frames[0], ("energy", "forces"))
    learner.add_data_batch([{"atoms": frames[0], "forces": first.labels.forces, "atom_indices": [0, 1, 2, 3]}])
    sampler = ReplaySampler(trajectory, learner)

    def run(req, threshold, max_steps, interval):
        req.control.sigma_threshold, req.control.max_steps, req.control.frame_interval = threshold, max_steps, interval
        replies = list(sampler.open_run(req))
        assert all(r.HasField("frame") for r in replies[:-1]) and replies[-1].HasField("stop")
        return [r.frame for r in replies[:-1]], replies[-1].stop

    req = sampler_pb2.RunRequest()
    wire.structure_to_proto(frames[0], out=req.new_run.structure)
    req.new_run.settings.timestep_fs = 5.0
    streamed, stop = run(req, 0.0, 10, 3)                       # ungated: 10 steps, a frame every 3
    assert [f.step for f in streamed] == [0, 3, 6, 9] and stop.reason == sampler_pb2.STOP_REASON_MAX_STEPS
    assert (stop.step, stop.steps_taken, stop.time_fs) == (10, 10, 50.0)
    assert streamed[1].temperature_k == pytest.approx(frames[3].get_temperature() * 96 / 93, rel=1e-6)  # 3N − 3
    # gated from step 10: stops at the first frame whose σ under the model exceeds 0.12 eV/Å, nothing integrated
    streamed, stop = run(sampler_pb2.RunRequest(checkpoint=stop.checkpoint), 0.12, 100, 1)
    sigma = [learner.predict(frames[s]).atom_std.max() for s in range(10, 110)]
    k = 10 + next(i for i, x in enumerate(sigma) if x > 0.12)
    assert stop.reason == sampler_pb2.STOP_REASON_UNCERTAIN and stop.step == stop.frame.step == k
    assert [f.step for f in streamed] == list(range(10, k))
    assert stop.max_sigma == pytest.approx(sigma[k - 10]) and all(u.sigma > 0.12 for u in stop.uncertain)
    # resumed with the oracle's forces for step k: that step is integrated ungated, then gating resumes
    req = sampler_pb2.RunRequest(checkpoint=stop.checkpoint)
    label = InProcessOracle().label(frames[k], ("energy", "forces"))
    wire.labels_to_proto(label.labels.energy, label.labels.forces, None, out=req.override_forces)
    streamed, stop = run(req, 0.12, 1, 1)
    assert [f.step for f in streamed] == [k] and streamed[0].forces_from_override
    assert stop.reason == sampler_pb2.STOP_REASON_MAX_STEPS and stop.step == k + 1


def test_calibration_at_every_call_and_the_scaled_threshold(tmp_path, trajectory) -> None:
    """Every oracle call adds its frame's residuals against the old model's σ (a `calibration` event whose
    numbers are recomputed here from the label files); with calibration.scale the threshold the sampler gets
    is the configured one divided by the fitted s, from the next call on."""
    from coordinator.calibration import epistemic_scale

    data = dict(config_for(trajectory), calibration={"scale": True})
    replay(tmp_path, data, trajectory)
    rd = RunDirectory.open(tmp_path / "run")
    events = list(rd.events())
    cal = [e for e in events if e["event"] == "calibration"]
    calls = rd.load_state().oracle_calls
    assert calls >= 3 and len(cal) == calls - 1  # every call but the first frame's
    labels = [rd.read_label(i) for i in range(1, calls)]
    r = np.concatenate([(lab.predicted_forces - lab.forces).ravel() for lab in labels])
    e = np.concatenate([lab.force_std.ravel() for lab in labels])
    nu = np.concatenate([np.full(lab.forces.size, lab.noise) for lab in labels])
    assert cal[-1]["scale"] == pytest.approx(epistemic_scale(r, e, nu), rel=1e-9)
    assert cal[-1]["raw"]["n"] == r.size
    z2 = np.mean(r ** 2 / (e ** 2 + nu ** 2))
    assert cal[-1]["raw"]["mean_squared_z"] == pytest.approx(z2, rel=1e-9)
    # the threshold in force for frames after the last calibration: 0.12 / s
    last = max(i for i, ev in enumerate(events) if ev["event"] == "calibration")
    later = [ev for ev in events[last:] if ev["event"] == "frame"]
    if later:
        assert later[-1]["threshold"] == pytest.approx(0.12 / cal[-1]["scale"], rel=1e-12)


@pytest.mark.parametrize("rule", ["fps", "info_gain", "hybrid"])
def test_every_acquisition_rule_runs_on_the_in_process_ports(tmp_path, trajectory, rule) -> None:
    """The kernel-distance and conditional-σ questions of the rules are answered in-process too; the
    training atoms recorded are the ones each call's rule picked."""
    data = config_for(trajectory, acquisition=rule, atoms_per_call=2)
    data["sampler"] = dict(data["sampler"], steps=80)
    state, rd, _ = replay(tmp_path, data, trajectory)
    queued = {e["seq"]: e["selection"] for e in events(rd, "frame_queued")}
    labelled = [e for e in events(rd, "oracle_call") if e.get("seq") is not None and e["seq"] >= 0]
    assert labelled and state.oracle_calls >= 2
    for e in labelled:
        assert len(e["selection"]) == 2 and e["selection"] == queued[e["seq"]]
