"""Fuzz what the master does with a submitted job: ``master_pb2.JobSpec.FromString``,
``protos/jobcodec.job_spec_from_proto`` (the graph through ``protos/codec.py`` and
``graph/validate.py``) and ``master/planner.plan_job(spec, num_shards=2)``.

Every input takes two paths:

- as bytes: parsed as a ``JobSpec`` message, decoded and planned;
- as choices (``atheris.FuzzedDataProvider``) that mutate a valid spec from
  ``corpus.jobspec_seeds``: node ops, inputs, dtypes, shapes and attrs, initial
  values, the job's roles and its train config. This path gets past protobuf parsing
  to the validator and the planner.

Either may be refused with protobuf's ``DecodeError`` or a ValueError (``GraphError``
is one); anything else is a finding.

Run: ``python tests/fuzz/fuzz_jobspec.py [-max_total_time=N] [corpus_dir]``
"""
from __future__ import annotations

import contextlib
import pathlib
import sys

import atheris
from google.protobuf.message import DecodeError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root, for tests.fuzz


def _instrumented():
    """Coverage instrumentation when run as a fuzzer; none when a test imports this file."""
    include = ["protos", "graph", "master", "pstrain"]
    return atheris.instrument_imports(include=include) if __name__ == "__main__" else contextlib.nullcontext()


with _instrumented():
    from graph.registry import all_ops
    from master.planner import plan_job
    from protos import graph_pb2, jobcodec, master_pb2

from tests.fuzz.corpus import jobspec_seeds  # noqa: E402

REFUSALS = (DecodeError, ValueError)  # ValueError covers GraphError and the spec dataclasses' checks
OPDEFS = all_ops()
OPS = sorted(OPDEFS)
DTYPES = sorted(graph_pb2.DataType.values())
OPTIMIZERS = [
    '{"name": "sgd", "learning_rate": 0.1}', '{"name": "adam"}', '{"name": "rmsprop", "rho": 2}',
    '{"name": "sgd", "learning_rate": -1}', '{"name": "nope"}', '{"name": 3}', "[]", "{", '{"name": "sgd", "x": 1}',
    '{"name": "adam", "learning_rate": NaN}', '{"name": "sgd", "learning_rate": 1e999}', "",
]
_bases: list[master_pb2.JobSpec] | None = None


def _base_specs() -> list[master_pb2.JobSpec]:
    global _bases
    if _bases is None:
        _bases = [master_pb2.JobSpec.FromString(b) for b in jobspec_seeds()]
    return _bases


def plan_bytes(data: bytes) -> None:
    """The master's path for a submitted spec; refusals are fine, anything else raises."""
    try:
        spec = jobcodec.job_spec_from_proto(master_pb2.JobSpec.FromString(data))
        plan_job(spec, num_shards=2)
    except REFUSALS:
        pass


# ---- mutations of a valid spec ----------------------------------------------------------
def _name(fdp: atheris.FuzzedDataProvider, names: list[str]) -> str:
    """Mostly an existing node's name (deep paths), sometimes anything."""
    if names and fdp.ConsumeIntInRange(0, 7):
        return fdp.PickValueInList(names)
    return fdp.ConsumeUnicodeNoSurrogates(12)


def _dims(fdp: atheris.FuzzedDataProvider) -> list[int]:
    return [fdp.ConsumeIntInRange(-3, 12) for _ in range(fdp.ConsumeIntInRange(0, 4))]


def _set_attr(fdp: atheris.FuzzedDataProvider, value: graph_pb2.AttrValue, depth: int = 0) -> None:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        value.i = fdp.ConsumeIntInRange(-(2**63), 2**63 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-4, 4)
    elif kind == 1:
        value.f = fdp.ConsumeFloat()
    elif kind == 2:
        value.b = fdp.ConsumeBool()
    elif kind == 3:
        value.s = fdp.PickValueInList(["float32", "int64", "bool", "x", "", "axis"]) if fdp.ConsumeBool() \
            else fdp.ConsumeUnicodeNoSurrogates(8)
    elif kind == 4:
        value.ints.SetInParent()
        value.ints.values.extend(_dims(fdp))
    elif kind == 5:
        value.floats.SetInParent()
        value.floats.values.extend(fdp.ConsumeFloat() for _ in range(fdp.ConsumeIntInRange(0, 3)))
    elif kind == 6:
        value.strings.SetInParent()
        value.strings.values.extend(fdp.ConsumeUnicodeNoSurrogates(4) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    elif kind == 7:
        _set_tensor(fdp, value.tensor)
    elif kind == 8 and depth < 2:
        value.list.SetInParent()
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            _set_attr(fdp, value.list.values.add(), depth + 1)
    else:
        value.is_none = True


def _set_tensor(fdp: atheris.FuzzedDataProvider, tensor: graph_pb2.TensorProto) -> None:
    tensor.dtype = fdp.PickValueInList(DTYPES) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(-2, 40)
    tensor.shape[:] = _dims(fdp)
    tensor.content = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 96))


def _mutate_node(fdp: atheris.FuzzedDataProvider, gd: graph_pb2.GraphDef, names: list[str]) -> None:
    if not gd.nodes:
        return
    node = gd.nodes[fdp.ConsumeIntInRange(0, len(gd.nodes) - 1)]
    what = fdp.ConsumeIntInRange(0, 7)
    if what == 0:
        node.op = fdp.PickValueInList(OPS) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicodeNoSurrogates(8)
    elif what == 1:
        node.dtype = fdp.PickValueInList(DTYPES) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(-2, 40)
    elif what == 2:  # any shape, or the same rank unknown (matches whatever inference gives)
        node.shape.dims[:] = _dims(fdp) if fdp.ConsumeBool() else [-1] * len(node.shape.dims)
    elif what == 3:
        if node.inputs and fdp.ConsumeBool():
            node.inputs[fdp.ConsumeIntInRange(0, len(node.inputs) - 1)] = _name(fdp, names)
        elif fdp.ConsumeBool():
            node.inputs.append(_name(fdp, names))
        elif node.inputs:
            del node.inputs[-1]
    elif what == 4:
        keys = sorted(set(node.attrs) | set(OPDEFS[node.op].attrs if node.op in OPDEFS else ()))
        key = fdp.PickValueInList(keys) if keys and fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicodeNoSurrogates(6)
        value = node.attrs[key]
        value.Clear()
        _set_attr(fdp, value)
    elif what == 5 and node.attrs:
        del node.attrs[fdp.PickValueInList(sorted(node.attrs))]
    elif what == 6:
        node.name = _name(fdp, names)
    else:  # a copy of a node, under another name
        copy = gd.nodes.add()
        copy.CopyFrom(node)
        copy.name = _name(fdp, names)


def _mutate_model(fdp: atheris.FuzzedDataProvider, msg: master_pb2.JobSpec) -> None:
    m = msg.model
    names = [n.name for n in m.graph.nodes]
    what = fdp.ConsumeIntInRange(0, 9)
    if what <= 4:
        _mutate_node(fdp, m.graph, names)
    elif what == 5:
        key = fdp.PickValueInList(sorted(m.graph.initial_values)) if m.graph.initial_values and fdp.ConsumeBool() \
            else _name(fdp, names)
        _set_tensor(fdp, m.graph.initial_values[key])
    elif what == 6 and m.graph.initial_values:
        del m.graph.initial_values[fdp.PickValueInList(sorted(m.graph.initial_values))]
    elif what == 7:
        role = fdp.PickValueInList(["features", "labels", "loss", "prediction"])
        setattr(m, role, _name(fdp, names))
    elif what == 8:
        if fdp.ConsumeBool():
            m.weight_order.append(_name(fdp, names))
        else:
            m.model_config_json = fdp.PickValueInList(["{}", "[]", "{", '{"layers": 3}', ""])
    else:
        m.graph.version = fdp.ConsumeIntInRange(-1, 3)
        if m.graph.nodes and fdp.ConsumeBool():
            del m.graph.nodes[fdp.ConsumeIntInRange(0, len(m.graph.nodes) - 1)]


def _mutate_train(fdp: atheris.FuzzedDataProvider, msg: master_pb2.JobSpec) -> None:
    t = msg.train
    what = fdp.ConsumeIntInRange(0, 7)
    if what == 0:
        t.optimizer_json = fdp.PickValueInList(OPTIMIZERS) if fdp.ConsumeIntInRange(0, 3) \
            else fdp.ConsumeUnicodeNoSurrogates(24)
    elif what == 1:
        t.batch_size = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)
    elif what == 2:
        t.epochs = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)
    elif what == 3:
        t.mode = fdp.PickValueInList(["sync", "async", "ssp", "", "SYNC", "bsp"])
        t.staleness = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)
    elif what == 4:
        t.device = fdp.PickValueInList(["cpu", "cuda", "auto", "reference", "", "tpu"])
    elif what == 5:
        t.metrics.append(fdp.PickValueInList(["accuracy", "mse", ""]))
        t.loss_name = fdp.ConsumeUnicodeNoSurrogates(6)
    elif what == 6:
        t.num_workers = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)
        t.num_shards = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)
    else:
        msg.data.dataset = fdp.PickValueInList(["", "mnist", "digits", "/nonexistent.npz"])


def mutated_spec(data: bytes) -> master_pb2.JobSpec:
    """A valid base spec with a few fuzzer-chosen mutations."""
    fdp = atheris.FuzzedDataProvider(data)
    bases = _base_specs()
    msg = master_pb2.JobSpec()
    msg.CopyFrom(bases[fdp.ConsumeIntInRange(0, len(bases) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        if fdp.ConsumeIntInRange(0, 3):
            _mutate_model(fdp, msg)
        else:
            _mutate_train(fdp, msg)
    return msg


def plan_mutated(data: bytes) -> None:
    msg = mutated_spec(data)
    try:
        spec = jobcodec.job_spec_from_proto(msg)
        plan_job(spec, num_shards=2)
    except REFUSALS:
        pass


def TestOneInput(data: bytes) -> None:
    plan_bytes(data)
    plan_mutated(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
