"""Client side of the master protocol: used by psctl, ``model.fit(cluster=...)``,
workers and parameter servers. Converts between protobuf messages and plain Python.

Usage::

    m = MasterClient("127.0.0.1:50051")
    job = m.submit(spec)              # spec: master_pb2.JobSpec (see build_job_spec)
    for status, history in m.watch(job["id"]):
        ...
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import grpc
import numpy as np

from graph.core import Graph
from protos import codec, master_pb2, master_pb2_grpc
from pstrain.transport import rpc

DEFAULT_MASTER = "127.0.0.1:50051"


def master_address(explicit: str | None = None) -> str:
    """--master, else $PSTRAIN_MASTER, else 127.0.0.1:50051 (the contract)."""
    return explicit or os.environ.get("PSTRAIN_MASTER") or DEFAULT_MASTER


class MasterUnavailable(ConnectionError):
    """No master answers at the address."""


@dataclass(frozen=True)
class TrainSettings:
    """How to train: the declarative part of a JobSpec besides the graph."""

    optimizer: dict
    batch_size: int
    epochs: int
    mode: str = "sync"
    staleness: int = 0
    seed: int = 0
    loss_name: str = ""
    metrics: Sequence[str] = ()
    shuffle: bool = True
    device: str = "cpu"
    num_workers: int = 0
    num_shards: int = 0

    def __post_init__(self):
        if self.mode not in ("sync", "async", "ssp"):
            raise ValueError(f"mode={self.mode!r}: use sync, async or ssp")
        if self.staleness < 0:
            raise ValueError(f"staleness={self.staleness} must be >= 0")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 and epochs={self.epochs} >= 0")


@dataclass(frozen=True)
class ModelSignature:
    features: str
    labels: str
    loss: str
    prediction: str
    model_config: dict = field(default_factory=dict)
    weight_order: Sequence[str] = ()


def build_job_spec(name: str, graph: Graph, sig: ModelSignature, train: TrainSettings, dataset: str) -> master_pb2.JobSpec:
    spec = master_pb2.JobSpec(name=name)
    spec.model.graph.CopyFrom(codec.graph_to_proto(graph))
    spec.model.features, spec.model.labels = sig.features, sig.labels
    spec.model.loss, spec.model.prediction = sig.loss, sig.prediction
    spec.model.model_config_json = json.dumps(sig.model_config)
    spec.model.weight_order.extend(sig.weight_order)
    t = spec.train
    t.optimizer_json = json.dumps(train.optimizer)
    t.batch_size, t.epochs, t.mode, t.staleness = train.batch_size, train.epochs, train.mode, train.staleness
    t.seed, t.loss_name, t.shuffle, t.device = train.seed, train.loss_name, train.shuffle, train.device
    t.metrics.extend(train.metrics)
    t.num_workers, t.num_shards = train.num_workers, train.num_shards
    spec.data.dataset = dataset
    return spec


def status_to_dict(s: master_pb2.JobStatus) -> dict:
    """The --json form of a job (contract fields: id, state, step, epoch, loss, metrics, error)."""
    return {
        "id": s.id,
        "name": s.name,
        "state": s.state,
        "step": s.step,
        "epoch": s.epoch,
        "loss": s.loss if s.has_loss else None,
        "metrics": dict(s.metrics),
        "error": s.error or None,
        "created": s.created,
        "updated": s.updated,
        "events": list(s.events),
        "workers": json.loads(s.workers_json) if s.workers_json else {},
    }


class MasterClient:
    def __init__(self, address: str | None = None, timeout: float = 30.0, connect_timeout: float = 5.0):
        self.address = master_address(address)
        self.channel = rpc.make_channel(self.address)
        self.stub = master_pb2_grpc.MasterStub(self.channel)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ready = False

    def _call(self, method, request, timeout=None):
        if not self._ready:
            try:
                rpc.wait_ready(self.channel, self.address, self.connect_timeout)
            except ConnectionError as exc:
                raise MasterUnavailable(
                    f"cannot reach the pstrain master at {self.address}: {exc}. Start one with `psctl up`, "
                    "or point --master / $PSTRAIN_MASTER at a running master"
                ) from None
            self._ready = True
        return method(request, timeout=timeout or self.timeout)

    # ---- jobs ------------------------------------------------------------------------------
    def submit(self, spec: master_pb2.JobSpec) -> dict:
        return status_to_dict(self._call(self.stub.SubmitJob, master_pb2.SubmitJobRequest(spec=spec), timeout=120))

    def get(self, job_id: str) -> dict:
        return status_to_dict(self._call(self.stub.GetJob, master_pb2.GetJobRequest(id=job_id)))

    def list(self) -> list[dict]:
        return [status_to_dict(j) for j in self._call(self.stub.ListJobs, master_pb2.ListJobsRequest()).jobs]

    def cancel(self, job_id: str) -> dict:
        return status_to_dict(self._call(self.stub.CancelJob, master_pb2.CancelJobRequest(id=job_id)))

    def watch(self, job_id: str, since: int = 0) -> Iterator[tuple[dict, list[dict]]]:
        """Yields (status, new history records) until the job ends."""
        self._call(lambda r, timeout: None, None)  # connect (clear error when down)
        for event in self.stub.WatchJob(master_pb2.WatchJobRequest(id=job_id, since=since)):
            yield status_to_dict(event.job), [json.loads(h) for h in event.history_json]

    def plan(self, spec: master_pb2.JobSpec) -> tuple[str, dict, Graph]:
        r = self._call(self.stub.GetPlan, master_pb2.GetPlanRequest(spec=spec), timeout=120)
        return r.text, json.loads(r.plan_json), codec.graph_from_proto(r.graph)

    def export(self, job_id: str) -> tuple[dict, list[str], list[np.ndarray]]:
        r = self._call(self.stub.ExportModel, master_pb2.ExportModelRequest(id=job_id), timeout=120)
        return json.loads(r.model_config_json), list(r.names), [codec.tensor_from_proto(w) for w in r.weights]

    # ---- nodes ----------------------------------------------------------------------------------
    def register(self, role: str, address: str = "", name: str = "", metrics_address: str = "") -> master_pb2.RegisterNodeResponse:
        req = master_pb2.RegisterNodeRequest(role=role, address=address, name=name, metrics_address=metrics_address)
        return self._call(self.stub.RegisterNode, req)

    def heartbeat(self, node_id: str, status: dict | None = None) -> master_pb2.HeartbeatResponse:
        req = master_pb2.HeartbeatRequest(node_id=node_id, status_json=json.dumps(status or {}))
        return self._call(self.stub.Heartbeat, req, timeout=10)

    def report(self, job: str, worker: int, step: int, epoch: int, loss: float, metrics: dict, step_time: float = 0.0,
               done: bool = False, final: bool = False, error: str = "", wait: bool = True):
        """Report progress; returns True if the job was cancelled. ``wait=False`` returns
        at once, with a callable that waits and returns that answer."""
        req = master_pb2.ProgressReport(
            job=job, worker=worker, step=step, epoch=epoch, loss=loss, metrics={k: float(v) for k, v in metrics.items()},
            step_time=step_time, done=done, final=final, error=error,
        )
        if wait:
            return self._call(self.stub.ReportProgress, req).cancelled
        future = self._call(self.stub.ReportProgress.future, req)
        return lambda: future.result().cancelled

    def nodes(self) -> list[dict]:
        """Registered workers and shards: node_id, role, address, index, alive, last_seen."""
        r = self._call(self.stub.ListNodes, master_pb2.ListNodesRequest())
        return [
            {"node_id": n.node_id, "role": n.role, "address": n.address, "index": n.index, "alive": n.alive,
             "last_seen": n.last_seen, "name": n.name, "metrics_address": n.metrics_address}
            for n in r.nodes
        ]

    def close(self) -> None:
        self.channel.close()


def describe_error(exc: Exception) -> str:
    """A user-facing one-liner for errors from the master."""
    if isinstance(exc, grpc.RpcError):
        return rpc.describe(exc)
    return str(exc)
