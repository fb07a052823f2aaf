"""Plan a job: validate the submitted graph, optimise it, add the backward pass,
optimise again, and place every variable on the parameter-server shards.

Pure (no gRPC, plain types): the master's SubmitJob and GetPlan, and ``psctl plan``
offline, all call ``plan_job`` with a ``pstrain.runtime.spec.JobSpec`` (the model's
roles and the train config are already validated when it was constructed).

Usage::

    plan = plan_job(spec, num_shards=2)
    print(plan.text)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from graph.core import Graph, Tensor
from master.passes import PassReport, optimize
from pstrain.runtime.modes import Mode
from pstrain.runtime.optimizers import optimizer_from_config
from pstrain.runtime.placement import Placement, format_placement, place, split
from pstrain.runtime.plan import TrainPlan, build_train_plan
from pstrain.runtime.spec import JobSpec


@dataclass
class JobPlan:
    train: TrainPlan  # the training graph (forward + backward), optimised
    placement: Placement
    forward_report: PassReport
    train_report: PassReport
    optimizer: dict
    mode: Mode
    staleness: int
    weight_order: list

    @property
    def graph(self) -> Graph:
        return self.train.graph

    def variables(self) -> list[str]:
        return [n.name for n in self.graph.nodes.values() if n.op == "variable"]

    def shard_tensors(self, shard: int) -> dict[str, np.ndarray]:
        """Initial values of the slices shard ``shard`` holds, by slice key."""
        out = {}
        for var in self.variables():
            value = self.graph.initial_values[var]
            slices = self.placement.slices_of(var)
            for sl, part in zip(slices, split(value, slices)):
                if sl.shard == shard:
                    out[sl.key] = np.ascontiguousarray(part)
        return out

    def trainable_keys(self) -> set[str]:
        return {sl.key for var in self.train.grads for sl in self.placement.slices_of(var)}

    @property
    def text(self) -> str:
        g = self.graph
        lines = [
            "== graph passes ==",
            f"forward: {self.forward_report.nodes_before} -> {self.forward_report.nodes_after} nodes; "
            f"folded {len(self.forward_report.folded)}, merged {len(self.forward_report.merged)}, "
            f"pruned {len(self.forward_report.pruned)}",
            f"training graph: {self.train_report.nodes_before} -> {self.train_report.nodes_after} nodes; "
            f"folded {len(self.train_report.folded)}, merged {len(self.train_report.merged)}, "
            f"pruned {len(self.train_report.pruned)}",
        ]
        folded = list(dict.fromkeys(list(self.forward_report.folded) + list(self.train_report.folded)))  # each once
        if folded:
            lines.append("folded constants: " + ", ".join(folded[:20]) + (" ..." if len(folded) > 20 else ""))
        lines += ["", "== worker subgraph (replicated on every worker) =="]
        for node in g.nodes.values():
            if node.op in ("variable",):
                continue
            where = ("input" if node.op == "placeholder" else "folded" if node.name in folded
                     else "const" if node.op == "constant" else "worker")
            shape = "(" + ", ".join("?" if d is None else str(d) for d in node.shape) + ")"
            lines.append(f"  [{where:6}] {node.name:40} {node.op:34} {shape} {node.dtype}")
        lines += ["", f"== parameter-server shards ({self.mode.value}"
                  + (f", staleness {self.staleness}" if self.mode is Mode.SSP else "") + f"; optimizer {self.optimizer.get('name')}) =="]
        lines.append(format_placement(self.placement))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode.value,
            "staleness": self.staleness,
            "optimizer": self.optimizer,
            "nodes": len(self.graph.nodes),
            "forward_passes": _report_dict(self.forward_report),
            "train_passes": _report_dict(self.train_report),
            "trainable": list(self.train.grads),
            "state_variables": list(self.train.state_variables),
            "shard_bytes": list(self.placement.shard_bytes),
            "slices": [
                {"variable": s.variable, "key": s.key, "shard": s.shard, "start": s.start, "stop": s.stop}
                for s in self.placement.slices
            ],
        }


def _report_dict(r: PassReport) -> dict:
    return {
        "nodes_before": r.nodes_before,
        "nodes_after": r.nodes_after,
        "folded": list(r.folded),
        "merged": dict(r.merged),
        "pruned": list(r.pruned),
    }


def plan_job(spec: JobSpec, num_shards: int) -> JobPlan:
    """Optimise and plan ``spec`` for ``num_shards`` shards."""
    m, t = spec.model, spec.train
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    optimizer = dict(t.optimizer)
    try:
        optimizer_from_config(dict(optimizer))  # validate now, not on the shards
    except (ValueError, TypeError) as exc:
        raise ValueError(f"train.optimizer={json.dumps(optimizer)} is not a valid optimizer config: {exc}") from None

    names = (m.features, m.labels, m.loss, m.prediction)
    keep = set(names) | set(m.weight_order)
    fwd, fwd_report = optimize(m.graph, [m.loss, m.prediction], keep=keep)
    train = build_train_plan(fwd, Tensor(fwd, m.loss), Tensor(fwd, m.prediction), m.features, m.labels)
    outputs = [m.loss, m.prediction] + list(train.grads.values())
    g2, train_report = optimize(train.graph, outputs, keep=keep | set(train.grads.values()))
    train = TrainPlan(g2, m.features, m.labels, m.loss, m.prediction, dict(train.grads), train.state_variables)
    variables = {n.name: (n.shape, n.dtype) for n in g2.nodes.values() if n.op == "variable"}
    placement = place(variables, num_shards)
    return JobPlan(train, placement, fwd_report, train_report, optimizer, t.mode, t.staleness, list(m.weight_order))
