"""Workers on a shard's host push through shared memory, others send frames over gRPC:
the same job gives bit-identical weights either way (one real cluster of each kind)."""
from __future__ import annotations

import numpy as np
import pytest

from client.job import job_to_spec
from pstrain.transport.master_client import MasterClient
from tests.integration.helpers import make_job, running_cluster, wait_job


def _train(handle, name: str) -> list[np.ndarray]:
    master = MasterClient(handle.master_address, connect_timeout=10)
    try:
        status = master.submit(job_to_spec(make_job(epochs=2, num_workers=2, num_shards=2, seed=3), name))
        final = wait_job(master, status["id"], timeout=120)
        assert final["state"] == "SUCCEEDED", final
        return master.export(status["id"])[2]
    finally:
        master.close()


def _ps_logs(handle) -> str:
    return "".join(open(path).read() for path in handle.logs["ps"])


@pytest.fixture(scope="module")
def frames_cluster(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PSTRAIN_SHM", "off")  # the services inherit it
        with running_cluster(tmp_path_factory.mktemp("frames")) as hl:
            yield hl


def test_shared_memory_and_frames_train_the_same_weights(cluster, frames_cluster):
    shared = _train(cluster[0], "transport-shm")
    framed = _train(frames_cluster[0], "transport-frames")
    assert "through shared memory" in _ps_logs(cluster[0])
    assert "through shared memory" not in _ps_logs(frames_cluster[0])
    assert len(shared) == len(framed)
    for a, b in zip(shared, framed):
        assert np.array_equal(a, b)
