"""Pluggable policies of the on-the-fly cycle (no gRPC here).

* **Acquisition**: which atoms of an oracle-labelled frame enter the training
  set.  ``select(force_std (n, 3) eV/Å, numbers (n,), n_atoms_wanted, rng) ->
  atom indices``.  Built in: ``max_sigma`` (the paper: the N atoms with the
  largest predicted force σ) and ``random``.
* **Update**: whether an updated model is safe to continue MD with.
  ``decide(UpdateContext) -> Decision``.  Built in: ``accept`` (the paper's
  behaviour).  Rollback policies plug in here.

Registries map names (used in the run config) to factories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


class Acquisition(Protocol):
    def select(self, force_std: np.ndarray, numbers: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray: ...


class MaxSigma:
    """The ``n`` atoms whose largest force-component σ is largest (ties: lower index first)."""

    name = "max_sigma"

    def select(self, force_std, numbers, n, rng):
        per_atom = np.max(np.asarray(force_std), axis=1)
        order = np.argsort(-per_atom, kind="stable")
        return np.sort(order[: min(n, len(order))])


class RandomAtoms:
    """``n`` atoms drawn uniformly (a baseline for comparing acquisition rules)."""

    name = "random"

    def select(self, force_std, numbers, n, rng):
        return np.sort(rng.choice(len(numbers), size=min(n, len(numbers)), replace=False))


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


ACQUISITION: dict[str, Callable[[], Acquisition]] = {"max_sigma": MaxSigma, "random": RandomAtoms}
class TrialUpdates:
    """Every walker trials a new model version before continuing on it (coordinator/trial.py);
    the cycle runs the trials, this object only names the policy."""

    name = "trial"

    def decide(self, ctx: UpdateContext) -> Decision:
        return Decision(True, "accepted per walker after a trial integration (policy.trial)")


UPDATE: dict[str, Callable[[], UpdatePolicy]] = {"accept": AlwaysAccept, "trial": TrialUpdates}
