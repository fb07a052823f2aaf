"""The /metrics HTTP server every service runs: only /metrics answers, and with a
metrics token only to ``Authorization: Bearer <token>``."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from protos.observability import ServiceMetrics, metrics_token, serve_metrics


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def registry():
    reg = CollectorRegistry()
    Counter("pstrain_test_things", "Things counted by the test.", registry=reg).inc(3)
    return reg


def test_only_metrics_answers(registry):
    server = serve_metrics(registry, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "pstrain_test_things_total 3.0" in body
        for path in ("/", "/metrics/../etc", "/other", "/favicon.ico"):
            assert _get(base + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_a_metrics_token_is_required_when_set(registry, monkeypatch, tmp_path):
    server = serve_metrics(registry, "127.0.0.1", 0, token="scrape-secret")
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        assert _get(url)[0] == 401 and _get(url, "wrong")[0] == 401 and _get(url, "")[0] == 401
        status, body = _get(url, "scrape-secret")
        assert status == 200 and "pstrain_test_things_total" in body
    finally:
        server.shutdown()
        server.server_close()
    (tmp_path / "t").write_text("from-file\n")
    monkeypatch.setenv("PSTRAIN_METRICS_TOKEN_FILE", str(tmp_path / "t"))
    assert metrics_token() == "from-file"
    monkeypatch.setenv("PSTRAIN_METRICS_TOKEN", "from-env")
    assert metrics_token() == "from-env"


def test_a_service_serves_with_the_environment_token(monkeypatch, registry):
    monkeypatch.setenv("PSTRAIN_METRICS_TOKEN", "env-token")
    metrics = ServiceMetrics(registry)
    address = metrics.serve("127.0.0.1", 0)
    try:
        assert _get(f"http://{address}/metrics")[0] == 401
        assert _get(f"http://{address}/metrics", "env-token")[0] == 200
    finally:
        metrics.http_server.shutdown()
        metrics.http_server.server_close()
