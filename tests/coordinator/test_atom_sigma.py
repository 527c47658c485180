"""coordinator.cycle.atom_sigma: the one per-atom σ the coordinator decides with, and frame_atoms."""

from types import SimpleNamespace

import numpy as np
import pytest

from coordinator.cycle import atom_sigma, frame_atoms
from protos import wire
from protos.epicycle.v1 import common_pb2, sampler_pb2
from protos.errors import InvalidInput

COMP = np.array([[0.1, 0.3, 0.2], [0.05, 0.01, 0.02], [0.0, 0.0, 0.0]])  # eV/Å


def _prediction(atom_std=None):
    p = common_pb2.Prediction()
    wire.encode_array(COMP, "<f8", p.force_std)
    if atom_std is not None:
        wire.encode_array(atom_std, "<f8", p.atom_std)
    return p


def test_invariant_sigma_when_sent_else_the_largest_component():
    np.testing.assert_array_equal(atom_sigma(_prediction([0.35, 0.06, 0.0]), 3), [0.35, 0.06, 0.0])
    np.testing.assert_array_equal(atom_sigma(_prediction(), 3), [0.3, 0.05, 0.0])
    np.testing.assert_array_equal(atom_sigma(common_pb2.Prediction(), 3), np.zeros(3))
    # a decoded learner prediction (learner_service.client.RemotePrediction) works the same way
    np.testing.assert_array_equal(atom_sigma(SimpleNamespace(atom_std=np.array([0.35, 0.06, 0.0]), force_std=COMP), 3),
                                  [0.35, 0.06, 0.0])
    np.testing.assert_array_equal(atom_sigma(SimpleNamespace(atom_std=None, force_std=COMP), 3), [0.3, 0.05, 0.0])
    with pytest.raises(InvalidInput, match="atom_std"):
        atom_sigma(_prediction([0.35, -0.06, 0.0]), 3)


def test_frame_atoms_reports_the_invariant_maximum():
    frame = sampler_pb2.Frame(step=4)
    s = frame.structure
    wire.encode_array(np.eye(3) * 2.0, "<f8", s.positions)
    wire.encode_array([29, 29, 29], "<i4", s.numbers)
    wire.encode_array(np.eye(3) * 10.0, "<f8", s.cell)
    frame.prediction.CopyFrom(_prediction([0.35, 0.06, 0.0]))
    wire.encode_array(np.zeros((3, 3)), "<f8", frame.prediction.forces)
    atoms = frame_atoms(frame, threshold=0.2)
    assert atoms.info["max_atom_std"] == 0.35 and atoms.info["max_force_std"] == 0.3
    np.testing.assert_array_equal(atoms.arrays["atom_std"], [0.35, 0.06, 0.0])
