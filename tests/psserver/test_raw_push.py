"""The raw-frame push (PushRaw), the path workers take every step, over real gRPC."""
import json
import os

import grpc
import numpy as np
import pytest

from psserver.config import PSConfig
from psserver.service import serve
from pstrain.transport.ps_client import ParameterServerClient


@pytest.fixture
def shard():
    server, port, servicer = serve(PSConfig(port=0))
    client = ParameterServerClient(f"127.0.0.1:{port}", timeout=10)
    variables = {"w[0:2]": np.ones((2, 3), np.float32), "b[0:3]": np.zeros(3, np.float32)}
    client.init_shard("job-raw", 0, variables, set(variables), json.dumps({"name": "sgd", "learning_rate": 1.0}),
                      "sync", 0, [0])
    yield client
    client.close()
    server.stop(grace=None)
    servicer.close()


def _push(client, step, grads, **kw):
    frame = client.push_frame("job-raw", 0, step, grads, pull=True, min_version=step + 1, **kw)
    return client.read_reply(client.raw_push(frame, timeout=10))


def test_raw_push_applies_and_returns_the_new_parameters(shard):
    g = {"w[0:2]": np.full((2, 3), 0.5, np.float32), "b[0:3]": np.ones(3, np.float32)}
    version, duplicate, params = _push(shard, 0, g)
    assert (version, duplicate) == (1, False)
    np.testing.assert_array_equal(params["w[0:2]"], np.full((2, 3), 0.5, np.float32))
    np.testing.assert_array_equal(params["b[0:3]"], -np.ones(3, np.float32))
    # the same frame again is a duplicate: acknowledged, not applied twice
    version, duplicate, params = _push(shard, 0, g)
    assert duplicate and version == 1
    np.testing.assert_array_equal(params["b[0:3]"], -np.ones(3, np.float32))


@pytest.mark.parametrize("bad", [np.full((2, 3), np.nan, np.float32), np.ones((3, 2), np.float32),
                                 np.ones((2, 3), np.float64)])
def test_bad_raw_pushes_are_rejected_and_change_nothing(shard, bad):
    with pytest.raises(grpc.RpcError) as err:
        _push(shard, 0, {"w[0:2]": bad})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "w[0:2]" in err.value.details()
    _, params = shard.pull("job-raw", 0, 0)
    np.testing.assert_array_equal(params["w[0:2]"], np.ones((2, 3), np.float32))


def test_a_malformed_frame_is_invalid_argument(shard):
    with pytest.raises(grpc.RpcError) as err:
        shard.raw_push(b"PST1garbage", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- the same push through shared memory (protos/shm.py) ----------------------------------------
def _shm_push(client, step, grads):
    return client.start_push_pull("job-raw", 0, step, grads, min_version=step + 1, timeout=5, rpc_timeout=10).result()


@pytest.fixture
def shm_shard(shard):
    assert shard.use_shared_memory("job-raw", f"pstrain-test-raw-{os.getpid()}", 4096, 4096)
    yield shard


def test_a_push_through_shared_memory_is_applied_like_a_frame(shm_shard):
    g = {"w[0:2]": np.full((2, 3), 0.5, np.float32), "b[0:3]": np.ones(3, np.float32)}
    call = shm_shard.start_push_pull("job-raw", 0, 0, g, min_version=1, timeout=5, rpc_timeout=10)
    version, params = call.result()
    assert version == 1
    np.testing.assert_array_equal(params["w[0:2]"], np.full((2, 3), 0.5, np.float32))
    np.testing.assert_array_equal(params["b[0:3]"], -np.ones(3, np.float32))
    assert call.sent > 36 and call.received > 36  # the tensors' bytes count, not just the control frames
    # a retry is a duplicate: acknowledged, not applied twice
    version, params = _shm_push(shm_shard, 0, g)
    assert version == 1
    np.testing.assert_array_equal(params["b[0:3]"], -np.ones(3, np.float32))
    version, params = _shm_push(shm_shard, 1, g)
    np.testing.assert_array_equal(params["b[0:3]"], -2 * np.ones(3, np.float32))


def test_a_bad_push_through_shared_memory_is_rejected_and_changes_nothing(shm_shard):
    with pytest.raises(grpc.RpcError) as err:
        _shm_push(shm_shard, 0, {"w[0:2]": np.full((2, 3), np.inf, np.float32)})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "w[0:2]" in err.value.details()
    _, params = shm_shard.pull("job-raw", 0, 0)
    np.testing.assert_array_equal(params["w[0:2]"], np.ones((2, 3), np.float32))


def test_a_push_too_big_for_the_segment_goes_as_a_frame(shard):
    assert shard.use_shared_memory("job-raw", f"pstrain-test-small-{os.getpid()}", 64, 64)
    version, params = _shm_push(shard, 0, {"w[0:2]": np.ones((2, 3), np.float32), "b[0:3]": np.ones(3, np.float32)})
    assert version == 1
    np.testing.assert_array_equal(params["w[0:2]"], np.zeros((2, 3), np.float32))


def test_a_shard_that_cannot_map_the_segment_gets_frames(shard, monkeypatch):
    """What a shard on another host answers: FAILED_PRECONDITION, and the client goes on with frames."""
    from psserver import service

    def elsewhere(name, token, capacity):
        raise service.SegmentUnavailable(f"cannot open shared-memory segment {name} (another host?)")

    monkeypatch.setattr(service.Segment, "attach", elsewhere)
    name = f"pstrain-test-far-{os.getpid()}"
    assert not shard.use_shared_memory("job-raw", name, 4096, 4096)
    assert shard.segment is None and not os.path.exists(os.path.join("/dev/shm", name))
    version, _ = _shm_push(shard, 0, {"b[0:3]": np.ones(3, np.float32)})
    assert version == 1


def test_shared_memory_can_be_turned_off(shard, monkeypatch):
    monkeypatch.setenv("PSTRAIN_SHM", "off")
    assert not shard.use_shared_memory("job-raw", f"pstrain-test-off-{os.getpid()}", 4096, 4096)


def test_a_push_naming_a_segment_never_attached_is_failed_precondition(shard):
    from protos import tensorwire

    with pytest.raises(grpc.RpcError) as err:
        shard.raw_push(tensorwire.pack({"job": "job-raw", "shm": {"name": "pstrain-nope", "size": 10}}, {}), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "never attached" in err.value.details()


def test_a_retry_stops_using_shared_memory(shm_shard):
    g = {"b[0:3]": np.ones(3, np.float32)}
    call = shm_shard.start_push_pull("job-raw", 0, 0, g, min_version=1, timeout=5, rpc_timeout=10)
    call.result()
    version, params = call.retry()  # as after a lost reply: sent again as a frame, applied once
    assert version == 1 and shm_shard.segment is None
    np.testing.assert_array_equal(params["b[0:3]"], -np.ones(3, np.float32))


def test_the_end_of_a_job_removes_its_segments(shm_shard):
    """A killed worker never removes its segment; the shard does when the job ends."""
    path = os.path.join("/dev/shm", shm_shard.segment.name)
    shm_shard.segment.owner = False  # as if the worker died: it never removes the name
    shm_shard.segment = None
    assert os.path.exists(path)
    shm_shard.end_job("job-raw")
    assert not os.path.exists(path)
