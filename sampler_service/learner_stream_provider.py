"""Forces from the Learner service over one long-lived bidirectional stream."""

from __future__ import annotations

import numpy as np

from protos.client import ClientTLS
from sampler_service.force_providers import ForceResult


class LearnerStreamProvider:
    """A :class:`~sampler_service.force_providers.ForceProvider` backed by ``Learner.PredictStream``.

    Each ``compute`` sends the positions (numbers and pbc only once, the cell
    when it changes) and returns energy, forces, stress (if ``stress``), the σ
    of every force component, σn and the model version.
    """

    def __init__(self, address: str, stress: bool = False, tls: ClientTLS | None = None,
                 stream_timeout: float | None = None) -> None:
        from learner_service.client import LearnerClient

        self.address = address
        self.want_stress = stress
        self._client = LearnerClient(address, tls=tls)
        self._stream = self._client.stream(timeout=stream_timeout)
        self.calls = 0
        #: the learner model version to predict with (0: the newest at every step); RunControl.model_version
        self.model_version = 0

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        self.calls += 1
        p = self._stream.predict(np.asarray(positions), np.asarray(numbers), np.asarray(cell), pbc,
                                 stress=self.want_stress, model_version=self.model_version)
        return ForceResult(energy=p.energy, forces=p.forces, stress=p.stress, force_std=p.force_std,
                           noise=p.noise, model_version=int(p.model_version), atom_std=p.atom_std)

    def close(self) -> None:
        self._stream.close()
        self._client.close()
