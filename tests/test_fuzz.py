"""Fuzz every method of every service with malformed requests (issue 12): no INTERNAL, no
UNKNOWN, no hang.

Real oracle (EMT), learner (a small Al/Cu GP with a model directory) and sampler (builtin
engine, streaming from that learner) servers on 127.0.0.1.  Per service a few hundred
requests from a fixed seed, sent as raw bytes (so nothing client-side can refuse them):

* random bytes (most do not parse; the rest parse into nonsense);
* a valid request with one to three mutations: any field of any nested message set to a bad
  value of its type (NaN, ±inf, 1e308, -1, 2^63-1, empty, long or odd strings, unknown enum
  values, many repeated elements), an ``Array`` with another dtype, a wrong or absurd shape,
  truncated, extended or random data; and structure-level mutations (atomic numbers
  0/200/-5/29.5, singular, tiny and 1e300 cells, atoms on one site, bool positions, a
  structure of thousands of atoms, no atoms);
* for the client stream (PredictStream) sequences mixing valid, mutated and garbage messages.

Every call has a deadline: DEADLINE_EXCEEDED counts as a hang.  Any status is fine except
INTERNAL, UNKNOWN and a hang; the failures are listed with how to rebuild each request.

Left out on purpose:

* ``RunRequest.learner_address`` is never fuzzed: which addresses a sampler may dial is
  issue 12 item 4 (an arbitrary address is dialled as given today; ``oracle:qe`` starts pw.x).
* RunControl.max_steps and OptimizeRequest.max_iterations are mutated only to small or
  negative values: a valid request for 2^64 MD steps is long, not malformed.
* Learner cases the learner servicer/GP still answers with INTERNAL are listed in
  ``LEARNER_KNOWN`` below (issue 12: owned by the learner_service/servicer.py + gp.py
  change); they are skipped by name so this test guards everything else.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from google.protobuf import descriptor as _d

from learner_service.server import LearnerServiceConfig, start_learner_server
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos import wire
from protos.epicycle.v1 import common_pb2, learner_pb2, oracle_pb2, sampler_pb2
from protos.server import ServerConfig
from sampler_service.remote import md_settings
from sampler_service.server import SamplerServiceConfig, start_sampler_server

#: a deeper run by hand: EPICYCLE_FUZZ_SEED=13 EPICYCLE_FUZZ_N=1000 pytest tests/test_fuzz.py
SEED = int(os.environ.get("EPICYCLE_FUZZ_SEED", "12"))
PER_SERVICE = int(os.environ.get("EPICYCLE_FUZZ_N", "300"))
#: EPICYCLE_FUZZ_LOG=path writes one line per request (seed, case, seconds, status, method, mutation)
LOG = os.environ.get("EPICYCLE_FUZZ_LOG")
DEADLINE_S = 20.0
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
HYPS = {"sig2": 0.3, "ls2": 0.9, "sig3": 0.03, "ls3": 0.8, "noise": 0.05}

#: mutations whose results are issue-12 findings in the learner servicer/GP (not fuzzed here)
LEARNER_KNOWN: set[str] = set()


# --------------------------------------------------------------------------- valid requests


def alcu(n_rep=(2, 1, 1), seed=0):
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat(n_rep)
    atoms.numbers[::2] = 13
    atoms.rattle(0.05, seed=seed)
    return atoms


def labelled(seed=0):
    atoms = alcu(seed=seed)
    atoms.calc = EMT()
    return atoms, atoms.get_forces(), atoms.get_potential_energy(), atoms.get_stress()


def structure(atoms=None) -> common_pb2.Structure:
    return wire.structure_to_proto(alcu() if atoms is None else atoms)


def add_data_request(seed=0) -> learner_pb2.AddDataRequest:
    atoms, forces, energy, stress = labelled(seed)
    req = learner_pb2.AddDataRequest(structure=structure(atoms), atom_indices=[0, 3])
    wire.labels_to_proto(energy, forces, stress, out=req.labels)
    return req


def run_request() -> sampler_pb2.RunRequest:
    req = sampler_pb2.RunRequest()
    req.new_run.structure.CopyFrom(structure())
    req.new_run.settings.CopyFrom(md_settings(engine="builtin", ensemble="nve", timestep_fs=1.0, seed=3))
    req.control.max_steps = 3
    req.control.frame_interval = 1
    return req


# --------------------------------------------------------------------------- mutations

BAD_DOUBLES = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e308, -1e308, 5e-324, 1e300]
BAD_INTS = [0, -1, 1, 2**31 - 1, -(2**31), 7, 1000]
BAD_UINTS = [0, 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]
BAD_STRINGS = ["", " ", "x" * 5000, "ünï\u202ecode", "../../../etc/passwd", "000001", "initial", "\x00",
               "sig2", "noise", "linear", "log", "npt_berendsen", "langevin", "lammps"]
#: fields fuzzed only within a range (see the module docstring)
SMALL_ONLY = {"epicycle.v1.RunControl.max_steps": [0, 1, 2, 5],
              "epicycle.v1.OptimizeRequest.max_iterations": [-1, 0, 1, 2, -(2**31)]}
NEVER = {"epicycle.v1.RunRequest.learner_address"}


def _fields(msg, prefix="", depth=0):
    """(path, message, field descriptor) of every field reachable in ``msg`` (set or not)."""
    out = []
    for fd in msg.DESCRIPTOR.fields:
        if fd.full_name in NEVER:
            continue
        path = f"{prefix}{fd.name}"
        out.append((path, msg, fd))
        if fd.type == _d.FieldDescriptor.TYPE_MESSAGE and depth < 4 and not fd.message_type.GetOptions().map_entry:
            if fd.is_repeated:
                items = getattr(msg, fd.name)
                for k, item in enumerate(items):
                    out.extend(_fields(item, f"{path}[{k}].", depth + 1))
            elif msg.HasField(fd.name):
                out.extend(_fields(getattr(msg, fd.name), f"{path}.", depth + 1))
    return out


def _bad_scalar(fd, rng):
    T = _d.FieldDescriptor
    if fd.full_name in SMALL_ONLY:
        return SMALL_ONLY[fd.full_name][rng.integers(len(SMALL_ONLY[fd.full_name]))]
    t = fd.type
    if t in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        v = BAD_DOUBLES[rng.integers(len(BAD_DOUBLES))]
        return v if t == T.TYPE_DOUBLE or not np.isfinite(v) or abs(v) < 3e38 else float("inf")
    if t in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
        return BAD_INTS[rng.integers(len(BAD_INTS))]
    if t in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
        return [0, -1, 2**63 - 1, -(2**63), 5][rng.integers(5)]
    if t in (T.TYPE_UINT32, T.TYPE_FIXED32):
        return [0, 1, 2**32 - 1, 3][rng.integers(4)]
    if t in (T.TYPE_UINT64, T.TYPE_FIXED64):
        return BAD_UINTS[rng.integers(len(BAD_UINTS))]
    if t == T.TYPE_BOOL:
        return bool(rng.integers(2))
    if t == T.TYPE_STRING:
        return BAD_STRINGS[rng.integers(len(BAD_STRINGS))]
    if t == T.TYPE_BYTES:
        return rng.bytes(int(rng.choice([0, 1, 16, 300, 5000])))
    if t == T.TYPE_ENUM:
        return int(rng.choice([0, 1, 2, 3, 5, 99, -7]))
    raise AssertionError(fd)


def _mutate_array(arr: common_pb2.Array, rng) -> str:
    kind = int(rng.integers(9))
    if kind == 0:
        arr.dtype = int(rng.integers(0, 8))
        return f"dtype={arr.dtype}"
    if kind == 1:
        arr.data = arr.data[: int(rng.integers(0, len(arr.data) + 1))]
        return "truncated data"
    if kind == 2:
        arr.data = arr.data + rng.bytes(int(rng.integers(1, 64)))
        return "extended data"
    if kind == 3:
        arr.data = rng.bytes(len(arr.data))  # random bit patterns: NaN, inf, 1e300, denormals
        return "random data"
    if kind == 4:
        shape = list(arr.shape)
        if shape:
            shape.reverse()
        arr.shape[:] = shape
        return f"shape reversed {shape}"
    if kind == 5:
        choice = [[], [0], [2**62, 4], [-1, 3], [1] * 40, [3, 3, 3], [len(arr.data) // 8]][rng.integers(7)]
        arr.shape[:] = choice
        return f"shape {choice[:5]}"
    if kind == 6:
        arr.Clear()
        return "cleared"
    if kind == 7:
        n = int(rng.integers(0, 5))
        values = rng.choice(BAD_DOUBLES, size=n * 3)
        wire.encode_array(values.reshape(n, 3), "<f8", out=arr)
        return f"({n}, 3) of bad doubles"
    values = np.frombuffer(arr.data[: len(arr.data) // 8 * 8], "<f8") if arr.dtype == common_pb2.DTYPE_FLOAT64 else None
    if values is not None and values.size:
        wire.encode_array(values.reshape(-1) > 0, "?", out=arr)
        arr.shape[:] = [values.size // 3, 3] if values.size % 3 == 0 else [values.size]
        return "as bool"
    arr.dtype = common_pb2.DTYPE_FLOAT32
    return "as float32"


def _numbers(s: common_pb2.Structure, rng, values) -> str:
    z = wire.decode_array(s.numbers, "n").astype(np.float64).copy()
    k = int(rng.integers(len(z)))
    z[k] = values
    dtype = "<f8" if float(values) != int(values) else "<i8"
    wire.encode_array(z if dtype == "<f8" else z.astype(np.int64), dtype, out=s.numbers)
    return f"numbers[{k}]={values}"


def _positions(s: common_pb2.Structure, fn) -> None:
    p = wire.decode_array(s.positions, "p").copy()
    wire.encode_array(fn(p), "<f8", out=s.positions)


def _big(s: common_pb2.Structure, rng) -> str:
    reps = int(rng.choice([8, 10, 12]))
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((reps, reps, reps // 2))
    atoms.numbers[::3] = 13
    s.CopyFrom(wire.structure_to_proto(atoms))
    return f"{len(atoms)} atoms"


STRUCTURE_MUTATIONS: list[tuple[str, Callable]] = [
    ("Z=0", lambda s, r: _numbers(s, r, 0)),
    ("Z=200", lambda s, r: _numbers(s, r, 200)),
    ("Z=-5", lambda s, r: _numbers(s, r, -5)),
    ("Z=29.5", lambda s, r: _numbers(s, r, 29.5)),
    ("Z=1 (not in the model)", lambda s, r: _numbers(s, r, 1)),
    ("singular cell", lambda s, r: wire.encode_array(np.diag([3.0, 3.0, 0.0]), out=s.cell)),
    ("coplanar cell", lambda s, r: wire.encode_array([[3, 0, 0], [0, 3, 0], [3, 3, 0]], "<f8", out=s.cell)),
    ("tiny cell", lambda s, r: wire.encode_array(np.eye(3) * 1e-3, out=s.cell)),
    ("thin cell", lambda s, r: wire.encode_array(np.diag([7.5, 3.75, 0.05]), out=s.cell)),
    ("1e300 cell", lambda s, r: wire.encode_array(np.eye(3) * 1e300, out=s.cell)),
    ("1e5 cell", lambda s, r: wire.encode_array(np.eye(3) * 1e5, out=s.cell)),
    ("no cell, pbc", lambda s, r: s.ClearField("cell")),
    ("no pbc, spread 1e5", lambda s, r: (s.ClearField("pbc"), s.pbc.extend([False] * 3),
                                        _positions(s, lambda p: p * 3e4))),
    ("pbc 2 flags", lambda s, r: (s.ClearField("pbc"), s.pbc.extend([True, True]))),
    ("atoms on one site", lambda s, r: _positions(s, lambda p: np.repeat(p[:1], len(p), axis=0))),
    ("two atoms on one site", lambda s, r: _positions(s, lambda p: np.concatenate([p[:1], p[:-1]]))),
    ("positions 1e300", lambda s, r: _positions(s, lambda p: p + 1e300)),
    ("positions 9e5", lambda s, r: _positions(s, lambda p: p + 9e5)),
    ("positions NaN", lambda s, r: _positions(s, lambda p: np.where(p > 1, np.nan, p))),
    ("bool positions", lambda s, r: wire.encode_array(np.ones((len(s.numbers.data) // 4, 3), bool), "?",
                                                      out=s.positions)),
    ("no atoms", lambda s, r: (wire.encode_array(np.zeros((0, 3)), out=s.positions),
                               wire.encode_array(np.zeros(0), "<i4", out=s.numbers))),
    ("big", _big),
    ("masses 0", lambda s, r: wire.encode_array(np.zeros(len(s.numbers.data) // 4), out=s.masses)),
    ("velocities 1e4", lambda s, r: wire.encode_array(np.full((len(s.numbers.data) // 4, 3), 1e4),
                                                      out=s.velocities)),
]


def _structures(msg):
    """Every (non-repeated, set) Structure inside ``msg``."""
    return [getattr(owner, fd.name) for _, owner, fd in _fields(msg)
            if fd.message_type is not None and fd.message_type.full_name == "epicycle.v1.Structure"
            and not fd.is_repeated and owner.HasField(fd.name)]


def mutate(msg, rng) -> str:
    """Apply one mutation to ``msg`` in place; returns a description."""
    structures = _structures(msg)
    if structures and rng.random() < 0.4:
        s = structures[rng.integers(len(structures))]
        name, fn = STRUCTURE_MUTATIONS[rng.integers(len(STRUCTURE_MUTATIONS))]
        if name == "big" and rng.random() < 0.7:  # keep the slow ones rare
            name, fn = STRUCTURE_MUTATIONS[0]
        try:
            fn(s, rng)
        except Exception as exc:  # noqa: BLE001 - an earlier mutation left nothing to mutate this way
            return f"structure: {name} not applicable ({type(exc).__name__})"
        return f"structure: {name}"
    fields = _fields(msg)
    if not fields:
        return "(no fields)"
    path, owner, fd = fields[rng.integers(len(fields))]
    T = _d.FieldDescriptor
    if fd.type == T.TYPE_MESSAGE:
        if fd.message_type.GetOptions().map_entry:
            target = getattr(owner, fd.name)
            for k in range(int(rng.integers(1, 50))):
                target[f"k{k}" * int(rng.integers(1, 20))] = "v" * int(rng.integers(0, 300))
            return f"{path}: map entries"
        if fd.is_repeated:
            items = getattr(owner, fd.name)
            n = int(rng.choice([0, 1, 3, 50]))
            del items[:]
            for _ in range(n):
                items.add()
            return f"{path}: {n} empty items"
        sub = getattr(owner, fd.name)
        if fd.message_type.full_name == "epicycle.v1.Array":
            return f"{path}: {_mutate_array(sub, rng)}"
        if rng.random() < 0.3:
            owner.ClearField(fd.name)
            return f"{path}: cleared"
        sub.SetInParent()
        return f"{path}.{mutate(sub, rng)}" if sub.DESCRIPTOR.fields else f"{path}: set empty"
    if fd.is_repeated:
        items = getattr(owner, fd.name)
        n = int(rng.choice([0, 1, 5, 1000]))
        values = [_bad_scalar(fd, rng) for _ in range(n)]
        del items[:]
        items.extend(values)
        return f"{path}: {n} values like {values[:2]!r}"[:200]
    value = _bad_scalar(fd, rng)
    setattr(owner, fd.name, value)
    return f"{path}={value!r}"[:200]


# --------------------------------------------------------------------------- harness


@dataclass
class Method:
    path: str
    kind: str  # "unary", "unary_stream", "stream_stream"
    base: Callable[[], object]
    weight: float = 1.0


@dataclass
class Outcome:
    codes: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def record(self, what: str, code, details: str) -> None:
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        if code in BAD_CODES:
            self.failures.append(f"{what} -> {code.name}: {details[:300]}")


def call(channel, method: Method, payload, deadline: float = DEADLINE_S):
    """Send raw bytes (a list of them for a client stream); returns (code, details)."""
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method.kind == "unary":
            channel.unary_unary(method.path, **raw)(payload, timeout=deadline)
        elif method.kind == "unary_stream":
            for _ in channel.unary_stream(method.path, **raw)(payload, timeout=deadline):
                pass
        else:
            for _ in channel.stream_stream(method.path, **raw)(iter(payload), timeout=deadline):
                pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def fuzz(channel, methods: list[Method], n: int, seed: int) -> Outcome:
    rng = np.random.default_rng(seed)
    weights = np.array([m.weight for m in methods], float)
    weights /= weights.sum()
    out = Outcome()
    for case in range(n):
        method = methods[rng.choice(len(methods), p=weights)]
        what, payload = make_payload(method, rng)
        if what in LEARNER_KNOWN:
            continue
        t0 = time.monotonic()
        code, details = call(channel, method, payload)
        out.record(f"case {case} {method.path} {what}", code, details)
        if LOG:
            with open(LOG, "a") as fh:
                fh.write(f"{seed} {case} {time.monotonic() - t0:.2f}s {code.name} {method.path} {what[:150]} "
                         f"| {details[:150]!r}\n")
    return out


def one_message(method: Method, rng) -> tuple[str, bytes]:
    r = rng.random()
    if r < 0.2:
        data = rng.bytes(int(rng.choice([0, 1, 2, 7, 40, 300, 3000])))
        return f"random bytes {data[:16].hex()}.. ({len(data)} B)", data
    msg = method.base()
    if r < 0.25:
        return "valid", msg.SerializeToString()
    whats = [mutate(msg, rng) for _ in range(int(rng.integers(1, 3)))]
    return "; ".join(whats), msg.SerializeToString()


def positions_only(method: Method) -> Method:
    """The later messages of a PredictStream may carry positions only (numbers, cell and pbc
    are those of the first)."""

    def base():
        msg = method.base()
        for name in ("numbers", "cell", "pbc", "masses", "velocities"):
            msg.structure.ClearField(name)
        return msg

    return Method(method.path, method.kind, base)


def make_payload(method: Method, rng):
    if method.kind != "stream_stream":
        return one_message(method, rng)
    parts = [one_message(method, rng)]
    for _ in range(int(rng.integers(0, 3))):
        what, data = one_message(positions_only(method) if rng.random() < 0.5 else method, rng)
        parts.append((what, data))
    return " | ".join(w for w, _ in parts), [p for _, p in parts]


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from learner_service.client import LearnerClient

    oracle = start_oracle_server(OracleServiceConfig(backend="emt", workers=2, queue_limit=64,
                                                     server=ServerConfig(max_workers=8)))
    learner = start_learner_server(LearnerServiceConfig(
        species=(13, 29), cutoffs=(4.0, 3.0), hyperparameters=HYPS, predict_threads=1,
        model_dir=tmp_path_factory.mktemp("learner-model"), server=ServerConfig(max_workers=8)))
    client = LearnerClient(learner.address)
    client.wait_ready(300)
    for seed in range(2):
        atoms, forces, _, _ = labelled(seed)
        client.add_data(atoms, forces=forces, atom_indices=[0, 1, 2])
    model = client.export_model().model
    sampler = start_sampler_server(SamplerServiceConfig(default_learner=learner.address, engines=("builtin",),
                                                        server=ServerConfig(max_workers=8)))
    sampler.mark_ready()
    yield {"oracle": oracle, "learner": learner, "sampler": sampler, "model": model}
    client.close()
    for s in (sampler, learner, oracle):
        s.stop(0)


def _methods(service: str, model: bytes) -> list[Method]:
    health = Method("/grpc.health.v1.Health/Check", "unary", lambda: common_pb2.Array(), 0.1)
    if service == "oracle":
        return [Method("/epicycle.v1.Oracle/Label", "unary",
                       lambda: oracle_pb2.LabelRequest(structure=structure(), properties=["energy", "forces"],
                                                       request_id="fuzz"), 5),
                Method("/epicycle.v1.Oracle/Describe", "unary", oracle_pb2.DescribeRequest, 0.5), health]
    if service == "sampler":
        return [Method("/epicycle.v1.Sampler/Run", "unary_stream", run_request, 5),
                Method("/epicycle.v1.Sampler/Describe", "unary", sampler_pb2.SamplerDescribeRequest, 0.5), health]
    L = "/epicycle.v1.Learner/"
    return [
        Method(L + "Predict", "unary", lambda: learner_pb2.PredictRequest(structure=structure(), atom_indices=[0, 1],
                                                                          sequence=1), 3),
        Method(L + "PredictStream", "stream_stream",
               lambda: learner_pb2.PredictRequest(structure=structure(), sequence=2), 2),
        Method(L + "AddData", "unary", add_data_request, 2),
        Method(L + "AddDataBatch", "unary",
               lambda: learner_pb2.AddDataBatchRequest(items=[add_data_request(1), add_data_request(2)]), 1),
        Method(L + "Optimize", "unary", lambda: learner_pb2.OptimizeRequest(
            max_iterations=2, bounds=[learner_pb2.HyperparameterBounds(name="ls2", lower=0.5, upper=2.0)],
            fixed=["sig3"], space="log"), 0.5),
        Method(L + "GetModelInfo", "unary", learner_pb2.GetModelInfoRequest, 0.3),
        Method(L + "ExportModel", "unary", learner_pb2.ExportModelRequest, 0.3),
        Method(L + "LoadModel", "unary", lambda: learner_pb2.LoadModelRequest(model=model), 0.7),
        Method(L + "Checkpoint", "unary", learner_pb2.CheckpointRequest, 0.3),
        Method(L + "RestoreCheckpoint", "unary", lambda: learner_pb2.RestoreCheckpointRequest(checkpoint_id="initial"),
               0.5),
        Method(L + "KernelDistances", "unary",
               lambda: learner_pb2.KernelDistancesRequest(structure=structure(), atom_indices=[0, 1]), 1),
        health,
    ]


@pytest.mark.parametrize("service", ["oracle", "learner", "sampler"])
def test_malformed_requests_never_internal_unknown_or_hang(servers, service):
    started = time.monotonic()
    channel = grpc.insecure_channel(servers[service].address,
                                    options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    index = ["oracle", "learner", "sampler"].index(service)
    outcome = fuzz(channel, _methods(service, servers["model"]), PER_SERVICE, seed=[SEED, index])
    elapsed = time.monotonic() - started
    summary = f"{service}: {PER_SERVICE} requests in {elapsed:.1f} s, status codes {outcome.codes}"
    print(summary)
    assert not outcome.failures, summary + "\n" + "\n".join(outcome.failures[:40])
    # the server is still healthy afterwards
    assert call(channel, Method("/epicycle.v1.Oracle/Describe" if service == "oracle" else
                                "/epicycle.v1.Sampler/Describe" if service == "sampler" else
                                "/epicycle.v1.Learner/GetModelInfo", "unary", None), b"")[0] == grpc.StatusCode.OK


# --------------------------------------------------------------------------- what the fuzz found, directly


@pytest.mark.parametrize(
    "cell, numbers, message",
    [
        (np.eye(3) * 1e300, [13, 29], "component exceeds 1e"),  # was: cannot convert float NaN to integer
        (np.eye(3) * 1e-3, [13, 29], "too small for the cutoff"),             # was: billions of images (memory)
        (np.diag([7.5, 3.75, 0.05]), [13, 29], "neighbours within"),          # was: GBs of triplets, > 20 s
        (np.eye(3) * 4.0, [13, -1], r"atomic number\(s\) \[-1\] are not elements"),  # was: the last species
    ],
)
def test_learner_environments_refuse_what_the_fuzz_found(cell, numbers, message):
    from learner_service.environment import Cutoffs, build_environments
    from protos.errors import InvalidInput

    atoms = alcu()  # 8 atoms
    z = atoms.numbers.copy()
    z[:2] = numbers
    with pytest.raises(InvalidInput, match=message):
        build_environments(atoms.positions, z, cell, [True] * 3, Cutoffs.create([13, 29], (4.0, 3.0)))


def test_learner_environments_refuse_coordinates_that_wrapping_would_destroy():
    """PredictStream messages after the first decode positions without structure_from_proto's
    bound; 1e300 Å wrapped into a 4 Å cell kept no digit and gave no neighbours, silently."""
    from learner_service.environment import Cutoffs, build_environments
    from protos.errors import InvalidInput

    atoms = alcu()
    with pytest.raises(InvalidInput, match="a coordinate exceeds 1e\\+06 Å"):
        build_environments(atoms.positions + 1e300, atoms.numbers, atoms.cell.array, [True] * 3,
                           Cutoffs.create([13, 29], (4.0, 3.0)))
