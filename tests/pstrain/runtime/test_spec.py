"""pstrain.runtime.spec: the plain job types validate on construction and name the field."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from graph import Graph
from graph.errors import GraphError
from pstrain.runtime.modes import Mode
from pstrain.runtime.spec import Device, JobSpec, ModelSpec, Progress, SliceSpec, TaskSpec, TrainConfig


def small_model() -> ModelSpec:
    g = Graph()
    x = g.placeholder((None, 3), "float32", name="x")
    y = g.placeholder((None, 1), "float32", name="y")
    w = g.variable(np.zeros((3, 1), np.float32), name="w")
    pred = g.matmul(x, w, name="pred")
    g.mse(pred, y, name="loss")
    return ModelSpec(g, "x", "y", "loss", "pred", model_config={"format": "x"}, weight_order=["w"])


def train(**kw) -> TrainConfig:
    return TrainConfig(**{"optimizer": {"name": "sgd", "learning_rate": 0.1}, "batch_size": 4, "epochs": 1, **kw})


def test_defaults_and_enums():
    t = train()
    assert t.mode is Mode.SYNC and t.device is Device.CPU and t.metrics == () and t.shuffle
    t = train(mode="ssp", staleness=2, device="cuda", metrics=["accuracy"])
    assert t.mode is Mode.SSP and t.device is Device.CUDA and t.metrics == ("accuracy",)
    assert t.mode == "ssp" and t.device == "cuda"  # str enums compare with their values
    assert train(device="").device is Device.AUTO  # an unset wire field


def test_frozen():
    t = train()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.batch_size = 8  # type: ignore[misc]


def test_optimizer_config_is_copied():
    cfg = {"name": "sgd"}
    t = train(optimizer=cfg)
    cfg["name"] = "adam"
    assert t.optimizer["name"] == "sgd"


@pytest.mark.parametrize("field, value, words", [
    ("mode", "eventual", ["'eventual'", "sync, async or ssp"]),
    ("device", "tpu", ["device='tpu'", "cpu"]),
    ("batch_size", 0, ["batch_size=0", ">= 1"]),
    ("epochs", -1, ["epochs=-1", ">= 0"]),
    ("staleness", -2, ["staleness=-2"]),
    ("num_workers", 1.5, ["num_workers=1.5"]),
    ("num_shards", -1, ["num_shards=-1"]),
    ("seed", "zero", ["seed='zero'"]),
    ("optimizer", "sgd", ["optimizer='sgd'", "'name'"]),
])
def test_invalid_train_config_names_the_field(field, value, words):
    with pytest.raises(ValueError) as info:
        train(**{field: value})
    for w in words:
        assert w in str(info.value), str(info.value)


def test_numpy_integers_are_integers():
    t = train(batch_size=np.int64(8), epochs=np.int32(2), seed=np.int64(3))
    assert (t.batch_size, t.epochs, t.seed) == (8, 2, 3)


def test_model_spec_checks_roles():
    m = small_model()
    assert m.weight_order == ("w",)
    with pytest.raises(GraphError, match="'nope'.*|labels node does not exist"):
        ModelSpec(m.graph, "x", "nope", "loss", "pred")
    with pytest.raises(GraphError, match="features must be a placeholder"):
        ModelSpec(m.graph, "w", "y", "loss", "pred")
    with pytest.raises(GraphError, match="loss must be a scalar"):
        ModelSpec(m.graph, "x", "y", "pred", "pred")
    with pytest.raises(GraphError, match="weight_order"):
        ModelSpec(m.graph, "x", "y", "loss", "pred", weight_order=["pred"])


def test_job_spec_needs_a_dataset():
    with pytest.raises(ValueError, match="dataset"):
        JobSpec("j", small_model(), train(), dataset="")


def _task(**kw) -> TaskSpec:
    m = small_model()
    args = dict(job="job-1", worker_index=1, workers=[2, 1], graph=m.graph, features="x", labels="y", loss="loss",
                prediction="pred", grads={"w": "grad_w"}, state_variables=[],
                slices=[SliceSpec("w", "w[0:3]", 0, 0, 3)], shard_addresses=["127.0.0.1:1"], train=train(),
                dataset="synthetic")
    args.update(kw)
    return TaskSpec(**args)


def test_task_spec():
    t = _task()
    assert t.workers == (1, 2) and t.slices[0].shard == 0 and t.shard_addresses == ("127.0.0.1:1",)
    with pytest.raises(ValueError, match="worker_index=5"):
        _task(worker_index=5)
    with pytest.raises(ValueError, match="shard 3"):
        _task(slices=[SliceSpec("w", "w[0:3]", 3, 0, 3)])


def test_progress():
    p = Progress("job-1", 0, step=3, epoch=1, loss=0.5, metrics={"accuracy": np.float32(0.25)})
    assert p.metrics == {"accuracy": 0.25} and type(p.metrics["accuracy"]) is float
    with pytest.raises(ValueError, match="step=-1"):
        Progress("job-1", 0, step=-1)
