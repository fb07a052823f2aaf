"""pstrain.runtime.modelfile: the one model-file format, written atomically and checked on read."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pstrain.runtime.modelfile import FORMAT, read_model, write_model


def test_round_trip(tmp_path):
    config = {"format": FORMAT, "name": "m", "layers": []}
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float64)]
    write_model(tmp_path / "m.npz", config, weights)
    got_config, got = read_model(tmp_path / "m.npz")
    assert got_config == config
    assert [w.dtype for w in got] == [np.float32, np.float64]
    for a, b in zip(got, weights):
        np.testing.assert_array_equal(a, b)


def test_weights_keep_their_order_past_ten(tmp_path):
    weights = [np.full(1, i, np.float32) for i in range(12)]  # weight_10 sorts before weight_2 as text
    write_model(tmp_path / "m.npz", {"format": FORMAT}, weights)
    _, got = read_model(tmp_path / "m.npz")
    assert [int(w[0]) for w in got] == list(range(12))


def test_not_a_model_file(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a pstrain model file"):
        read_model(tmp_path / "x.npz")
    np.savez(tmp_path / "plain.npz", a=np.ones(2))
    with pytest.raises(ValueError, match="not a pstrain model file"):
        read_model(tmp_path / "plain.npz")


def test_wrong_format_is_named(tmp_path):
    np.savez(tmp_path / "old.npz", __config__=np.frombuffer(json.dumps({"format": "pstrain-model/0"}).encode(), np.uint8))
    with pytest.raises(ValueError, match="'pstrain-model/0'.*pstrain-model/1"):
        read_model(tmp_path / "old.npz")
    config, weights = read_model(tmp_path / "old.npz", check_format=False)  # the master's export of a graph job
    assert config == {"format": "pstrain-model/0"} and weights == []
