"""Numba's on-disk cache, told that the kernels span several files.

numba keys a cached function on the source of the file that defines it, and nothing else.
The entry points of this package (:func:`~.assemble.assemble`,
:func:`~.covariance.prediction_covariance`, ...) inline kernels from the other modules
(``inline="always"``, see the fastmath rule in :mod:`.common`), so after an edit of, say,
``twobody.py`` numba would load the stale compiled ``prediction_covariance`` from
``covariance.py``'s cache.  While the kernels were one file, the file stamp covered it all;
this module restores that: the stamp of every function defined in this package also holds
a SHA-256 of all the package's sources, so an edit of any of them recompiles every entry
point.  Where the cache lives (``NUMBA_CACHE_DIR``, ``__pycache__``, ...) is still decided by
numba's own locators.

This uses numba's locator classes (``numba.core.caching``), which are not a documented
API; ``tests/learner/test_determinism.py`` checks that the stamp is in effect, so a numba
upgrade that changes them fails a test instead of silently caching stale code.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core import caching

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def package_digest() -> str:
    """SHA-256 (hex) of the names and bytes of every ``*.py`` file of this package."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


class PackageSourceLocator(caching._CacheLocator):
    """numba's usual locator for a function of this package, with the package digest
    added to its source stamp."""

    def __init__(self, inner):
        self._inner = inner
        self._py_file = inner._py_file

    def ensure_cache_path(self):
        self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_disambiguator(self):
        return self._inner.get_disambiguator()

    def get_source_stamp(self):
        return (self._inner.get_source_stamp(), package_digest())

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            if Path(py_file).resolve().parent != PACKAGE_DIR:
                return None
        except OSError:
            return None
        for other in caching.CacheImpl._locator_classes:
            if other is cls:
                continue
            inner = other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner)
        return None


def install() -> None:
    """Put :class:`PackageSourceLocator` first in numba's locator list (idempotent); must
    run before the first ``@njit(cache=True)`` of the package is decorated."""
    classes = caching.CacheImpl._locator_classes
    if PackageSourceLocator not in classes:
        classes.insert(0, PackageSourceLocator)
