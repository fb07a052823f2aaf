"""protos.jobcodec: plain job types <-> master.proto messages, round trips and clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from graph.errors import GraphError
from protos import codec, jobcodec, master_pb2
from pstrain.runtime.modes import Mode
from pstrain.runtime.spec import Device, HeartbeatReply, JobSpec, Progress, SliceSpec, SlotRef, TaskSpec
from tests.pstrain.runtime.test_spec import small_model, train


def spec() -> JobSpec:
    return JobSpec("tiny", small_model(), train(mode="ssp", staleness=2, metrics=["accuracy"], seed=7,
                                                num_workers=2, num_shards=1, device="auto"), dataset="digits")


def test_job_spec_round_trip():
    s = spec()
    msg = jobcodec.job_spec_to_proto(s)
    assert msg.train.mode == "ssp" and msg.train.device == "auto" and msg.data.dataset == "digits"
    back = jobcodec.job_spec_from_bytes(msg.SerializeToString())
    assert back.train == s.train and back.name == s.name and back.dataset == s.dataset
    assert back.model.weight_order == s.model.weight_order and back.model.model_config == s.model.model_config
    assert codec.graph_to_bytes(back.model.graph) == codec.graph_to_bytes(s.model.graph)
    assert back.train.mode is Mode.SSP and back.train.device is Device.AUTO


def test_unset_fields_take_defaults():
    msg = jobcodec.job_spec_to_proto(spec())
    msg.train.ClearField("mode")
    msg.train.ClearField("optimizer_json")
    msg.train.ClearField("device")
    back = jobcodec.job_spec_from_proto(msg)
    assert back.train.mode is Mode.SYNC and back.train.optimizer == {"name": "sgd"} and back.train.device is Device.AUTO


@pytest.mark.parametrize("text", ["{not json", '"sgd"', "[1, 2]"])
def test_malformed_json_names_the_field(text):
    msg = jobcodec.job_spec_to_proto(spec())
    msg.train.optimizer_json = text
    with pytest.raises(ValueError, match="optimizer_json"):
        jobcodec.job_spec_from_proto(msg)


def test_bad_fields_name_themselves():
    msg = jobcodec.job_spec_to_proto(spec())
    msg.train.batch_size = 0
    with pytest.raises(ValueError, match="train: batch_size=0"):
        jobcodec.job_spec_from_proto(msg)
    msg = jobcodec.job_spec_to_proto(spec())
    msg.model.loss = "missing"
    with pytest.raises(GraphError, match="'missing'"):
        jobcodec.job_spec_from_proto(msg)


def test_an_empty_message_is_refused():
    with pytest.raises(GraphError, match="features"):
        jobcodec.job_spec_from_proto(master_pb2.JobSpec(name="empty"))


def test_task_round_trip():
    s = spec()
    task = TaskSpec(job="job-1", worker_index=0, workers=(0, 1), graph=s.model.graph, features="x", labels="y",
                    loss="loss", prediction="pred", grads={"w": "loss/grad_w"}, state_variables=(),
                    slices=(SliceSpec("w", "w[0:2]", 0, 0, 2), SliceSpec("w", "w[2:3]", 1, 2, 3)),
                    shard_addresses=("127.0.0.1:1", "127.0.0.1:2"), train=s.train, dataset="digits",
                    owner_epoch=3, start_step=41)
    back = jobcodec.task_from_proto(master_pb2.Task.FromString(jobcodec.task_to_proto(task).SerializeToString()))
    for f in ("job", "worker_index", "workers", "features", "labels", "loss", "prediction", "grads", "state_variables",
              "slices", "shard_addresses", "train", "dataset", "owner_epoch", "start_step"):
        assert getattr(back, f) == getattr(task, f), f
    np.testing.assert_array_equal(back.graph.initial_values["w"], task.graph.initial_values["w"])


def test_progress_round_trip():
    p = Progress("job-1", 1, step=10, epoch=2, loss=0.25, metrics={"accuracy": 0.5}, step_time=0.01, done=True)
    assert jobcodec.progress_from_proto(jobcodec.progress_to_proto(p)) == p
    released = Progress("job-1", 1, step=7, owner_epoch=2, released=True)
    assert jobcodec.progress_from_proto(jobcodec.progress_to_proto(released)) == released


def test_heartbeat_reply_carries_slots_to_release():
    reply = HeartbeatReply(True, release=(SlotRef("job-1", 1, 2), SlotRef("job-1", 0, 0)))
    msg = master_pb2.HeartbeatResponse.FromString(jobcodec.heartbeat_reply_to_proto(reply).SerializeToString())
    assert jobcodec.heartbeat_reply_from_proto(msg) == reply


@pytest.mark.parametrize("entry", [
    {"time": 1.5, "step": 10, "epoch": 0, "loss": 0.7, "worker": 1, "accuracy": 0.5},
    {"time": 2.0, "step": 20, "epoch": 1, "loss": 0.6, "worker": 0, "accuracy": 0.6, "val_loss": 0.65,
     "val_accuracy": 0.55},
    {"time": 3.0, "step": 20, "epoch": 1, "loss": None, "worker": 0, "val_accuracy": 0.9, "final": True},
    {"time": 4.0, "step": 0, "epoch": 0, "loss": 1.0},  # no worker: the store's own fill-ins only
])
def test_history_entries_round_trip(entry):
    msg = master_pb2.HistoryEntry.FromString(jobcodec.history_entry_to_proto(entry).SerializeToString())
    assert jobcodec.history_entry_from_proto(msg) == entry


def test_worker_table_round_trips():
    workers = {0: {"node": "worker-1", "state": "running", "step": 5, "step_time": 0.01, "owner_epoch": 0, "note": ""},
               1: {"node": "worker-2", "state": "lost", "step": 3, "step_time": 0.0, "owner_epoch": 2,
                   "note": "w1 lost at step 3 (no heartbeat for 5.0s)"}}
    status = master_pb2.JobStatus()
    jobcodec.workers_to_proto(workers, status.workers)
    back = jobcodec.workers_from_proto(master_pb2.JobStatus.FromString(status.SerializeToString()).workers)
    assert back == {str(i): w for i, w in workers.items()}
