"""Convert the job messages of ``protos/master.proto`` to and from the core's plain
types (``pstrain.runtime.spec``): the one place a ``JobSpec``, ``TrainConfig``,
``Task``, ``HeartbeatResponse`` or ``ProgressReport`` crosses between protobuf and dataclasses. The
services and clients call these at their edge and work with plain types inside.

Decoding validates: a graph goes through ``codec.graph_from_proto`` (unknown ops,
cycles, shapes, dtypes), every other field through the dataclasses' own checks, and
a malformed JSON document raises ValueError naming its field.

Usage::

    msg = job_spec_to_proto(spec)          # client side: plain -> wire
    spec = job_spec_from_proto(msg)        # master side: wire -> plain (validated)
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from protos import codec, master_pb2
from pstrain.runtime.spec import (
    FinishedJob,
    HeartbeatReply,
    JobSpec,
    ModelSpec,
    Progress,
    SliceSpec,
    SlotRef,
    TaskSpec,
    TrainConfig,
)


def _json_object(text: str, field_name: str, default: dict) -> dict:
    if not text:
        return dict(default)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{field_name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field_name} must be a JSON object, got {type(value).__name__}")
    return value


# ---- train config --------------------------------------------------------------------------------
def train_config_to_proto(t: TrainConfig, msg: master_pb2.TrainConfig | None = None) -> master_pb2.TrainConfig:
    msg = master_pb2.TrainConfig() if msg is None else msg
    msg.optimizer_json = json.dumps(dict(t.optimizer))
    msg.batch_size, msg.epochs, msg.mode, msg.staleness = t.batch_size, t.epochs, t.mode.value, t.staleness
    msg.seed, msg.loss_name, msg.shuffle, msg.device = t.seed, t.loss_name, t.shuffle, t.device.value
    msg.metrics.extend(t.metrics)
    msg.num_workers, msg.num_shards = t.num_workers, t.num_shards
    return msg


def train_config_from_proto(msg: master_pb2.TrainConfig) -> TrainConfig:
    try:
        return TrainConfig(
            optimizer=_json_object(msg.optimizer_json, "train.optimizer_json", {"name": "sgd"}),
            batch_size=msg.batch_size, epochs=msg.epochs, mode=msg.mode or "sync", staleness=msg.staleness,
            seed=msg.seed, loss_name=msg.loss_name, metrics=tuple(msg.metrics), shuffle=msg.shuffle,
            device=msg.device or "auto", num_workers=msg.num_workers, num_shards=msg.num_shards,
        )
    except ValueError as exc:
        raise ValueError(f"train: {exc}") from None


# ---- job spec ------------------------------------------------------------------------------------
def job_spec_to_proto(spec: JobSpec) -> master_pb2.JobSpec:
    msg = master_pb2.JobSpec(name=spec.name)
    m = spec.model
    msg.model.graph.CopyFrom(codec.graph_to_proto(m.graph))
    msg.model.features, msg.model.labels, msg.model.loss, msg.model.prediction = m.features, m.labels, m.loss, m.prediction
    msg.model.model_config_json = json.dumps(dict(m.model_config))
    msg.model.weight_order.extend(m.weight_order)
    train_config_to_proto(spec.train, msg.train)
    msg.data.dataset = spec.dataset
    return msg


def job_spec_from_proto(msg: master_pb2.JobSpec) -> JobSpec:
    """The plain, validated ``JobSpec`` of a submitted message (GraphError / ValueError naming what is wrong)."""
    m = msg.model
    graph = codec.graph_from_proto(m.graph)  # validates: ops, edges, cycles, shapes, dtypes
    model = ModelSpec(
        graph, m.features, m.labels, m.loss, m.prediction,
        model_config=_json_object(m.model_config_json, "model.model_config_json", {}),
        weight_order=tuple(m.weight_order),
    )
    return JobSpec(msg.name, model, train_config_from_proto(msg.train), msg.data.dataset or "mnist")


def job_spec_to_bytes(spec: JobSpec) -> bytes:
    return job_spec_to_proto(spec).SerializeToString()


def job_spec_from_bytes(data: bytes) -> JobSpec:
    msg = master_pb2.JobSpec()
    msg.ParseFromString(data)
    return job_spec_from_proto(msg)


# ---- task ----------------------------------------------------------------------------------------
def task_to_proto(task: TaskSpec) -> master_pb2.Task:
    t = master_pb2.Task(
        job=task.job, worker_index=task.worker_index, features=task.features, labels=task.labels,
        loss=task.loss, prediction=task.prediction,
    )
    t.graph.CopyFrom(codec.graph_to_proto(task.graph))
    t.grads.update(task.grads)
    t.state_variables.extend(task.state_variables)
    for s in task.slices:
        t.slices.add(variable=s.variable, key=s.key, shard=s.shard, start=s.start, stop=s.stop)
    t.shard_addresses.extend(task.shard_addresses)
    train_config_to_proto(task.train, t.train)
    t.data.dataset = task.dataset
    t.workers.extend(task.workers)
    t.owner_epoch, t.start_step = task.owner_epoch, task.start_step
    return t


def task_from_proto(t: master_pb2.Task) -> TaskSpec:
    return TaskSpec(
        job=t.job, worker_index=t.worker_index, workers=tuple(t.workers), graph=codec.graph_from_proto(t.graph),
        features=t.features, labels=t.labels, loss=t.loss, prediction=t.prediction, grads=dict(t.grads),
        state_variables=tuple(t.state_variables),
        slices=tuple(SliceSpec(s.variable, s.key, s.shard, s.start, s.stop) for s in t.slices),
        shard_addresses=tuple(t.shard_addresses), train=train_config_from_proto(t.train), dataset=t.data.dataset,
        owner_epoch=t.owner_epoch, start_step=t.start_step,
    )


# ---- heartbeat -----------------------------------------------------------------------------------
def heartbeat_reply_to_proto(reply: HeartbeatReply) -> master_pb2.HeartbeatResponse:
    msg = master_pb2.HeartbeatResponse(known=reply.known, cancelled_jobs=list(reply.cancelled_jobs))
    msg.tasks.extend(task_to_proto(t) for t in reply.tasks)
    for f in reply.finished:
        msg.finished.add(job=f.job, evaluator=f.evaluator)
    for r in reply.release:
        msg.release.add(job=r.job, worker_index=r.worker, owner_epoch=r.owner_epoch)
    return msg


def heartbeat_reply_from_proto(msg: master_pb2.HeartbeatResponse) -> HeartbeatReply:
    return HeartbeatReply(
        known=msg.known, tasks=tuple(task_from_proto(t) for t in msg.tasks), cancelled_jobs=tuple(msg.cancelled_jobs),
        finished=tuple(FinishedJob(f.job, f.evaluator) for f in msg.finished),
        release=tuple(SlotRef(r.job, r.worker_index, r.owner_epoch) for r in msg.release),
    )


# ---- progress ------------------------------------------------------------------------------------
def progress_to_proto(p: Progress) -> master_pb2.ProgressReport:
    return master_pb2.ProgressReport(
        job=p.job, worker=p.worker, step=p.step, epoch=p.epoch, loss=p.loss, metrics=dict(p.metrics),
        step_time=p.step_time, done=p.done, final=p.final, error=p.error, owner_epoch=p.owner_epoch,
        released=p.released,
    )


def progress_from_proto(r: master_pb2.ProgressReport) -> Progress:
    return Progress(
        job=r.job, worker=r.worker, step=r.step, epoch=r.epoch, loss=r.loss, metrics=dict(r.metrics),
        step_time=r.step_time, done=r.done, final=r.final, error=r.error, owner_epoch=r.owner_epoch,
        released=r.released,
    )


# ---- job status: workers and history -----------------------------------------------------------
_HISTORY_FIELDS = ("time", "worker", "step", "epoch", "loss", "final")


def workers_to_proto(workers: Mapping[int, Mapping[str, Any]], field) -> None:
    """Fill ``JobStatus.workers`` from the store's worker table (slot -> node, state, step,
    step_time, owner_epoch, note)."""
    for index, w in workers.items():
        field[int(index)].CopyFrom(master_pb2.WorkerStatus(
            node=str(w.get("node", "")), state=str(w.get("state", "")), step=int(w.get("step", 0)),
            step_time=float(w.get("step_time", 0.0)), owner_epoch=int(w.get("owner_epoch", 0)),
            note=str(w.get("note", "")),
        ))


def workers_from_proto(field) -> dict[str, dict[str, Any]]:
    """``status --json``'s ``workers``: ``{"0": {"node", "state", "step", "step_time", "owner_epoch", "note"}, ...}``."""
    return {str(i): {"node": w.node, "state": w.state, "step": w.step, "step_time": w.step_time,
                     "owner_epoch": w.owner_epoch, "note": w.note}
            for i, w in sorted(field.items())}


def history_entry_to_proto(entry: Mapping[str, Any]) -> master_pb2.HistoryEntry:
    """A stored history entry (``time``, ``worker``, ``step``, ``epoch``, ``loss``, ``final``
    and the metrics beside them) as a typed message."""
    msg = master_pb2.HistoryEntry(time=float(entry.get("time", 0.0)), step=int(entry.get("step", 0)),
                                  epoch=int(entry.get("epoch", 0)), final=bool(entry.get("final", False)))
    if entry.get("worker") is not None:
        msg.worker = int(entry["worker"])
    if entry.get("loss") is not None:
        msg.loss = float(entry["loss"])
    for k, v in entry.items():
        if k not in _HISTORY_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool):
            msg.metrics[k] = float(v)
    return msg


def history_entry_from_proto(msg: master_pb2.HistoryEntry) -> dict[str, Any]:
    """The entry as clients read it: ``{"time", "step", "epoch", "loss", ["worker"], ["final"], **metrics}``."""
    entry: dict[str, Any] = {"time": msg.time, "step": msg.step, "epoch": msg.epoch,
                             "loss": msg.loss if msg.HasField("loss") else None}
    if msg.HasField("worker"):
        entry["worker"] = msg.worker
    entry.update(msg.metrics)
    if msg.final:
        entry["final"] = True
    return entry
