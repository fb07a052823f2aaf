"""Properties of the wire codecs over random graphs (hypothesis):

- a random valid graph survives ``codec.graph_to_proto`` / ``graph_from_proto`` exactly;
- a random graph with a scalar float loss, sent as a ``JobSpec``, plans as the original
  does (or both are refused with a GraphError / ValueError);
- random bytes, truncations and bit flips of valid specs decode or are refused with
  protobuf's DecodeError or a ValueError, nothing else.

Examples are bounded (``max_examples`` 100-200, no deadline, no example database in the
repo) so the file runs in well under a minute.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph.core import Graph, Tensor
from graph.errors import GraphError
from master.planner import plan_job
from protos import codec, jobcodec, master_pb2
from pstrain.runtime.spec import JobSpec, ModelSpec, TrainConfig
from tests.fuzz.corpus import jobspec_seeds

BOUNDED = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = ("float16", "float32", "float64")
NUMBERS = FLOATS + ("int8", "int16", "int32", "int64", "uint8")


# ---- random graphs ------------------------------------------------------------------------
def _value(draw, shape: tuple, dtype: str) -> np.ndarray:
    n = math.prod(shape)
    if dtype in FLOATS:
        values = draw(st.lists(st.floats(width=16 if dtype == "float16" else 32), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.integers(0 if dtype == "uint8" else -9, 9), min_size=n, max_size=n))
    return np.array(values, dtype=dtype).reshape(shape)


def _known(shape: tuple) -> tuple:
    """``shape`` with unknown dimensions as 1: a shape a variable of it broadcasts with."""
    return tuple(1 if d is None else d for d in shape)


def _source(draw, g: Graph, shape: tuple, dtype: str) -> Tensor:
    kind = draw(st.sampled_from(["variable", "constant", "placeholder"]))
    if kind == "placeholder":
        return g.placeholder(shape, dtype)
    value = _value(draw, _known(shape), dtype)
    if kind == "variable":
        return g.variable(value, trainable=draw(st.booleans()))
    return g.constant(value)


def _operand(draw, g: Graph, pool: list[Tensor], a: Tensor, dtypes: tuple) -> Tensor:
    """A tensor that broadcasts with ``a``: one from the pool, or a new source of a suffix of its shape."""
    fits = [t for t in pool if t.dtype.name in dtypes and _broadcasts(a.shape, t.shape)]
    if fits and draw(st.booleans()):
        return draw(st.sampled_from(fits))
    suffix = a.shape[draw(st.integers(0, len(a.shape))):]
    return _source(draw, g, _known(suffix), draw(st.sampled_from(dtypes)))


def _broadcasts(a: tuple, b: tuple) -> bool:
    return all(x is None or y is None or x == y or 1 in (x, y) for x, y in zip(reversed(a), reversed(b)))


def _reshape_target(draw, shape: tuple) -> tuple:
    if None in shape:
        return (-1,) + tuple(d for d in shape if d is not None)
    n = math.prod(shape)
    k = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0] or [1]))
    return draw(st.sampled_from([(-1,), (n,), (k, -1), (-1, k, 1), (1, n // max(k, 1), k)] if n else [(0,)]))


def _add_op(draw, g: Graph, pool: list[Tensor]) -> Tensor | None:
    """One shape-consistent op on tensors of the pool (None when none fits)."""
    op = draw(st.sampled_from(["add", "sub", "mul", "matmul", "relu", "tanh", "sigmoid", "reduce_sum",
                               "reduce_mean", "reshape"]))
    floats = [t for t in pool if t.dtype.name in FLOATS]
    if op in ("add", "sub", "mul"):
        a = draw(st.sampled_from(pool))
        b = _operand(draw, g, pool, a, FLOATS if a.dtype.name in FLOATS else NUMBERS)
        return getattr(g, op)(*draw(st.permutations([a, b])))
    if op == "matmul":
        mats = [t for t in floats if len(t.shape) == 2 and t.shape[1] is not None]
        a = draw(st.sampled_from(mats)) if mats else \
            _source(draw, g, (draw(st.integers(1, 3)), draw(st.integers(1, 3))), draw(st.sampled_from(FLOATS)))
        k = a.shape[1]
        rights = [t for t in mats if t.shape[0] == k and t.dtype == a.dtype]
        b = draw(st.sampled_from(rights)) if rights and draw(st.booleans()) else \
            g.variable(_value(draw, (k, draw(st.integers(1, 3))), a.dtype.name))
        return g.matmul(a, b)
    if op in ("relu", "tanh", "sigmoid"):
        return getattr(g, op)(draw(st.sampled_from(floats))) if floats else None
    if op in ("reduce_sum", "reduce_mean"):
        candidates = floats if op == "reduce_mean" else pool
        if not candidates:
            return None
        x = draw(st.sampled_from(candidates))
        rank = len(x.shape)
        axis = draw(st.one_of(st.none(), st.integers(-rank, rank - 1))) if rank else None
        return getattr(g, op)(x, axis=axis, keepdims=draw(st.booleans()))
    x = draw(st.sampled_from(pool))
    return g.reshape(x, shape=_reshape_target(draw, x.shape))


@st.composite
def graphs(draw, features: int | None = None) -> tuple[Graph, list[Tensor]]:
    """A random valid graph and its tensors. With ``features``, it starts with the
    placeholders a job needs: x (batch, features) and y (batch, 1)."""
    g = Graph()
    pool: list[Tensor] = []
    if features is not None:
        pool += [g.placeholder((None, features), "float32", name="x"), g.placeholder((None, 1), "float32", name="y")]
        pool.append(g.variable(_value(draw, (features, 2), "float32"), name="w"))
    for _ in range(draw(st.integers(1 if features is None else 0, 3))):
        shape = tuple(draw(st.lists(st.one_of(st.none(), st.integers(1, 4)), max_size=3)))
        pool.append(_source(draw, g, shape, draw(st.sampled_from(NUMBERS))))
    for _ in range(draw(st.integers(0, 8))):
        t = _add_op(draw, g, pool)
        if t is not None:
            pool.append(t)
    return g, pool


# ---- (a) graphs round-trip ------------------------------------------------------------------
def _same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(_same_value(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def assert_same_graph(g: Graph, h: Graph) -> None:
    assert list(h.nodes) == list(g.nodes)
    for name, node in g.nodes.items():
        got = h.nodes[name]
        assert (got.op, got.inputs, got.dtype, got.shape) == (node.op, node.inputs, node.dtype, node.shape), name
        assert got.attrs.keys() == node.attrs.keys(), name
        for key, value in node.attrs.items():
            assert _same_value(got.attrs[key], value), (name, key, got.attrs[key], value)
    assert h.initial_values.keys() == g.initial_values.keys()
    for name, value in g.initial_values.items():
        assert _same_value(h.initial_values[name], np.asarray(value)), name


@settings(max_examples=200, **BOUNDED)
@given(graphs())
def test_random_graphs_round_trip_through_the_codec(built):
    g, _ = built
    assert_same_graph(g, codec.graph_from_proto(codec.graph_to_proto(g)))
    assert_same_graph(g, codec.graph_from_bytes(codec.graph_to_bytes(g)))


# ---- (b) random jobs plan, or are refused clearly -------------------------------------------
@st.composite
def job_specs(draw) -> JobSpec:
    g, pool = draw(graphs(features=draw(st.integers(1, 4))))
    floats = [t for t in pool if t.dtype.name in FLOATS]
    prediction = draw(st.sampled_from(floats))
    loss = g.reduce_mean(g.add(prediction, g.reduce_mean(g.tensor("w"))), name="loss")  # reads w: it trains
    mode = draw(st.sampled_from(["sync", "async", "ssp"]))
    train = TrainConfig(optimizer=draw(st.sampled_from([{"name": "sgd", "learning_rate": 0.1}, {"name": "adam"}])),
                        batch_size=8, epochs=1, mode=mode, staleness=1 if mode == "ssp" else 0)
    return JobSpec("prop", ModelSpec(g, "x", "y", loss.name, prediction.name), train, "digits")


def _outcome(spec: JobSpec, num_shards: int):
    """What planning gives: the plan's summary, or the kind of refusal."""
    try:
        plan = plan_job(spec, num_shards=num_shards)
    except (GraphError, ValueError) as exc:
        return type(exc)
    return plan.to_dict()


@settings(max_examples=100, **BOUNDED)
@given(job_specs(), st.integers(1, 3))
def test_random_jobs_plan_the_same_after_the_wire(spec, num_shards):
    decoded = jobcodec.job_spec_from_bytes(jobcodec.job_spec_to_bytes(spec))
    assert_same_graph(spec.model.graph, decoded.model.graph)
    assert _outcome(decoded, num_shards) == _outcome(spec, num_shards)


# ---- (c) damaged bytes are refused clearly --------------------------------------------------
def _decode(data: bytes) -> None:
    try:
        jobcodec.job_spec_from_proto(master_pb2.JobSpec.FromString(data))
    except (DecodeError, ValueError):
        pass


@settings(max_examples=200, **BOUNDED)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_clearly(data):
    _decode(data)


@pytest.mark.parametrize("seed", range(len(jobspec_seeds())))
@settings(max_examples=150, **BOUNDED)
@given(data=st.data())
def test_truncated_and_flipped_specs_are_refused_clearly(seed, data):
    raw = bytearray(jobspec_seeds()[seed])
    del raw[data.draw(st.integers(0, len(raw)), label="truncate at"):]
    for _ in range(data.draw(st.integers(0, 4), label="bit flips")):
        if raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    _decode(bytes(raw))
