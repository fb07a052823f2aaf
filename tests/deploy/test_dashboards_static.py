"""The shipped Grafana dashboards, checked without Grafana or Prometheus running: valid
dashboard JSON, PromQL that parses and names only metrics the services export, and
datasources that provisioning creates. (A live Prometheus runs these expressions in
the metrics acceptance test; the helpers are in dashboard_exprs.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.deploy.dashboard_exprs import (
    METRICS,
    PROMQL_FUNCTIONS,
    QUERY_LABELS,
    balanced,
    base_metric,
    dashboard_exprs,
    dashboard_files,
    function_names,
    iter_panels,
    known_series,
    label_names,
    load_dashboard,
    metric_names,
    provisioned_datasource_uids,
)

DASHBOARDS = {
    "pstrain-cluster-overview": "cluster overview",
    "pstrain-job-convergence": "job convergence",
    "pstrain-shard-load": "shard load",
    "pstrain-worker-health": "worker health",
}
PANEL_TYPES = {"timeseries", "stat", "table", "row"}
EXPRS = dashboard_exprs()


def _datasource_uids() -> dict:
    try:
        return provisioned_datasource_uids()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def test_the_four_dashboards_ship():
    boards = {load_dashboard(p)["uid"]: p for p in dashboard_files()}
    assert set(boards) == set(DASHBOARDS), sorted(boards)
    for uid, path in boards.items():
        assert path.stem == uid, f"{path.name}: name the file after its uid ({uid}.json)"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path):
    board = load_dashboard(path)
    assert board["title"].startswith("pstrain / ") and 36 <= board["schemaVersion"] <= 41
    assert board.get("templating", {}).get("list", []) == [], (
        "no template variables: every expression must run as written (the Prometheus test runs them)")
    ids = [p["id"] for p in iter_panels(board)]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for panel in iter_panels(board):
        where = f"{path.name}: panel {panel.get('title')!r}"
        assert panel["type"] in PANEL_TYPES, f"{where}: type {panel['type']!r}; use one of {sorted(PANEL_TYPES)}"
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{where}: gridPos {g}"
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{where}: no PromQL"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds {refs}"


def test_expressions_found():
    assert len(EXPRS) >= 40
    assert {e.dashboard for e in EXPRS} == set(DASHBOARDS)


@pytest.mark.parametrize("e", EXPRS, ids=lambda e: f"{e.dashboard}/{e.panel}/{e.ref_id}")
def test_expression_uses_only_known_names(e):
    assert balanced(e.expr), f"{e.where}: unbalanced brackets in {e.expr}"
    series = metric_names(e.expr)
    assert series, f"{e.where}: selects no metric: {e.expr}"
    unknown = series - known_series()
    assert not unknown, (f"{e.where}: {sorted(unknown)} is not a pstrain metric (histograms as "
                         f"_bucket/_sum/_count): {e.expr}")
    functions = function_names(e.expr)
    for s in series:
        if s.endswith("_bucket"):
            assert "histogram_quantile" in functions, f"{e.where}: raw buckets of {s}; take a quantile"
        if s.endswith(("_bucket", "_total")):
            assert functions & {"rate", "irate", "increase"}, (
                f"{e.where}: {s} is a counter; chart its rate, not its running total")
    bad_labels = label_names(e.expr) - QUERY_LABELS
    assert not bad_labels, f"{e.where}: labels {sorted(bad_labels)}; pstrain labels are {sorted(QUERY_LABELS)}"
    bad_functions = function_names(e.expr) - PROMQL_FUNCTIONS
    assert not bad_functions, f"{e.where}: {sorted(bad_functions)} is not a PromQL function"


def test_expressions_reference_provisioned_datasources():
    uids = _datasource_uids()
    assert "prometheus" in uids and uids["prometheus"]["type"] == "prometheus"
    for e in EXPRS:
        assert e.datasource_uid in uids, f"{e.where}: datasource uid {e.datasource_uid!r} is not provisioned"
    for path in dashboard_files():
        for panel in iter_panels(load_dashboard(path)):
            if panel["type"] != "row":
                assert (panel.get("datasource") or {}).get("uid") in uids, f"{path.name}: {panel['title']!r}"


def test_every_metric_is_on_a_dashboard():
    shown = {base_metric(s) for e in EXPRS for s in metric_names(e.expr)}
    assert set(METRICS) <= shown, f"not on any dashboard: {sorted(set(METRICS) - shown)}"


def test_dashboards_answer_the_issue():
    """Each dashboard shows what it is for (the issue's list)."""
    by_board: dict[str, set[str]] = {}
    for e in EXPRS:
        by_board.setdefault(e.dashboard, set()).update(base_metric(s) for s in metric_names(e.expr))
    assert {"pstrain_jobs_running", "pstrain_live_nodes", "pstrain_steps_total",
            "pstrain_request_queue_depth"} <= by_board["pstrain-cluster-overview"]
    assert {"pstrain_job_loss", "pstrain_job_accuracy", "pstrain_job_val_accuracy", "pstrain_job_step",
            "pstrain_gradient_staleness"} <= by_board["pstrain-job-convergence"]
    assert {"pstrain_shard_variable_bytes", "pstrain_apply_duration_seconds",
            "pstrain_received_bytes_total"} <= by_board["pstrain-shard-load"]
    assert {"pstrain_step_duration_seconds", "pstrain_worker_step_time_seconds",
            "pstrain_push_duration_seconds"} <= by_board["pstrain-worker-health"]
    exprs = {e.expr for e in EXPRS}
    assert "sum by (job) (rate(pstrain_steps_total[1m]))" in exprs
    assert any(e.startswith("max by (job) (pstrain_shard_variable_bytes) / avg by (job)") for e in exprs)  # hot spot
    assert any("/ on (job) group_left avg by (job) (pstrain_worker_step_time_seconds)" in e for e in exprs)  # stragglers


def test_expressions_parse_with_promtool(tmp_path):
    """Prometheus's own parser: each expression as a recording rule, checked by promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it; `make system-deps`)")
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e.expr} for i, e in enumerate(EXPRS)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_contract_matches_the_services():
    """METRICS (what dashboards may use) is what the services' registries define."""
    from master.metrics import MasterMetrics
    from psserver.metrics import PSMetrics
    from worker.metrics import WorkerMetrics

    exported = {}
    for metrics in (MasterMetrics(), PSMetrics(), WorkerMetrics()):
        for family in metrics.registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            exported[name] = family.type
    for name, (kind, _) in METRICS.items():
        assert exported.get(name) == kind, f"{name}: the services export {exported.get(name)!r}, not {kind}"
