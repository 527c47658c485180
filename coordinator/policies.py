"""Pluggable policies of the on-the-fly cycle (no gRPC here).

* **Acquisition** (:mod:`coordinator.acquisition`): which atoms of an oracle-labelled frame
  enter the training set, and which queued frame is labelled first.
  ``select(Candidate, AcquisitionContext) -> Selection``; the rules ``max_sigma`` (the paper),
  ``random``, ``fps``, ``info_gain`` and ``hybrid`` see the frame, its per-atom σ and a
  read-only view of the model (kernel distances, conditional σ).
* **Update**: whether an updated model is safe to continue MD with.
  ``decide(UpdateContext) -> Decision``.  Built in: ``accept`` (the paper's
  behaviour).  Rollback policies plug in here.

Registries map names (used in the run config) to factories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from coordinator.acquisition import ACQUISITION, Acquisition  # the acquisition registry lives there

__all__ = ["ACQUISITION", "Acquisition", "AlwaysAccept", "Decision", "UPDATE", "UpdateContext", "UpdatePolicy"]


@dataclass(frozen=True)
class UpdateContext:
    oracle_calls: int
    step: int
    max_sigma_before: float       # eV/Å, at the stop frame, old model
    threshold: float              # eV/Å
    n_environments: int


@dataclass(frozen=True)
class Decision:
    accept: bool
    reason: str = ""


class UpdatePolicy(Protocol):
    def decide(self, ctx: UpdateContext) -> Decision: ...


class AlwaysAccept:
    """Continue MD with every updated model (FLARE's behaviour)."""

    name = "accept"

    def decide(self, ctx: UpdateContext) -> Decision:
        return Decision(True, "accept policy")


class TrialUpdates:
    """Every walker trials a new model version before continuing on it (coordinator/trial.py);
    the cycle runs the trials, this object only names the policy."""

    name = "trial"

    def decide(self, ctx: UpdateContext) -> Decision:
        return Decision(True, "accepted per walker after a trial integration (policy.trial)")


UPDATE: dict[str, Callable[[], UpdatePolicy]] = {"accept": AlwaysAccept, "trial": TrialUpdates}
