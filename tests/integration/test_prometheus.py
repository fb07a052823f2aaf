"""Every pstrain metric reaches a real Prometheus.

A local cluster (master, 2 shards, 2 workers, all serving /metrics on free ports)
trains a short sync job and then a short async job (so gradient staleness has
samples) while a real Prometheus (Debian's ``prometheus``, on 127.0.0.1 with a
temporary config and data directory) scrapes the master and every node ListNodes
reports. Its HTTP API must then return samples for every name in the three
services' ``ALL_METRICS``, with the label sets the style guide allows and values
that agree with the jobs' recorded progress.
"""
from __future__ import annotations

import os
import time

import pytest

from master import metrics as master_metrics
from psserver import metrics as ps_metrics
from tests.integration.helpers import running_cluster, wait_job
from tests.integration.prom import cluster_targets, prometheus_binary, prometheus_server
from worker import metrics as worker_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None,
                       reason="needs the prometheus binary on PATH (apt-get install prometheus; make test installs it)"),
]

MODULES = (master_metrics, ps_metrics, worker_metrics)
# What may label a pstrain series: the style guide's four, plus what Prometheus adds
# (instance; job for series without one of their own) and histogram buckets.
ALLOWED_LABELS = {"__name__", "job", "shard", "worker", "role", "instance", "le"}
EPOCHS = 2


def _digits_spec(mode: str, name: str):
    from client import nn
    from client.job import Job, job_to_spec

    model = nn.Sequential([nn.Dense(32, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")], seed=3)
    model.compile(nn.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return job_to_spec(Job(model, dataset="digits", batch_size=64, epochs=EPOCHS, mode=mode), name=name)


def _series(name: str) -> str:
    histograms = {h for m in MODULES for h in m.HISTOGRAMS}
    return f"{name}_count" if name in histograms else name


def _value(result: list) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """(prometheus, sync job status, async job status) once both jobs ran and were scraped."""
    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path_factory.mktemp("cluster"), workers=2, ps=2) as (handle, _):
        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            targets = cluster_targets(handle, client)
            assert len(targets) == 5, f"expected the master, 2 shards and 2 workers to serve /metrics: {targets}"
            with prometheus_server(targets, credentials_file=os.path.join(handle.state_dir, "metrics.token")) as prom:
                prom.wait_for("up == 1", lambda r: len(r) == len(targets), timeout=30)
                # Submitted together: the async job waits (PENDING) for the sync job's workers.
                sync_id = client.submit(_digits_spec("sync", "prom-sync"))["id"]
                async_id = client.submit(_digits_spec("async", "prom-async"))["id"]
                sync, async_ = wait_job(client, sync_id, timeout=180), wait_job(client, async_id, timeout=180)
                assert (sync["state"], async_["state"]) == ("SUCCEEDED", "SUCCEEDED"), (sync, async_)
                ended = time.time()
                prom.wait_for(f"timestamp(up) > {ended:.3f}", lambda r: len(r) == len(targets), timeout=30)
                yield prom, sync, async_
        finally:
            client.close()


def test_every_metric_has_samples(scraped):
    prom, _, _ = scraped
    names = [n for m in MODULES for n in m.ALL_METRICS]
    missing = [n for n in names if not prom.query(_series(n))]
    assert not missing, f"no samples in Prometheus for {missing}"


def test_series_carry_only_the_allowed_labels(scraped):
    prom, _, _ = scraped
    for result in prom.query('{__name__=~"pstrain_.+"}'):
        extra = set(result["metric"]) - ALLOWED_LABELS
        assert not extra, f"{result['metric']['__name__']} has labels {sorted(extra)}; allowed: job, shard, worker, role"


def test_labels_name_the_job_worker_shard_and_role(scraped):
    prom, sync, async_ = scraped
    for job in (sync["id"], async_["id"]):
        workers = {r["metric"]["worker"] for r in prom.query(f'pstrain_steps_total{{job="{job}"}}')}
        assert workers == {"0", "1"}, workers
        shards = {r["metric"]["shard"] for r in prom.query(f'pstrain_shard_version{{job="{job}"}}')}
        assert shards == {"0", "1"}, shards
        for role in ("ps", "worker"):
            assert prom.query(f'pstrain_sent_bytes_total{{job="{job}", role="{role}"}} > 0'), (job, role)
            assert prom.query(f'pstrain_received_bytes_total{{job="{job}", role="{role}"}} > 0'), (job, role)
        reasons = [f"pstrain_rejected_{r}_total" for r in ps_metrics.REJECT_REASONS]
        for name in ["pstrain_rejected_requests_total", *reasons]:
            assert len(prom.query(f'{name}{{job="{job}"}}')) == 2, name  # one per shard, at zero
    assert {r["metric"]["role"] for r in prom.query("pstrain_request_queue_depth")} == {"master", "ps"}
    assert {r["metric"]["role"]: float(r["value"][1]) for r in prom.query("pstrain_live_nodes")} == \
        {"ps": 2.0, "worker": 2.0}


def test_values_agree_with_the_jobs(scraped):
    prom, sync, async_ = scraped
    s, a = sync["id"], async_["id"]
    # Sync: each of the 2 workers takes every step; each shard's version is the step count.
    steps = _value(prom.query(f'pstrain_job_step{{job="{s}"}}'))
    assert steps == sync["step"] > 0
    assert _value(prom.query(f'sum(pstrain_steps_total{{job="{s}"}})')) == 2 * steps
    assert {float(r["value"][1]) for r in prom.query(f'pstrain_shard_version{{job="{s}"}}')} == {steps}
    assert _value(prom.query(f'sum(pstrain_sync_barrier_wait_seconds_count{{job="{s}"}})')) == 2 * steps
    assert _value(prom.query(f'sum(pstrain_apply_duration_seconds_count{{job="{s}"}})')) == 2 * steps
    assert _value(prom.query(f'pstrain_job_epoch{{job="{s}"}}')) == EPOCHS
    # Async: every push is applied on both shards and observed as staleness there; sync has none.
    pushes = _value(prom.query(f'sum(pstrain_steps_total{{job="{a}"}})'))
    assert _value(prom.query(f'sum(pstrain_gradient_staleness_count{{job="{a}"}})')) == 2 * pushes
    assert _value(prom.query(f'sum(pstrain_gradient_staleness_count{{job="{s}"}})')) == 0
    # Samples: every training example once per epoch, over the workers.
    assert _value(prom.query(f'sum(pstrain_samples_total{{job="{s}"}})')) == \
        _value(prom.query(f'sum(pstrain_samples_total{{job="{a}"}})'))
    # The master's view matches the job's final status; nothing was refused.
    assert _value(prom.query(f'pstrain_job_val_accuracy{{job="{s}"}}')) == pytest.approx(
        sync["metrics"]["val_accuracy"])
    assert _value(prom.query(f'pstrain_live_workers{{job="{s}"}}')) == 0
    assert _value(prom.query("sum(pstrain_rejected_requests_total)")) == 0
    assert _value(prom.query("pstrain_jobs_running")) == 0


def test_every_dashboard_query_returns_data(scraped):
    """Each PromQL expression of the shipped Grafana dashboards, run against the
    Prometheus that scraped the cluster, returns a non-empty result."""
    from tests.deploy.dashboard_exprs import dashboard_exprs

    prom, _, _ = scraped
    exprs = dashboard_exprs()
    assert exprs, "no dashboard expressions found"
    empty = [f"{e.where}: {e.expr}" for e in exprs if not prom.query(e.expr)]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
