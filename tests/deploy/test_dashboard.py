"""The provisioned Grafana dashboard only queries metrics the service really exports.

The set of exported names comes from the service itself (`Metrics().exported_names()`), so a
renamed metric breaks this test instead of silently leaving an empty panel.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.deploy_files import COMPOSE_FILE, DATASOURCES, load_compose, load_dashboard

# --------------------------------------------------------------------------- helpers


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def iter_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel, target


_PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "start", "end",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier (not the tail of a number or of another word) that is not a function call.
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_SENSOR_NAME = re.compile(r"\bsensor_[a-z0-9_]+")


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression.

    Drops strings, Grafana variables, label matchers, range/subquery brackets and by/without/on
    label lists, then keeps the identifiers that are not function calls or keywords.
    """
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VARIABLE.sub("1m", text)
    text = _LABEL_MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _PROMQL_KEYWORDS}


def provisioned_prometheus() -> dict[str, Any]:
    """The Prometheus datasource from deploy/grafana/provisioning/datasources/*.yml."""
    found = []
    for path in sorted(DATASOURCES.glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        found += [ds for ds in doc.get("datasources", []) if ds.get("type") == "prometheus"]
    assert len(found) == 1, f"expected one provisioned Prometheus datasource, got {found}"
    datasource: dict[str, Any] = found[0]
    return datasource


DASHBOARD = load_dashboard()
TARGETS = list(iter_targets(DASHBOARD))
TARGET_IDS = [f"{panel['title']}/{target.get('refId', '?')}" for panel, target in TARGETS]

# Metrics the brief asks the dashboard to show (each must appear in at least one expression).
REQUIRED_METRICS = {
    "sensor_predictions_total",
    "sensor_predictions_by_cluster_total",
    "sensor_drift_score",
    "sensor_drift_threshold",
    "sensor_drift_detected",
    "sensor_drift_p_value",
    "sensor_drift_p_value_threshold",
    "sensor_prediction_latency_seconds_bucket",
    "sensor_backlog_readings",
    "sensor_model_version",
    "sensor_model_info",
    "sensor_bad_readings_total",
    "sensor_model_load_failures_total",
    "sensor_wakeups_total",
    "sensor_batch_size_bucket",
    "sensor_batch_duration_seconds_bucket",
    "sensor_ready",
    # shadow scoring: the candidate, its agreement with the active model, its own drift
    "sensor_shadow_candidate_info",
    "sensor_shadow_agreement_ari",
    "sensor_shadow_same_id_ratio",
    "sensor_shadow_drift_score",
    "sensor_shadow_failures_total",
}


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    from sensor_predictor.metrics import Metrics

    names = Metrics().exported_names()
    assert names, "Metrics().exported_names() is empty"
    return names


# --------------------------------------------------------------------------- the extractor


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sensor_ready", {"sensor_ready"}),
        (
            'histogram_quantile(0.95, sum by (le) (rate(x_bucket{job="a", le!="+Inf"}[5m])))',
            {"x_bucket"},
        ),
        (
            "sum(rate(a_total[1m])) / sum without (instance) (rate(b_total[1m]))",
            {"a_total", "b_total"},
        ),
        ("increase(c_total[$__range]) > 0 and on (instance) d == 1e3", {"c_total", "d"}),
        ("max by (model_name, run_id) (sensor_model_info) offset 5m", {"sensor_model_info"}),
        ('count_values("v", sensor_model_version)', {"sensor_model_version"}),
        ("rate(e_total[5m:30s]) * on (job) group_left (version) f", {"e_total", "f"}),
    ],
)
def test_metric_name_extraction(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_is_provisionable() -> None:
    assert DASHBOARD.get("uid"), "a provisioned dashboard needs a fixed uid"
    assert DASHBOARD.get("id") is None, "provisioned dashboards must not carry a database id"
    assert DASHBOARD.get("title")
    assert 36 <= DASHBOARD["schemaVersion"] <= 45
    assert TARGETS, "the dashboard has no queries"


def test_panel_ids_and_layout() -> None:
    panels = list(iter_panels(DASHBOARD["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0, panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the 24-column grid"


def test_datasource_is_provisioned_with_fixed_uid() -> None:
    ds = provisioned_prometheus()
    assert ds.get("uid"), "the Prometheus datasource needs a fixed uid for the dashboard"
    # ... and it points at the compose service that runs Prometheus.
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in load_compose()["services"], f"no prometheus service in {COMPOSE_FILE}"


def test_every_panel_uses_the_provisioned_datasource() -> None:
    uid = provisioned_prometheus()["uid"]
    for panel in iter_panels(DASHBOARD["panels"]):
        if panel["type"] == "row":
            assert not panel.get("targets"), f"row {panel['title']!r} has queries"
            continue
        ds = panel.get("datasource")
        assert isinstance(ds, dict), f"panel {panel['title']!r} has no datasource object"
        assert ds.get("uid") == uid, f"panel {panel['title']!r} uses datasource {ds}"
        assert ds.get("type") == "prometheus", panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            tds = target.get("datasource", ds)
            assert tds.get("uid") == uid, f"{panel['title']}/{target.get('refId')} uses {tds}"


@pytest.mark.parametrize(("panel", "target"), TARGETS, ids=TARGET_IDS)
def test_expression_uses_only_exported_metrics(
    panel: dict[str, Any], target: dict[str, Any], exported_names: set[str]
) -> None:
    expr = target.get("expr", "")
    assert expr.strip(), f"panel {panel['title']!r} target {target.get('refId')} has no expr"
    names = metric_names(expr)
    assert names, f"no metric name found in {expr!r}"
    # The plain regex from the brief must not find anything the extractor missed.
    assert set(_SENSOR_NAME.findall(expr)) <= names, expr
    unknown = names - exported_names
    assert not unknown, (
        f"panel {panel['title']!r} queries {sorted(unknown)}, which the service does not export "
        f"(exported: {sorted(exported_names)})"
    )


@pytest.mark.parametrize(("panel", "target"), TARGETS, ids=TARGET_IDS)
def test_no_hard_coded_cluster_ids(panel: dict[str, Any], target: dict[str, Any]) -> None:
    expr = target["expr"]
    assert not re.search(r"\bcluster_id\s*(=|!=|=~|!~)", expr), (
        f"{panel['title']!r} selects specific clusters: {expr}"
    )


def test_no_overrides_for_specific_clusters() -> None:
    for panel in iter_panels(DASHBOARD["panels"]):
        for override in panel.get("fieldConfig", {}).get("overrides", []):
            options = str(override.get("matcher", {}).get("options", ""))
            assert "cluster" not in options.lower(), (
                f"{panel['title']!r} has an override for a specific cluster series: {override}"
            )


def test_required_metrics_are_on_the_dashboard() -> None:
    used = set().union(*(metric_names(t["expr"]) for _, t in TARGETS))
    missing = REQUIRED_METRICS - used
    assert not missing, f"no panel shows {sorted(missing)}"


def test_by_cluster_panel_groups_by_cluster_id() -> None:
    exprs = [t["expr"] for _, t in TARGETS if "sensor_predictions_by_cluster_total" in t["expr"]]
    assert exprs
    assert any(re.search(r"\bby\s*\(\s*cluster_id\s*\)", e) for e in exprs), exprs


def test_latency_quantiles() -> None:
    exprs = [t["expr"] for _, t in TARGETS]
    for q in ("0.5", "0.95", "0.99"):
        pattern = (
            rf"histogram_quantile\(\s*{re.escape(q)}\s*,\s*sum by \(le\) "
            r"\(rate\(sensor_prediction_latency_seconds_bucket\["
        )
        assert any(re.search(pattern, e) for e in exprs), f"no p{q} latency query"


def test_drift_score_and_threshold_share_a_panel() -> None:
    for panel in iter_panels(DASHBOARD["panels"]):
        names = set().union(*(metric_names(t["expr"]) for t in panel.get("targets", [])), set())
        if {"sensor_drift_score", "sensor_drift_threshold"} <= names:
            return
    pytest.fail("no panel draws sensor_drift_score together with sensor_drift_threshold")


def test_drift_p_value_and_its_threshold_share_a_log_scale_panel() -> None:
    for panel in iter_panels(DASHBOARD["panels"]):
        exprs = [t["expr"].strip() for t in panel.get("targets", [])]
        if "sensor_drift_p_value" in exprs and "sensor_drift_p_value_threshold" in exprs:
            scale = panel["fieldConfig"]["defaults"]["custom"]["scaleDistribution"]
            assert scale["type"] == "log", "p-values span decades: a linear axis hides them"
            return
    pytest.fail("no panel draws sensor_drift_p_value together with its threshold")
