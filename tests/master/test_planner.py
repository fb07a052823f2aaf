"""master.planner.plan_job on the MNIST example's spec: placement balanced and
complete for 1..4 shards, trainable keys that match the gradients, the text and dict
forms, an optimised training graph that computes the same loss and gradients as the
model's own (unoptimised) training graph, and clear errors for bad specs."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from client.job import job_to_spec
from graph.errors import GraphError
from graph.interpret import evaluate
from graph.registry import RunContext
from master.planner import JobPlan, plan_job
from protos import codec, jobcodec, master_pb2
from pstrain.runtime.placement import assemble

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST_VARIABLES = {
    "dense/kernel": (784, 256),
    "dense/bias": (256,),
    "dense_1/kernel": (256, 128),
    "dense_1/bias": (128,),
    "dense_2/kernel": (128, 10),
    "dense_2/bias": (10,),
}
TOTAL_BYTES = sum(int(np.prod(s)) for s in MNIST_VARIABLES.values()) * 4  # float32


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist():
    """(job, serialized JobSpec) of examples/mnist_mlp.py."""
    job = _load_example("mnist_mlp").job(epochs=1, batch_size=32)
    return job, jobcodec.job_spec_to_bytes(job_to_spec(job, name="mnist_mlp"))


@pytest.fixture
def spec(mnist) -> master_pb2.JobSpec:
    return master_pb2.JobSpec.FromString(mnist[1])


@pytest.fixture(scope="module")
def plans(mnist) -> dict[int, JobPlan]:
    spec = master_pb2.JobSpec.FromString(mnist[1])
    return {s: plan_job(jobcodec.job_spec_from_proto(spec), s) for s in (1, 2, 3, 4)}


def row_bytes(shape) -> int:
    return int(np.prod(shape[1:])) * 4 if shape else 4


# ---- placement ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_shards_balanced_within_one_row(plans, num_shards):
    p = plans[num_shards].placement
    assert p.num_shards == num_shards and len(p.shard_bytes) == num_shards
    assert sum(p.shard_bytes) == TOTAL_BYTES
    largest_row = max(row_bytes(s) for s in MNIST_VARIABLES.values())
    for k, b in enumerate(p.shard_bytes):
        assert abs(b - TOTAL_BYTES / num_shards) <= largest_row, (k, b, p.shard_bytes)
        assert b == sum(s.nbytes for s in p.slices_for(k))
    assert p.warnings == ()


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_every_variable_covered_once(plans, spec, num_shards):
    plan = plans[num_shards]
    assert set(plan.variables()) == set(MNIST_VARIABLES)
    for var, shape in MNIST_VARIABLES.items():
        slices = plan.placement.slices_of(var)
        assert slices[0].start == 0 and slices[-1].stop == shape[0]
        assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
        assert [s.shard for s in slices] == sorted(s.shard for s in slices)
    # Shard tensors: every slice key on exactly one shard, reassembling the initial values.
    held: dict[str, np.ndarray] = {}
    for k in range(num_shards):
        tensors = plan.shard_tensors(k)
        assert set(tensors) == {s.key for s in plan.placement.slices_for(k)}
        assert not set(tensors) & set(held)
        assert sum(t.nbytes for t in tensors.values()) == plan.placement.shard_bytes[k]
        held.update(tensors)
    for var, shape in MNIST_VARIABLES.items():
        slices = plan.placement.slices_of(var)
        whole = assemble(slices, [held[s.key] for s in slices], np.empty(shape, np.float32))
        want = codec.tensor_from_proto(spec.model.graph.initial_values[var])
        np.testing.assert_array_equal(whole, want)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_trainable_keys_match_grads(plans, spec, num_shards):
    plan = plans[num_shards]
    assert set(plan.train.grads) == set(MNIST_VARIABLES) == set(spec.model.weight_order)
    assert plan.train.state_variables == ()
    keys = {s.key for s in plan.placement.slices}
    assert plan.trainable_keys() == keys
    for var, grad in plan.train.grads.items():
        assert plan.graph.nodes[grad].shape == plan.graph.nodes[var].shape, var
    assert (plan.mode, plan.staleness) == ("sync", 0)
    assert plan.optimizer == json.loads(spec.train.optimizer_json)
    assert plan.weight_order == list(spec.model.weight_order)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_text_and_dict(plans, num_shards):
    plan = plans[num_shards]
    text = plan.text
    for section in ("== graph passes ==", "forward:", "training graph:",
                    "== worker subgraph (replicated on every worker) ==",
                    "== parameter-server shards (sync; optimizer sgd) =="):
        assert section in text
    assert f"{TOTAL_BYTES:,}" in text and "6 variables" in text
    for k, b in enumerate(plan.placement.shard_bytes):
        assert f"{k:>5}  {b:>12,}" in text
    for s in plan.placement.slices:
        assert s.key in text
    assert "[input ] x" in text and "[input ] y" in text

    d = plan.to_dict()
    json.dumps(d)  # JSON-ready: GetPlan sends it as plan_json
    assert set(d) == {"mode", "staleness", "optimizer", "nodes", "forward_passes", "train_passes", "trainable",
                      "state_variables", "shard_bytes", "slices"}
    assert d["nodes"] == len(plan.graph.nodes)
    assert d["shard_bytes"] == list(plan.placement.shard_bytes)
    assert sorted(d["trainable"]) == sorted(MNIST_VARIABLES)
    assert len(d["slices"]) == len(plan.placement.slices)
    assert {s["shard"] for s in d["slices"]} == set(range(num_shards))
    for report in (d["forward_passes"], d["train_passes"]):
        assert report["nodes_after"] <= report["nodes_before"]
        assert set(report) == {"nodes_before", "nodes_after", "folded", "merged", "pruned"}


def test_ssp_plan_mentions_staleness(spec):
    spec.train.mode, spec.train.staleness = "ssp", 2
    plan = plan_job(jobcodec.job_spec_from_proto(spec), 2)
    assert "(ssp, staleness 2;" in plan.text and plan.to_dict()["staleness"] == 2


# ---- the optimised graph computes what the model computes ----------------------------------------------
def test_optimized_graph_matches_the_model_graph(mnist, plans):
    job, _ = mnist
    ref = job.model._plan
    rng = np.random.default_rng(0)
    x = rng.random((16, 784), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    ctx = RunContext(training=True, step=0)
    names = list(ref.grads)
    want = evaluate(ref.graph, [ref.loss, ref.prediction] + [ref.grads[n] for n in names],
                    feeds={ref.features: x, ref.labels: y}, ctx=ctx)
    for num_shards, plan in plans.items():
        t = plan.train
        assert list(t.grads) == names
        got = evaluate(t.graph, [t.loss, t.prediction] + [t.grads[n] for n in names],
                       feeds={t.features: x, t.labels: y}, ctx=ctx)
        assert np.isfinite(got[0]) and got[0] > 0
        for label, a, b in zip(["loss", "prediction"] + names, got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"{label} ({num_shards} shards)")
    # The planner pruned what the training step does not need (the gradient w.r.t. x).
    assert len(plans[1].graph.nodes) < len(ref.graph.nodes)


def test_plan_is_deterministic(spec, plans):
    again = plan_job(jobcodec.job_spec_from_proto(spec), 3)
    assert again.placement == plans[3].placement
    assert codec.graph_to_bytes(again.graph) == codec.graph_to_bytes(plans[3].graph)


# ---- errors -----------------------------------------------------------------------------------------------
def _missing_loss(spec):
    spec.model.loss = "total_loss"
    return GraphError, ["'total_loss'", "loss node does not exist"]


def _empty_loss(spec):
    spec.model.loss = ""
    return GraphError, ["<empty>", "loss"]


def _labels_not_placeholder(spec):
    spec.model.labels = "dense/kernel"
    return GraphError, ["'dense/kernel'", "labels must be a placeholder"]


def _non_scalar_loss(spec):
    spec.model.loss = spec.model.prediction
    return GraphError, [f"'{spec.model.prediction}'", "loss must be a scalar"]


def _bad_mode(spec):
    spec.train.mode = "eventual"
    return ValueError, ["'eventual'", "sync, async or ssp"]


def _unknown_optimizer(spec):
    spec.train.optimizer_json = json.dumps({"name": "rmsprop_fancy"})
    return ValueError, ["rmsprop_fancy", "optimizer"]


def _bad_optimizer_field(spec):
    spec.train.optimizer_json = json.dumps({"name": "sgd", "learning_rate": 0.1, "nesterov_momentum": 3})
    return ValueError, ["nesterov_momentum", "sgd"]


def _bad_weight_order(spec):
    spec.model.weight_order.append("dense/relu")
    return GraphError, ["'dense/relu'", "weight_order"]


def _bad_batch(spec):
    spec.train.batch_size = 0
    return ValueError, ["batch_size", "0"]


ERRORS = {f.__name__[1:]: f for f in (_missing_loss, _empty_loss, _labels_not_placeholder, _non_scalar_loss,
                                       _bad_mode, _unknown_optimizer, _bad_optimizer_field, _bad_weight_order,
                                       _bad_batch)}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_spec_errors_are_clear(spec, case):
    exc_type, needles = ERRORS[case](spec)
    with pytest.raises(exc_type) as info:
        plan_job(jobcodec.job_spec_from_proto(spec), 2)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("num_shards", [0, -1])
def test_bad_num_shards(spec, num_shards):
    with pytest.raises(ValueError, match=rf"num_shards={num_shards} must be >= 1"):
        plan_job(jobcodec.job_spec_from_proto(spec), num_shards)


@pytest.mark.parametrize("text", ["{not json", '"sgd"', "[1, 2]"])
def test_malformed_optimizer_json_names_the_field(spec, text):
    spec.train.optimizer_json = text
    with pytest.raises(ValueError) as info:
        plan_job(jobcodec.job_spec_from_proto(spec), 1)
    assert "optimizer" in str(info.value), str(info.value)
