"""The shipped Grafana dashboards and Prometheus names, as data for tests.

``dashboard_exprs()`` lists every PromQL expression in deploy/grafana/dashboards/*.json
(with the dashboard, panel and datasource it came from); ``metric_names()`` and
``label_names()`` pull the names an expression uses; ``METRICS`` is the contract of
metric names and labels the services export (ARCHITECTURE.md: ``pstrain_`` prefix,
base units, labels job/shard/worker/role). ``load_yaml()`` reads the deploy YAML files.

Usage::

    from tests.deploy.dashboard_exprs import dashboard_exprs, metric_names
    for e in dashboard_exprs():
        assert metric_names(e.expr) <= known_series(), e.where
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
DATASOURCE_DIR = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDER_DIR = DEPLOY / "grafana" / "provisioning" / "dashboards"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# ---- the metric contract --------------------------------------------------------------------------
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# name -> (type, labels). Counters are named with their ``_total`` suffix, as exposed.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    # worker
    "pstrain_steps_total": (COUNTER, ("job", "worker")),
    "pstrain_samples_total": (COUNTER, ("job", "worker")),
    "pstrain_loss": (GAUGE, ("job", "worker")),
    "pstrain_accuracy": (GAUGE, ("job", "worker")),
    "pstrain_val_loss": (GAUGE, ("job", "worker")),
    "pstrain_val_accuracy": (GAUGE, ("job", "worker")),
    "pstrain_step_duration_seconds": (HISTOGRAM, ("job", "worker")),
    "pstrain_push_duration_seconds": (HISTOGRAM, ("job", "worker")),
    "pstrain_pull_duration_seconds": (HISTOGRAM, ("job", "worker")),
    "pstrain_sent_bytes_total": (COUNTER, ("job", "role")),
    "pstrain_received_bytes_total": (COUNTER, ("job", "role")),
    # parameter-server shard
    "pstrain_shard_variable_bytes": (GAUGE, ("job", "shard")),
    "pstrain_apply_duration_seconds": (HISTOGRAM, ("job", "shard")),
    "pstrain_gradient_staleness": (HISTOGRAM, ("job", "shard")),
    "pstrain_sync_barrier_wait_seconds": (HISTOGRAM, ("job", "shard")),
    "pstrain_request_queue_depth": (GAUGE, ("role",)),
    "pstrain_rejected_requests_total": (COUNTER, ("job", "shard")),
    "pstrain_shard_version": (GAUGE, ("job", "shard")),
    # master
    "pstrain_jobs_pending": (GAUGE, ()),
    "pstrain_jobs_running": (GAUGE, ()),
    "pstrain_jobs_succeeded": (GAUGE, ()),
    "pstrain_jobs_failed": (GAUGE, ()),
    "pstrain_jobs_cancelled": (GAUGE, ()),
    "pstrain_live_workers": (GAUGE, ("job",)),
    "pstrain_live_nodes": (GAUGE, ("role",)),
    "pstrain_job_step": (GAUGE, ("job",)),
    "pstrain_job_epoch": (GAUGE, ("job",)),
    "pstrain_job_loss": (GAUGE, ("job",)),
    "pstrain_job_accuracy": (GAUGE, ("job",)),
    "pstrain_job_val_accuracy": (GAUGE, ("job",)),
    "pstrain_job_val_loss": (GAUGE, ("job",)),
    "pstrain_worker_step_time_seconds": (GAUGE, ("job", "worker")),
    "pstrain_worker_slot_moves_total": (COUNTER, ("job", "worker")),
    "pstrain_node_restarts_total": (COUNTER, ("role",)),
}
# Labels a query may use: the services' own, plus what Prometheus adds (instance, and le
# on histogram buckets). `job` is the training job's id: prometheus.yml honours it.
QUERY_LABELS = frozenset({"job", "shard", "worker", "role", "instance", "le"})


def known_series() -> set[str]:
    """Every series name a query may select: counters and gauges as named, histograms
    as ``_bucket``, ``_sum`` and ``_count``."""
    names = set()
    for name, (kind, _) in METRICS.items():
        if kind == HISTOGRAM:
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            names.add(name)
    return names


# ---- YAML -----------------------------------------------------------------------------------------
def load_yaml(path_or_text: str | os.PathLike) -> object:
    """Parse YAML (a path or the text itself) with PyYAML. Without PyYAML in this
    environment, borrow the interpreter of Debian's docker-compose v1, which depends on
    it; ``ModuleNotFoundError`` if neither is there."""
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) or (
        isinstance(path_or_text, str) and "\n" not in path_or_text and os.path.exists(path_or_text)) else str(path_or_text)
    try:
        import yaml
    except ModuleNotFoundError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(text)
    python = _python_with_yaml()
    if python is None:
        raise ModuleNotFoundError("reading the deploy YAML files needs PyYAML: `pip install pyyaml`")
    out = subprocess.run([python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                         input=text, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ValueError(f"YAML parse failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def _python_with_yaml() -> str | None:
    compose = shutil.which("docker-compose")
    if compose is None:
        return None
    try:
        with open(compose, "rb") as f:
            first = f.readline().decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None  # a compiled binary (compose v2): no Python inside
    python = first[2:].strip().split()[0]
    if os.path.basename(python) == "env":
        python = shutil.which(first[2:].strip().split()[1]) or ""
    ok = python and subprocess.run([python, "-c", "import yaml"], capture_output=True, timeout=60).returncode == 0
    return python if ok else None


# ---- dashboards -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expr:
    """One PromQL target of a dashboard panel."""

    file: str  # dashboard file name
    dashboard: str  # dashboard uid
    panel: str  # panel title
    ref_id: str
    expr: str
    datasource_uid: str | None  # the target's datasource uid, else its panel's
    instant: bool  # an instant query (tables), not a range

    @property
    def where(self) -> str:
        return f"{self.file}: panel {self.panel!r} target {self.ref_id}"


def dashboard_files(directory: str | os.PathLike = DASHBOARD_DIR) -> list[Path]:
    return sorted(Path(directory).glob("*.json"))


def load_dashboard(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def iter_panels(board: dict) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from iter_panels(panel)  # a row keeps its collapsed panels under "panels"


def _uid(ds) -> str | None:
    if isinstance(ds, dict):
        return ds.get("uid")
    return ds  # old dashboards name the datasource by a string


def dashboard_exprs(directory: str | os.PathLike = DASHBOARD_DIR) -> list[Expr]:
    """Every PromQL expression of every dashboard in ``directory``, in file and panel order."""
    out = []
    for path in dashboard_files(directory):
        board = load_dashboard(path)
        for panel in iter_panels(board):
            for target in panel.get("targets", []):
                if "expr" not in target:
                    continue
                out.append(Expr(
                    file=path.name, dashboard=board.get("uid", ""), panel=panel.get("title", ""),
                    ref_id=target.get("refId", ""), expr=target["expr"],
                    datasource_uid=_uid(target.get("datasource")) or _uid(panel.get("datasource")),
                    instant=bool(target.get("instant")) and not target.get("range", False),
                ))
    return out


def provisioned_datasource_uids(directory: str | os.PathLike = DATASOURCE_DIR) -> dict[str, dict]:
    """uid -> datasource entry, from the Grafana datasource provisioning files."""
    uids = {}
    for path in sorted(Path(directory).glob("*.y*ml")):
        for ds in (load_yaml(path) or {}).get("datasources", []) or []:
            uids[ds.get("uid")] = ds
    return uids


# ---- PromQL, just enough to check names -------------------------------------------------------------
PROMQL_FUNCTIONS = frozenset("""
abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min count_over_time
day_of_month day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg
histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
holt_winters hour idelta increase irate label_join label_replace last_over_time ln log10 log2
mad_over_time max_over_time min_over_time minute month predict_linear present_over_time
quantile_over_time rate resets round scalar sgn sort sort_desc sqrt stddev_over_time stdvar_over_time
sum_over_time time timestamp vector year
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
""".split())
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on",
                             "ignoring", "group_left", "group_right", "atan2"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_DURATION = re.compile(r"(?<![A-Za-z0-9_:.])(?:[0-9]+(?:ms|[smhdwy]))+(?![A-Za-z0-9_:])")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:.])(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)")


def balanced(expr: str) -> bool:
    """Whether (), [] and {} nest properly outside string literals."""
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in _STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def _parts(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(series names, label names, function names) an expression uses."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for m in _MATCHERS.finditer(text):
        labels |= {l.strip() for l in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(1))}
        names = re.findall(r'__name__\s*=\s*""', m.group(1))
        if names:
            raise ValueError(f"select series by name, not by __name__ matchers: {expr}")
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for m in _GROUPING.finditer(text):
        labels |= {l.strip() for l in m.group(2).split(",") if l.strip()}
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", _DURATION.sub(" ", text))
    series, functions = set(), set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        if word in PROMQL_KEYWORDS:
            continue
        if rest.startswith("("):
            functions.add(word)
        else:
            series.add(word)
    return series, labels, functions


def metric_names(expr: str) -> set[str]:
    """The series names ``expr`` selects (``pstrain_apply_duration_seconds_bucket``, ...)."""
    return _parts(expr)[0]


def label_names(expr: str) -> set[str]:
    """The label names ``expr`` matches on or groups by."""
    return _parts(expr)[1]


def function_names(expr: str) -> set[str]:
    """The functions and aggregations ``expr`` calls."""
    return _parts(expr)[2]


def base_metric(series: str) -> str:
    """``pstrain_x_seconds_bucket`` -> ``pstrain_x_seconds`` for a histogram, else the name."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and METRICS.get(series[: -len(suffix)], ("",))[0] == HISTOGRAM:
            return series[: -len(suffix)]
    return series
