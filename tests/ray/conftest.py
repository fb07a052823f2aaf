"""A real local Ray for the Ray launcher's tests: one head for the whole test run.

The head is ``ray start --head --block`` in its own process group (start_head), with 2
logical CPUs and one fake logical GPU, no dashboard, a temporary HOME (Ray 2.60 writes
``~/.ray``) and temp dir, and ``RAY_AUTH_MODE`` set explicitly. Clusters on it ask for
fractional CPUs (``SMALL_CPUS``: master 0.1 + 2 shards x 0.2 + 2 workers x 0.5 = 1.5),
so a 2 x 2 cluster fits on the 2 cores. Skipped where Ray is not installed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import pytest

from tests.integration.helpers import services_environment

SMALL_CPUS = {"master": 0.1, "ps": 0.2, "worker": 0.5}
SMALL_CPU_FLAGS = ["--ray-master-cpus", "0.1", "--ray-ps-cpus", "0.2", "--ray-worker-cpus", "0.5"]


@dataclass
class RayHead:
    address: str
    pid: int
    log: str
    home: str


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    pytest.importorskip("ray")
    from client.launchers.ray_cluster import start_head, stop_head

    home = str(tmp_path_factory.mktemp("ray-home"))
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ.update(HOME=home, RAY_AUTH_MODE="disabled")
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="pst-ray-", dir="/tmp")  # short: Ray's socket paths
    log = os.path.join(str(tmp_path_factory.mktemp("ray-head")), "head.log")
    with services_environment():
        address, pid = start_head(log, temp_dir, num_cpus=2, num_gpus=1, timeout=90)
    try:
        yield RayHead(address, pid, log, home)
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        stop_head(pid)
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's session logs and sockets
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
