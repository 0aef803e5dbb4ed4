"""Writes packaging/kubernetes/base/prometheusrule.yaml from packaging/prometheus/alerts.yml.

Run with any Python that has PyYAML (`.deps/venv/bin/python`, installed by `make deps`).
"""
import pathlib

import yaml


def block_strings(dumper, text):
    """Multi-line strings (the expressions) as `|` blocks, as written in alerts.yml."""
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


yaml.SafeDumper.add_representer(str, block_strings)

root = pathlib.Path(__file__).resolve().parents[1]
groups = yaml.safe_load((root / "prometheus" / "alerts.yml").read_text())["groups"]
doc = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "syncbridge-agent", "labels": {"prometheus": "k8s", "role": "alert-rules"}},
    "spec": {"groups": groups},
}
header = (
    "# The alert rules of packaging/prometheus/alerts.yml for the Prometheus Operator. Keep the\n"
    "# two equal (the packaging test compares them); regenerate this file after editing alerts.yml:\n"
    "#   .deps/venv/bin/python packaging/prometheus/to-prometheusrule.py\n"
)
(root / "kubernetes" / "base" / "prometheusrule.yaml").write_text(
    header + yaml.safe_dump(doc, sort_keys=False, width=120)
)
