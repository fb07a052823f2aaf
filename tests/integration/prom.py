"""A real Prometheus server for tests (Debian's ``prometheus`` binary).

``prometheus_server(targets)`` starts Prometheus on 127.0.0.1 (a free port) with a
temporary config and data directory, scraping ``targets`` ("host:port" of /metrics
endpoints) every second, and stops it afterwards. Targets live in a file_sd file, so
``set_targets`` can change them while it runs.

The scrape config uses ``honor_labels: true``: pstrain's ``job`` label is the job id,
and without it Prometheus would rename it ``exported_job`` and put its scrape-job
name in ``job`` (deploy/prometheus must do the same).

Usage::

    with prometheus_server(["127.0.0.1:9464"]) as prom:
        prom.wait_for("up", lambda r: len(r) == 1)
        prom.query('sum by (job) (pstrain_steps_total)')   # -> the result vector
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterator

from pstrain.transport.ports import unused_port

SCRAPE_JOB = "pstrain"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def cluster_targets(handle, master_client) -> list[str]:
    """The /metrics addresses of a launched cluster: the master's, then every live node's."""
    nodes = [n["metrics_address"] for n in master_client.nodes() if n["alive"] and n["metrics_address"]]
    return [handle.metrics_address, *nodes] if handle.metrics_address else nodes


class PrometheusServer:
    def __init__(self, url: str, targets_file: str, proc: subprocess.Popen, log_path: str):
        self.url, self.targets_file, self.proc, self.log_path = url, targets_file, proc, log_path

    def set_targets(self, targets: list[str]) -> None:
        """Scrape these "host:port" addresses from now on (Prometheus rereads the file)."""
        tmp = self.targets_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump([{"targets": list(targets)}], f)
        os.replace(tmp, self.targets_file)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus's reason
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list:
        """An instant query; returns its result vector ([] when nothing matches)."""
        data = self.api("/api/v1/query", query=promql)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def wait_for(self, promql: str, done: Callable[[list], bool] = bool, timeout: float = 60.0) -> list:
        """Poll ``promql`` until ``done(result)`` holds; fail with the last result otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if done(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql!r} did not get there within {timeout:.0f}s; last result: {result}")
            time.sleep(0.5)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]


@contextlib.contextmanager
def prometheus_server(targets: list[str], scrape_interval: str = "1s", start_timeout: float = 60.0,
                      directory: str | None = None, targets_file: str | None = None,
                      credentials_file: str | None = None) -> Iterator[PrometheusServer]:
    """Run Prometheus scraping ``targets`` for the ``with`` block (see the module docstring);
    or, with ``targets_file``, the file_sd targets someone else writes there (a launcher's).
    ``credentials_file``: the bearer token the targets ask for (a launcher's metrics.token)."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("the prometheus binary is not on PATH (Debian: apt-get install prometheus)")
    with contextlib.ExitStack() as stack:
        root = directory or stack.enter_context(tempfile.TemporaryDirectory(prefix="pstrain-prom-"))
        given = targets_file
        config_path, targets_file = os.path.join(root, "prometheus.yml"), given or os.path.join(root, "targets.json")
        config = {  # JSON is YAML
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{
                "job_name": SCRAPE_JOB, "honor_labels": True, "scrape_timeout": scrape_interval,
                "file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}],
            }],
        }
        if credentials_file:
            config["scrape_configs"][0]["authorization"] = {"credentials_file": credentials_file}
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        port = unused_port()
        log_path = os.path.join(root, "prometheus.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config_path}", f"--storage.tsdb.path={os.path.join(root, 'data')}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", targets_file, proc, log_path)
        try:
            if given is None:
                server.set_targets(targets)
            _wait_ready(server, start_timeout)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {server.proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus was not ready within {timeout:.0f}s:\n{server.log()}")
        time.sleep(0.2)
