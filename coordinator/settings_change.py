"""``epicycle run --resume DIR --set KEY=VALUE ...``: settings that may change in the middle of a run.

A run's ``config.yaml`` is its contract: labels, checkpoints and the learner's model were made under
it.  Some settings only steer what happens next and can change safely between two processes of a
run — how long the walkers run, when the oracle is called, where the oracle is, the temperature
schedule still ahead, the stop rules; they are listed in :data:`MUTABLE` (a trailing ``.*`` allows
every key below).  Everything else (structure, species, cutoffs, hyperparameters, ensemble, Δt,
walkers, seed, service addresses of learner and sampler, ...) describes data already made and is
refused with the list of what may change.

The new configuration is validated as a whole before anything is written; ``config.yaml`` is then
replaced atomically and the change recorded in the event log (``settings_changed``: key, old and new
value).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import yaml

from protos.errors import InvalidInput

#: dotted keys that may change on resume
MUTABLE = (
    "sampler.steps",
    "sampler.schedule",
    "sampler.frame_interval",
    "sampler.checkpoint_interval",
    "policy.sigma_factor",
    "policy.absolute_threshold",
    "policy.min_steps_between_calls",
    "policy.atoms_per_call",
    "policy.acquisition",
    "policy.dedupe",
    "policy.trial.*",
    "oracle.addresses",
    "oracle.max_in_flight",
    "oracle.timeout_s",
    "oracle.attempts",
    "oracle.outage_timeout_s",
    "oracle.on_failure",
    "learner.optimize.every",
    "learner.optimize.until_calls",
    "learner.optimize.max_iterations",
    "learner.optimize.method",
    "learner.optimize.restarts",
    "learner.optimize.holdout",
    "stop.*",
    "calibration.*",
    "metrics_port",
)


def _allowed(key: str) -> bool:
    return any(key == m or (m.endswith(".*") and key.startswith(m[:-1])) for m in MUTABLE)


def parse_assignments(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["stop.max_labels=80", "sampler.schedule=[[3000, 1200]]"]`` -> ``[(key, value), ...]``; values
    are YAML (numbers, lists, true/false, null)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"--set expects KEY=VALUE (e.g. sampler.steps=2000), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise InvalidInput(f"--set {key}: the value {text!r} is not valid YAML ({exc})") from None
        if not _allowed(key):
            raise InvalidInput(f"--set {key}: this setting cannot change in the middle of a run (labels, checkpoints "
                               f"and the model were made under it). Settings that may change: "
                               f"{', '.join(MUTABLE)}")
        out.append((key, value))
    return out


def apply_assignments(data: dict, assignments: list[tuple[str, Any]]) -> tuple[dict, dict]:
    """A copy of the config mapping ``data`` with the assignments made, and ``{key: [old, new]}``."""
    new = copy.deepcopy(data)
    changes = {}
    for key, value in assignments:
        parts = key.split(".")
        node = new
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise InvalidInput(f"--set {key}: {p} is not a section")
            node = child
        old = node.get(parts[-1])
        node[parts[-1]] = value
        changes[key] = [old, value]
    return new, changes
