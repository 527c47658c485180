"""Read the Grafana dashboard's PromQL so tests can check or evaluate it.

``panel_queries(path)`` lists ``(panel_title, expr)`` for every query target of
every panel (rows included when they hold collapsed panels), with Grafana's
template variables replaced so that the text is plain PromQL a Prometheus
server accepts::

    from .dashboard import DASHBOARD, panel_queries     # inside tests/deploy/
    for title, expr in panel_queries(DASHBOARD):
        prometheus.query(expr)          # e.g. against an embedded run

Substitutions (override with ``variables=``): ``$namespace`` -> ``.*`` (every
query selects ``namespace=~"$namespace"``; ``.*`` also matches series without a
namespace label, as from a plain scrape of an embedded run), ``$__rate_interval`` -> ``1m``,
``$__interval`` -> ``15s``, ``$__range`` -> ``1h``.  ``raw=True`` returns the
expressions untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "dashboards" / "epicycle.json"

DEFAULT_VARIABLES = {
    "namespace": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def load(path: str | Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def iter_panels(dashboard: dict):
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


def panel_queries(path: str | Path = DASHBOARD, variables: dict[str, str] | None = None,
                  raw: bool = False) -> list[tuple[str, str]]:
    """``[(panel_title, expr), ...]`` for every Prometheus target of every panel, in dashboard order."""
    out: list[tuple[str, str]] = []
    for panel in iter_panels(load(path)):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            out.append((panel.get("title", ""), expr if raw else substitute(expr, variables)))
    return out
