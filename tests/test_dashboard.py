"""The Grafana dashboard in docs/grafana loads, and asks only for series the agent exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from agent.node.metrics import Metrics
from tests.mqtt_env import REPO, need

DASHBOARD = REPO / "docs" / "grafana" / "prism-agents.json"
#: PromQL words that are not series names (functions are told apart by the "(" after them).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
#: Sample names each metric type adds to the family name.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "info": ("_info",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported() -> set[str]:
    """Every sample name the agent's registry can serve (labelled families have no samples until used)."""
    return {m.name + s for m in Metrics("n", "1").registry.collect() for s in SUFFIXES[m.type]}


def series(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    text = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables: $instance, $__rate_interval, ${x}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
    return {n for n in names if n not in KEYWORDS}


def panels() -> list[dict[str, Any]]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    return [p for p in dash["panels"] if p["type"] != "row"]


def test_the_parser_finds_series_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, ran) (rate(prism_job_latency_seconds_bucket{instance=~"$instance", '
        'stage="total"}[$__rate_interval]))) / on (x) prism_load1 * 8 / 1e6'
    )
    assert series(expr) == {"prism_job_latency_seconds_bucket", "prism_load1"}


def test_the_dashboard_is_panels_with_targets_over_exported_metrics_only() -> None:
    shown = panels()
    assert len({p["id"] for p in shown}) == len(shown)
    known = exported()
    used: set[str] = set()
    for panel in shown:
        assert panel["title"], panel
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no targets"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            names = series(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} selects no series"
            assert names <= known, f"{panel['title']}: not exported: {sorted(names - known)}"
            used |= names
    families = {n.removesuffix(s) for n in used for s in ("_total", "_bucket", "_sum", "_count") if n.endswith(s)}
    families |= used
    # What an operator came for: jobs by mode and outcome, latency, predictions, wire bytes,
    # fallbacks, links, queue and restarts.
    for wanted in (
        "prism_jobs",
        "prism_job_latency_seconds",
        "prism_prediction_ratio",
        "prism_wire_bytes",
        "prism_fallbacks",
        "prism_link_bandwidth_bytes_per_second",
        "prism_queue_jobs",
        "prism_loop_restarts",
        "prism_agent_start_time_seconds",
    ):
        assert wanted in families, wanted


def test_every_query_is_promql_as_prometheus_parses_it(tmp_path: Path) -> None:
    """Each expression, with Grafana's variables filled in, as a recording rule for ``promtool check rules``."""
    fill = {"$instance": ".*", "$__rate_interval": "1m", "$__range": "1h"}
    rules = []
    for i, panel in enumerate(panels()):
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in fill.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            rules.append({"record": f"dashboard:panel{i}:{target['refId'].lower()}", "expr": expr})
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [need("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"promtool check rules: {result.stdout}{result.stderr}"


def test_the_agent_variable_comes_from_a_metric_the_agent_exports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    queries = [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert queries
    for query in queries:
        assert series(query.removeprefix("label_values(").split(",")[0]) <= exported()
