"""Write prometheusrule.yaml (a Prometheus Operator PrometheusRule) from rules.yaml.

rules.yaml is the source of truth: it is what `promtool check rules` and
`promtool test rules` read.  Run this after editing it:

    python k8s/monitoring/render_prometheusrule.py

tests/deploy/test_prometheus_rules.py fails when the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = """\
# GENERATED from rules.yaml by render_prometheusrule.py: do not edit by hand.
# Prometheus Operator picks it up when its ruleSelector matches these labels
# (kube-prometheus-stack: add `release: <helm release name>` in an overlay, or
# set ruleSelectorNilUsesHelmValues=false).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_path: Path = HERE / "rules.yaml") -> str:
    groups = yaml.safe_load(rules_path.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "epicycle",
            "labels": {"app.kubernetes.io/name": "epicycle", "app.kubernetes.io/component": "monitoring"},
        },
        "spec": groups,
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def main() -> int:
    out = HERE / "prometheusrule.yaml"
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
