"""The raw-frame push (PushRaw), the path workers take every step, over real gRPC."""
import json

import grpc
import numpy as np
import pytest

from psserver.config import PSConfig
from psserver.service import ParameterServerClient, serve


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
