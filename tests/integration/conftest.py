"""Fixtures for the end-to-end tests of the distributed runtime (helpers: helpers.py).

Clusters are real local processes on port 0 with state in pytest's temporary
directories, and are always stopped (and checked gone) in teardown.
"""
from __future__ import annotations

import pytest

from tests.integration.helpers import running_cluster, write_job


@pytest.fixture(scope="session")
def digits_jobfile(tmp_path_factory) -> str:
    """A 3-epoch digits job file (about a second of training on two workers)."""
    return write_job(tmp_path_factory.mktemp("jobs"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A module's shared cluster: 2 workers, 2 ps shards (yields (handle, launcher))."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as hl:
        yield hl


@pytest.fixture(scope="module")
def master(cluster):
    from pstrain.transport.master_client import MasterClient

    client = MasterClient(cluster[0].master_address, connect_timeout=10)
    yield client
    client.close()
