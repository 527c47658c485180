"""What every self-consistent-field oracle shares: retries with escalated settings, quarantine.

An SCF calculation can fail on a particular structure (charge sloshing in a
metal, a near-degenerate state, atoms pushed close together by MD).  The
backends report such a failure as :class:`~protos.errors.CalculationFailed`
(never as labels).  :class:`ScfOracle` then

1. **retries** with the escalated settings of its retry ladder, e.g.::

       retries: [{electron_maxstep: 200, mixing_beta: 0.3},
                 {electron_maxstep: 400, mixing_beta: 0.1}]

   each entry overriding the backend's settings for that attempt only
   (only keys listed in the backend's :attr:`ScfOracle.retry_keys` are
   allowed; a timeout is not retried unless ``retry_on_timeout``);
2. when the whole ladder fails, raises :class:`CalculationFailed` that lists
   every attempt with its settings and reason, with the log tail of the last;
3. counts the failure against the structure's content hash; after
   ``quarantine_after`` failed requests the structure is **quarantined**:
   further requests fail at once with :class:`Quarantined` (still a
   ``CalculationFailed`` -> gRPC ``ABORTED``), without running the code.
   Quarantined structures are logged, listed by :meth:`ScfOracle.quarantined`,
   and, if ``quarantine_file`` is set, appended to it as JSON lines (and
   read back on start, so a restarted worker remembers them).

Labels computed on a retry carry ``info["attempt"]`` and
``info["overrides"]`` so the user can see which settings converged.

Cancellation (:attr:`~oracle_service.base.Oracle.cancellable`): ``calculate``
takes ``cancel=`` (a :class:`threading.Event`) and hands it to
``calculate_once`` when that accepts a ``cancel`` keyword (QE, GPAW, xTB kill
their process); it starts no further attempt once it is set.  A cancelled
attempt (:class:`~oracle_service.base.CalculationCancelled`) ends the ladder
and is neither retried nor counted towards quarantine.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from ase import Atoms

from protos.errors import CalculationFailed, CalculationTimeout, InvalidInput

from ..base import CalculationCancelled, Labels, Oracle, raise_if_cancelled

log = logging.getLogger(__name__)


class Quarantined(CalculationFailed):
    """The structure failed repeatedly before and is refused without a calculation."""


def structure_key(atoms: Atoms) -> str:
    """SHA-256 over atomic numbers, positions, cell, pbc and initial magnetic moments (exact bytes)."""
    h = hashlib.sha256()
    for tag, arr in (
        ("numbers", np.asarray(atoms.numbers, dtype="<i8")),
        ("positions", np.asarray(atoms.positions, dtype="<f8") + 0.0),
        ("cell", np.asarray(atoms.cell.array, dtype="<f8") + 0.0),
        ("pbc", np.asarray(atoms.pbc, dtype=np.uint8)),
        ("magmoms", np.asarray(atoms.get_initial_magnetic_moments(), dtype="<f8") + 0.0),
    ):
        arr = np.ascontiguousarray(arr)
        h.update(f"{tag}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def format_overrides(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "configured settings"


@dataclass
class _Record:
    failures: int
    formula: str
    last_error: str
    attempts: list[dict]
    quarantined_at: float | None = None


class ScfOracle(Oracle, abc.ABC):
    """Base class of the QE, GPAW and xTB backends (see the module docstring).

    Subclasses implement :meth:`calculate_once` and list the settings a
    retry may change in :attr:`retry_keys`.
    """

    #: settings that an entry of ``retries`` may override
    retry_keys: frozenset[str] = frozenset()
    #: ``calculate`` takes ``cancel=``; it is passed on to ``calculate_once`` if that accepts it
    cancellable = True

    def __init__(
        self,
        *,
        retries: Sequence[Mapping[str, Any]] | None = None,
        retry_on_timeout: bool = False,
        quarantine_after: int = 1,
        quarantine_file: str | os.PathLike | None = None,
    ) -> None:
        ladder = []
        for i, entry in enumerate(retries or ()):
            if not isinstance(entry, Mapping) or not entry:
                raise InvalidInput(f"retries[{i}] must be a non-empty mapping of settings, got {entry!r}")
            unknown = sorted(set(entry) - set(self.retry_keys))
            if unknown:
                raise InvalidInput(
                    f"retries[{i}]: {self.name} cannot change {unknown} on a retry; allowed: {sorted(self.retry_keys)}"
                )
            ladder.append(dict(entry))
        if int(quarantine_after) < 0:
            raise InvalidInput(f"quarantine_after must be >= 0 (0 = never), got {quarantine_after}")
        self.retries: tuple[dict, ...] = tuple(ladder)
        self.retry_on_timeout = bool(retry_on_timeout)
        self.quarantine_after = int(quarantine_after)
        self.quarantine_file = str(quarantine_file) if quarantine_file else None
        self._records: dict[str, _Record] = {}
        self._records_lock = threading.Lock()
        #: attempts run with escalated settings (after a failed first attempt), for metrics
        self.retry_attempts = 0
        if self.quarantine_file:
            self._load_quarantine_file()

    # -- subclass hook ----------------------------------------------------------

    @abc.abstractmethod
    def calculate_once(self, atoms: Atoms, properties: tuple[str, ...], overrides: Mapping[str, Any]) -> Labels:
        """One attempt with the configured settings updated by ``overrides``."""

    def validate_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Check a retry entry's values (called at construction); raise InvalidInput."""

    # -- settings shared by every SCF backend --------------------------------------

    def retry_settings(self) -> dict[str, Any]:
        return {
            "retries": [dict(r) for r in self.retries],
            "retry_on_timeout": self.retry_on_timeout,
        }

    # -- the retry loop -------------------------------------------------------------

    def calculate(self, atoms: Atoms, properties: tuple[str, ...], cancel: threading.Event | None = None) -> Labels:
        key = structure_key(atoms)
        pass_cancel = cancel is not None and _accepts_cancel(type(self))
        self._refuse_if_quarantined(key, atoms)
        ladder: list[dict] = [{}] + [dict(r) for r in self.retries]
        attempts: list[dict] = []
        last: CalculationFailed | None = None
        for number, overrides in enumerate(ladder, start=1):
            if number > 1:
                with self._records_lock:
                    self.retry_attempts += 1
            raise_if_cancelled(cancel, f"{self.name}: calculation on {atoms.get_chemical_formula()}")
            start = time.monotonic()
            try:
                if pass_cancel:
                    labels = self.calculate_once(atoms, properties, overrides, cancel=cancel)
                else:
                    labels = self.calculate_once(atoms, properties, overrides)
            except CalculationCancelled:
                raise  # nobody waits: no retry, no failure record
            except CalculationTimeout as exc:
                last = exc
                attempts.append(self._attempt(number, overrides, exc, start))
                if not self.retry_on_timeout:
                    break
            except CalculationFailed as exc:
                last = exc
                attempts.append(self._attempt(number, overrides, exc, start))
            else:
                if number > 1:
                    log.info("%s: %s converged on attempt %d (%s)", self.name, atoms.get_chemical_formula(),
                             number, format_overrides(overrides))
                info = dict(labels.info)
                info.update(attempt=number, overrides=dict(overrides))
                if attempts:
                    info["failed_attempts"] = attempts
                with self._records_lock:
                    self._records.pop(key, None)  # a success resets the count
                return Labels(labels.energy, labels.forces, labels.stress, info=info)
        assert last is not None
        raise self._record_failure(key, atoms, attempts, last)

    @staticmethod
    def _attempt(number: int, overrides: Mapping[str, Any], exc: BaseException, start: float) -> dict:
        return {
            "attempt": number,
            "overrides": dict(overrides),
            "error": type(exc).__name__,
            "reason": CalculationFailed.__str__(exc).split("\n--- last lines")[0] if isinstance(exc, CalculationFailed)
            else str(exc),
            "seconds": round(time.monotonic() - start, 3),
        }

    def _record_failure(self, key: str, atoms: Atoms, attempts: list[dict], last: CalculationFailed) -> CalculationFailed:
        formula = atoms.get_chemical_formula()
        lines = [f"[{a['attempt']}] {format_overrides(a['overrides'])}: {a['reason']}" for a in attempts]
        ladder_note = ""
        if isinstance(last, CalculationTimeout) and not self.retry_on_timeout and len(self.retries):
            ladder_note = " (timeouts are not retried: set retry_on_timeout to change this)"
        with self._records_lock:
            record = self._records.get(key) or _Record(0, formula, "", [])
            record.failures += 1
            record.last_error = attempts[-1]["reason"]
            record.attempts = attempts
            self._records[key] = record
            newly_quarantined = (
                self.quarantine_after > 0 and record.failures >= self.quarantine_after and record.quarantined_at is None
            )
            if newly_quarantined:
                record.quarantined_at = time.time()
        summary = (
            f"{self.name}: calculation on {formula} ({len(atoms)} atoms, structure {key[:12]}) failed after "
            f"{len(attempts)} attempt(s){ladder_note}:\n  " + "\n  ".join(lines)
        )
        if newly_quarantined:
            summary += (f"\n  -> structure {key[:12]} is now quarantined: further requests for it fail at once")
            log.warning("%s: quarantined %s (%s) after %d failed request(s): %s", self.name, formula, key[:12],
                        record.failures, record.last_error)
            self._append_quarantine_file(key, record)
        else:
            log.warning("%s: calculation on %s (%s) failed: %s", self.name, formula, key[:12], record.last_error)
        cls = CalculationTimeout if isinstance(last, CalculationTimeout) else CalculationFailed
        return cls(summary, last.log_tail)

    # -- quarantine -----------------------------------------------------------------

    def _refuse_if_quarantined(self, key: str, atoms: Atoms) -> None:
        with self._records_lock:
            record = self._records.get(key)
            if record is None or record.quarantined_at is None:
                return
            failures, last_error = record.failures, record.last_error
        raise Quarantined(
            f"{self.name}: structure {atoms.get_chemical_formula()} ({key[:12]}) is quarantined: it failed "
            f"{failures} time(s) with every retry setting (last error: {last_error}). Not recalculated; "
            f"change the structure or the oracle settings, or call release_quarantine()."
        )

    def quarantined(self) -> list[dict[str, Any]]:
        """Report of the quarantined structures (hash, formula, failures, last error, attempts, when)."""
        with self._records_lock:
            return [
                {"structure_hash": key, "formula": r.formula, "failures": r.failures, "last_error": r.last_error,
                 "attempts": list(r.attempts), "quarantined_at": r.quarantined_at}
                for key, r in self._records.items() if r.quarantined_at is not None
            ]

    def release_quarantine(self, structure_hash: str | None = None) -> int:
        """Forget quarantined structures (all, or the one whose hash starts with ``structure_hash``)."""
        with self._records_lock:
            keys = [k for k in self._records if structure_hash is None or k.startswith(structure_hash)]
            for k in keys:
                del self._records[k]
            return len(keys)

    def _append_quarantine_file(self, key: str, record: _Record) -> None:
        if not self.quarantine_file:
            return
        entry = {"backend": self.name, "structure_hash": key, "formula": record.formula,
                 "failures": record.failures, "last_error": record.last_error, "attempts": record.attempts,
                 "quarantined_at": record.quarantined_at, "settings": self.settings()}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.quarantine_file)), exist_ok=True)
            with open(self.quarantine_file, "a") as fh:
                fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
        except OSError as exc:
            log.error("%s: cannot write quarantine file %s: %s", self.name, self.quarantine_file, exc)

    def _load_quarantine_file(self) -> None:
        try:
            with open(self.quarantine_file) as fh:  # type: ignore[arg-type]
                lines = fh.readlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot read quarantine file %s: %s", self.name, self.quarantine_file, exc)
            return
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("backend") != self.name or "structure_hash" not in entry:
                continue
            self._records[entry["structure_hash"]] = _Record(
                failures=int(entry.get("failures", 1)), formula=entry.get("formula", ""),
                last_error=entry.get("last_error", ""), attempts=entry.get("attempts", []),
                quarantined_at=entry.get("quarantined_at") or time.time(),
            )


@functools.lru_cache(maxsize=None)
def _accepts_cancel(cls: type) -> bool:
    """Whether ``cls.calculate_once`` takes a ``cancel`` keyword (older subclasses do not)."""
    try:
        params = inspect.signature(cls.calculate_once).parameters
    except (TypeError, ValueError):
        return False
    return "cancel" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def merge_settings(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    merged.update(overrides)
    return merged


def check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    """InvalidInput unless ``value`` is a finite positive (or >= 0) number (an integer if asked)."""
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and bool(np.isfinite(value)) and (value >= 0 if allow_zero else value > 0))
    if ok and integer and not float(value).is_integer():
        ok = False
    if not ok:
        kind = "integer" if integer else "number"
        raise InvalidInput(f"{name} must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}")


def checked_kpoints(kpts: Iterable[int] | None, kspacing: float | None) -> tuple[list[int] | None, float | None]:
    """``kpts`` as three positive integers and ``kspacing`` (Å⁻¹) as a positive number, each or None."""
    grid = None if kpts is None else [int(k) for k in kpts]
    if grid is not None and (len(grid) != 3 or min(grid) < 1):
        raise InvalidInput(f"kpts must be three positive integers, got {kpts!r}")
    spacing = None if kspacing is None else float(kspacing)
    if spacing is not None:
        check_positive("kspacing (Å⁻¹)", spacing)
    return grid, spacing


def kpoint_grid(atoms: Atoms, kpts: Iterable[int] | None, kspacing: float | None) -> tuple[int, int, int]:
    """Monkhorst-Pack grid from an explicit ``kpts`` or a ``kspacing`` (Å⁻¹, 2π included).

    ``n_i = max(1, ceil(2π |b_i| / kspacing))`` with ``b_i`` the reciprocal
    vectors without 2π (VASP's KSPACING convention); non-periodic
    directions always get 1.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if kspacing is not None:
        recip = np.linalg.norm(atoms.cell.reciprocal(), axis=1)
        grid = [max(1, int(np.ceil(2 * np.pi * r / kspacing - 1e-9))) for r in recip]
    elif kpts is not None:
        grid = [int(k) for k in kpts]
    else:
        grid = [1, 1, 1]
    return tuple(g if p else 1 for g, p in zip(grid, pbc))  # type: ignore[return-value]
