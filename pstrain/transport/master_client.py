"""Client side of the master protocol: used by psctl, ``model.fit(cluster=...)``,
workers and parameter servers. Converts between protobuf messages and plain Python.

Usage::

    m = MasterClient("127.0.0.1:50051")
    job = m.submit(spec)              # spec: pstrain.runtime.spec.JobSpec (client.job.job_to_spec)
    for status, history in m.watch(job["id"]):
        ...
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import grpc
import numpy as np

from graph.core import Graph
from protos import codec, jobcodec, master_pb2, master_pb2_grpc
from pstrain.runtime.spec import HeartbeatReply, JobSpec, SlotRef
from pstrain.transport import rpc
from pstrain.transport.security import Credentials

DEFAULT_MASTER = "127.0.0.1:50051"


def master_address(explicit: str | None = None) -> str:
    """--master, else $PSTRAIN_MASTER, else 127.0.0.1:50051 (the contract)."""
    return explicit or os.environ.get("PSTRAIN_MASTER") or DEFAULT_MASTER


class MasterUnavailable(ConnectionError):
    """No master answers at the address."""


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
        "workers": jobcodec.workers_from_proto(s.workers),
        "owner": s.owner,
    }


class MasterClient:
    def __init__(self, address: str | None = None, timeout: float = 30.0, connect_timeout: float = 5.0,
                 credentials: Credentials | None = None):
        """``credentials``: what calls present (default: this process's, see
        ``pstrain.transport.security``)."""
        self.address = master_address(address)
        self.credentials = credentials
        self.channel = rpc.make_channel(self.address, "master", credentials)
        self.stub = master_pb2_grpc.MasterStub(self.channel)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ready = False

    def _call(self, method, request, timeout=None):
        if not self._ready:
            try:
                rpc.wait_ready(self.channel, self.address, self.connect_timeout)
            except rpc.Unreachable as exc:
                hint = ("" if exc.reason in ("tls", "closed") else
                        ". Start one with `psctl up`, or point --master / $PSTRAIN_MASTER at a running master")
                raise MasterUnavailable(f"cannot reach the pstrain master at {self.address}: {exc}{hint}") from None
            self._ready = True
        return method(request, timeout=timeout or self.timeout)

    # ---- jobs ------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> dict:
        """Submit a job; returns its status dict (``status --json``'s form)."""
        return self.submit_message(jobcodec.job_spec_to_proto(spec))

    def submit_message(self, msg: master_pb2.JobSpec) -> dict:
        """Submit an already-encoded ``JobSpec`` message as it is (tools and tests that
        send malformed specs on purpose)."""
        return status_to_dict(self._call(self.stub.SubmitJob, master_pb2.SubmitJobRequest(spec=msg), timeout=120))

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
            yield status_to_dict(event.job), [jobcodec.history_entry_from_proto(h) for h in event.history]

    def plan(self, spec: JobSpec) -> tuple[str, dict, Graph]:
        """The master's plan of ``spec``: (text, plan dict, optimised training graph)."""
        return self.plan_message(jobcodec.job_spec_to_proto(spec))

    def plan_message(self, msg: master_pb2.JobSpec) -> tuple[str, dict, Graph]:
        """``plan`` of an already-encoded ``JobSpec`` message, sent as it is."""
        r = self._call(self.stub.GetPlan, master_pb2.GetPlanRequest(spec=msg), timeout=120)
        return r.text, json.loads(r.plan_json), codec.graph_from_proto(r.graph)

    def export(self, job_id: str) -> tuple[dict, list[str], list[np.ndarray]]:
        r = self._call(self.stub.ExportModel, master_pb2.ExportModelRequest(id=job_id), timeout=120)
        return json.loads(r.model_config_json), list(r.names), [codec.tensor_from_proto(w) for w in r.weights]

    # ---- nodes ----------------------------------------------------------------------------------
    def register(self, role: str, address: str = "", name: str = "", metrics_address: str = "",
                 running: Sequence[SlotRef] = ()) -> master_pb2.RegisterNodeResponse:
        """Register a node. ``running``: the worker slots a worker is running, so a
        restarted master re-attaches it to those jobs."""
        req = master_pb2.RegisterNodeRequest(role=role, address=address, name=name, metrics_address=metrics_address)
        for slot in running:
            req.running.add(job=slot.job, worker_index=slot.worker, owner_epoch=slot.owner_epoch)
        return self._call(self.stub.RegisterNode, req)

    def heartbeat(self, node_id: str) -> HeartbeatReply:
        """Beat for ``node_id``; the reply carries new tasks (decoded and validated), cancelled and finished jobs."""
        resp = self._call(self.stub.Heartbeat, master_pb2.HeartbeatRequest(node_id=node_id), timeout=10)
        return jobcodec.heartbeat_reply_from_proto(resp)

    def report(self, job: str, worker: int, step: int, epoch: int, loss: float, metrics: dict, step_time: float = 0.0,
               done: bool = False, final: bool = False, error: str = "", wait: bool = True, owner_epoch: int = 0,
               released: bool = False):
        """Report progress; returns True if the worker is to stop (the job was cancelled, or
        this process no longer owns the slot). ``wait=False`` returns at once, with a
        callable that waits and returns that answer."""
        req = master_pb2.ProgressReport(
            job=job, worker=worker, step=step, epoch=epoch, loss=loss, metrics={k: float(v) for k, v in metrics.items()},
            step_time=step_time, done=done, final=final, error=error, owner_epoch=owner_epoch, released=released,
        )
        if wait:
            return self._call(self.stub.ReportProgress, req).cancelled
        future = self._call(self.stub.ReportProgress.future, req)
        return lambda: future.result().cancelled

    def scale(self, job_id: str, workers: int) -> dict:
        """Serve running job ``job_id`` with ``workers`` worker processes (its worker slots
        move between processes; their number is fixed)."""
        return status_to_dict(self._call(self.stub.ScaleJob, master_pb2.ScaleJobRequest(id=job_id, workers=workers)))

    def nodes(self) -> list[dict]:
        """Registered workers and shards: node_id, role, address, index, alive, last_seen."""
        r = self._call(self.stub.ListNodes, master_pb2.ListNodesRequest())
        return [
            {"node_id": n.node_id, "role": n.role, "address": n.address, "index": n.index, "alive": n.alive,
             "last_seen": n.last_seen, "name": n.name, "metrics_address": n.metrics_address, "restarts": n.restarts}
            for n in r.nodes
        ]

    def close(self) -> None:
        self.channel.close()


def describe_error(exc: Exception) -> str:
    """A user-facing one-liner for errors from the master."""
    if isinstance(exc, grpc.RpcError):
        return rpc.describe(exc)
    return str(exc)
