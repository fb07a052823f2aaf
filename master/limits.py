"""Limits on what one job may ask for, checked by the master before it does any work.

Each limit is a ``MasterConfig`` field (flag ``--max-graph-nodes``, variable
``PSTRAIN_MAX_GRAPH_NODES``, ...). A job over one fails SubmitJob / GetPlan with
INVALID_ARGUMENT (a ``ValueError``) naming the field, the value and the limit.

Usage::

    check_request(request_bytes, node_count, config)   # at the service edge, before decoding
    spec = check_job(spec, config)                      # first thing in submit / plan
    waiting_for(3, 0, workers=1, shards=2)             # "3 workers (1 registered)"
"""
from __future__ import annotations

import os
from dataclasses import replace

from master.config import MasterConfig
from pstrain.runtime.datasets import NAMES
from pstrain.runtime.spec import JobSpec
from pstrain.transport.rpc import max_message_bytes


def _where(field: str) -> str:
    return f"--{field.replace('_', '-')} / PSTRAIN_{field.upper()}"


def _over(what: str, limit: int, field: str) -> ValueError:
    return ValueError(f"job spec: {what}; the limit is {limit} ({_where(field)})")


def request_limit(config: MasterConfig) -> int:
    """The most bytes a SubmitJob / GetPlan request may have (0 in the config: the gRPC message limit)."""
    return config.max_request_bytes or max_message_bytes()


def check_request(request_bytes: int | None, node_count: int, config: MasterConfig) -> None:
    """The checks that cost nothing: the request's size (None: not from the wire) and the
    graph's node count, before the graph is decoded (decoding and planning take time and
    memory in proportion to it)."""
    if request_bytes is not None and request_bytes > request_limit(config):
        raise _over(f"the request is {request_bytes} bytes", request_limit(config), "max_request_bytes")
    if node_count > config.max_graph_nodes:
        raise _over(f"the graph has {node_count} nodes", config.max_graph_nodes, "max_graph_nodes")


def check_job(spec: JobSpec, config: MasterConfig) -> JobSpec:
    """Refuse a job over any limit (ValueError); return it as admitted: with a data root, its
    dataset path joined to the root (workers load that path). The request's size is the
    service edge's to check (check_request), before it decodes the spec."""
    graph = spec.model.graph
    check_request(None, len(graph.nodes), config)
    check_train(spec, config)
    dataset = dataset_path(spec.dataset, config.data_root)
    total = sum(int(v.nbytes) for v in graph.initial_values.values())
    if total > config.max_variable_bytes:
        raise _over(f"the variables' initial values total {total} bytes", config.max_variable_bytes,
                    "max_variable_bytes")
    depth, end = graph_depth(graph)
    if depth > config.max_graph_depth:
        raise _over(f"the graph is {depth} nodes deep (its longest path ends at node '{end}')",
                    config.max_graph_depth, "max_graph_depth")
    return spec if dataset == spec.dataset else replace(spec, dataset=dataset)


def check_train(spec: JobSpec, config: MasterConfig) -> None:
    """Epochs, batch size, cluster size and staleness within their ranges."""
    t = spec.train
    for field, value, low, high, limit_field in (
        ("epochs", t.epochs, 0, config.max_epochs, "max_epochs"),
        ("batch_size", t.batch_size, 1, config.max_batch_size, "max_batch_size"),
        ("num_workers", t.num_workers, 0, config.max_job_workers, "max_job_workers"),
        ("num_shards", t.num_shards, 0, config.max_job_shards, "max_job_shards"),
    ):
        if not low <= value <= high:
            raise ValueError(f"job spec: train.{field}={value} is out of range; allowed [{low}, {high}] "
                             f"(the upper limit is {_where(limit_field)})")
    if t.staleness < 0:
        raise ValueError(f"job spec: train.staleness={t.staleness} must be >= 0")


def graph_depth(graph) -> tuple[int, str]:
    """The longest path through ``graph`` in nodes, and the node it ends at. Iterative,
    O(nodes + edges): a graph's nodes are kept in topological order."""
    depth: dict[str, int] = {}
    best, end = 0, ""
    for name, node in graph.nodes.items():
        d = 1 + max((depth[i] for i in node.inputs), default=0)
        depth[name] = d
        if d > best:
            best, end = d, name
    return best, end


def dataset_path(dataset: str, data_root: str) -> str:
    """The dataset the workers load: a named one as it is; a path as it is without a data
    root; with one, the path joined to the root, refused unless it lies inside it. The
    refusal is one message whatever the file: the filesystem is only read (to resolve
    links) for a path that is inside the root as written."""
    if dataset in NAMES or not data_root:
        return dataset
    root = os.path.normpath(data_root)
    path = os.path.normpath(os.path.join(root, dataset))  # an absolute dataset replaces the root
    if "\0" not in path and _inside(path, root) and _inside(os.path.realpath(path), os.path.realpath(root)):
        return path
    raise ValueError(f"dataset {dataset!r} is neither a named dataset ({', '.join(NAMES)}) nor a path inside "
                     f"the data root {root!r} (--data-root / PSTRAIN_DATA_ROOT)")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def waiting_for(num_workers: int, num_shards: int, workers: int, shards: int) -> str:
    """What a PENDING job waits for that is not even registered ("" when the registered
    nodes suffice, and it only waits for some to be free). 0 asked: every registered one,
    so at least one."""
    parts = []
    for asked, have, noun in ((num_workers, workers, "worker"), (num_shards, shards, "parameter-server shard")):
        want = max(asked, 1)
        if have < want:
            parts.append(f"{want} {noun}{'s' if want > 1 else ''} ({have} registered)")
    return " and ".join(parts)
