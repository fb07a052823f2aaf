"""The master gRPC service with a real server on 127.0.0.1 port 0, driven through
``MasterClient``: job submission and validation (status codes naming the bad node),
the job lifecycle, the node registry and failure detector, scheduling onto a real
parameter server, durability across a master restart, and GetPlan.
"""
from __future__ import annotations

import json
import os
import stat
import threading
import time

import grpc
import numpy as np
import pytest

from master.config import MasterConfig
from master.service import serve
from protos import codec, master_pb2
from psserver.config import PSConfig
from psserver.service import serve as serve_ps
from pstrain.runtime.spec import SlotRef
from pstrain.transport.master_client import MasterClient
from pstrain.transport.ps_client import ParameterServerClient
from pstrain.transport.rpc import describe as rpc_describe
from tests.master.helpers import wait_for

HEARTBEAT_TIMEOUT = 1.0
HEARTBEAT_INTERVAL = 0.2


# ---- fixtures ----------------------------------------------------------------------------------
class Master:
    """A master on port 0 over a db file; ``restart()`` stops it and starts a new one."""

    def __init__(self, db: str, **config):
        self.db = db
        self.config = config
        self.clients: list[MasterClient] = []
        self._start()

    def _start(self):
        config = MasterConfig(port=0, db=self.db, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                              heartbeat_interval=HEARTBEAT_INTERVAL, **self.config)
        self.server, self.port, self.coordinator = serve(config)
        self.address = f"127.0.0.1:{self.port}"

    def client(self) -> MasterClient:
        c = MasterClient(self.address, timeout=10.0)
        self.clients.append(c)
        return c

    def stop(self):
        for c in self.clients:
            c.close()
        self.clients = []
        self.server.stop(grace=None).wait(5)
        self.coordinator.close()

    def restart(self):
        self.stop()
        self._start()


@pytest.fixture
def master(tmp_path):
    m = Master(str(tmp_path / "m.db"))
    yield m
    m.stop()


@pytest.fixture
def ps_server():
    """A real parameter server on port 0; yields (address, servicer)."""
    server, port, servicer = serve_ps(PSConfig(port=0))
    yield f"127.0.0.1:{port}", servicer
    servicer.close()
    server.stop(grace=None).wait(5)


class Heartbeats:
    """Keeps nodes alive from a background thread and collects what the master sends."""

    def __init__(self, client: MasterClient):
        self.client = client
        self.nodes: dict[str, bool] = {}  # node id -> still beating
        self.responses: dict[str, list] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, node_id: str):
        with self._lock:
            self.nodes[node_id] = True
            self.responses[node_id] = []
        self.beat(node_id)

    def silence(self, node_id: str):
        with self._lock:
            self.nodes[node_id] = False

    def beat(self, node_id: str):
        resp = self.client.heartbeat(node_id)
        with self._lock:
            self.responses[node_id].append(resp)
        return resp

    def received(self, node_id: str, field: str) -> list:
        with self._lock:
            return [x for r in self.responses[node_id] for x in getattr(r, field)]

    def _run(self):
        while not self._stop.wait(HEARTBEAT_INTERVAL / 2):
            with self._lock:
                beating = [n for n, on in self.nodes.items() if on]
            for n in beating:
                try:
                    self.beat(n)
                except (grpc.RpcError, ValueError):  # ValueError: the channel was closed
                    pass  # the master is restarting or stopping

    def close(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def heartbeats(master):
    hb = Heartbeats(master.client())
    yield hb
    hb.close()


def nodes_of(spec) -> dict:
    return {n.name: n for n in spec.model.graph.nodes}


# ---- SubmitJob validation -------------------------------------------------------------------------
def _dangling(spec):
    nodes_of(spec)["dense_1/matmul"].inputs[0] = "no_such_node"
    return "dense_1/matmul", "no_such_node"


def _unknown_op(spec):
    nodes_of(spec)["dense/relu"].op = "gelu_fancy"
    return "dense/relu", "gelu_fancy"


def _shape_mismatch(spec):
    nodes_of(spec)["dense/matmul"].shape.dims[1] = 7  # the kernel gives 8 columns
    return "dense/matmul", "(None, 7)"


def _cycle(spec):
    nodes_of(spec)["dense/matmul"].inputs[0] = "dense/relu"  # relu <- bias_add <- matmul <- relu
    return "dense/matmul", "cycle"


def _missing_loss(spec):
    spec.model.loss = "total_loss"
    return "total_loss", "loss"


def _labels_not_placeholder(spec):
    spec.model.labels = "dense/kernel"
    return "dense/kernel", "placeholder"


def _bad_optimizer(spec):
    spec.train.optimizer_json = json.dumps({"name": "rmsprop_fancy"})
    return "rmsprop_fancy", "optimizer"


CORRUPTIONS = {
    "dangling_input": _dangling,
    "unknown_op": _unknown_op,
    "shape_mismatch": _shape_mismatch,
    "cycle": _cycle,
    "missing_loss": _missing_loss,
    "labels_not_placeholder": _labels_not_placeholder,
    "bad_optimizer": _bad_optimizer,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_submit_invalid_spec_is_invalid_argument_naming_the_node(master, spec, corrupt):
    node, needle = CORRUPTIONS[corrupt](spec)
    c = master.client()
    for call in (c.submit_message, c.plan_message):
        with pytest.raises(grpc.RpcError) as info:
            call(spec)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details()
        assert node in details and needle in details, details
    assert c.list() == []  # nothing was recorded


def test_submit_empty_spec_is_invalid_argument(master):
    with pytest.raises(grpc.RpcError) as info:
        master.client().submit_message(master_pb2.JobSpec(name="empty"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features" in info.value.details()


# ---- the job lifecycle without nodes ----------------------------------------------------------------
def test_valid_job_without_nodes_stays_pending_then_cancels(master, spec):
    c = master.client()
    job = c.submit_message(spec)
    assert job["state"] == "PENDING" and job["name"] == "tiny" and job["id"].startswith("job-")
    assert job["error"] is None and job["loss"] is None
    time.sleep(0.4)  # a monitor pass or two: still nothing to run on
    assert c.get(job["id"])["state"] == "PENDING"
    assert [j["id"] for j in c.list()] == [job["id"]]
    assert "submitted" in c.get(job["id"])["events"]

    cancelled = c.cancel(job["id"])
    assert cancelled["state"] == "CANCELLED"
    assert c.get(job["id"])["state"] == "CANCELLED"
    assert c.list()[0]["state"] == "CANCELLED"

    with pytest.raises(grpc.RpcError) as info:
        c.cancel(job["id"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job["id"] in info.value.details() and "CANCELLED" in info.value.details()


def test_unknown_job_is_not_found(master, spec):
    c = master.client()
    known = c.submit_message(spec)["id"]
    for call in (c.get, c.cancel, c.export, lambda i: list(c.watch(i))):
        with pytest.raises(grpc.RpcError) as info:
            call("job-999999")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'job-999999'" in info.value.details() and known in info.value.details()


def test_export_of_a_pending_job_is_failed_precondition(master, spec):
    c = master.client()
    job = c.submit_message(spec)
    with pytest.raises(grpc.RpcError) as info:
        c.export(job["id"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job["id"] in info.value.details() and "PENDING" in info.value.details()


def test_watch_ends_when_the_job_is_cancelled(master, spec):
    c = master.client()
    job = c.submit_message(spec)
    states = []

    def watch():
        for status, _ in c.watch(job["id"]):
            states.append(status["state"])

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    wait_for(lambda: states)
    master.client().cancel(job["id"])
    t.join(5)
    assert not t.is_alive()
    assert states[0] == "PENDING" and states[-1] == "CANCELLED"


# ---- nodes -------------------------------------------------------------------------------------------
def test_register_heartbeat_and_list_nodes(master):
    c = master.client()
    w0 = c.register("worker", name="w0")
    w1 = c.register("worker", name="w1")
    ps = c.register("ps", address="127.0.0.1:1", name="ps0", metrics_address="127.0.0.1:9100")
    assert (w0.index, w1.index, ps.index) == (0, 1, 0)
    assert w0.heartbeat_interval == pytest.approx(HEARTBEAT_INTERVAL)
    assert len({w0.node_id, w1.node_id, ps.node_id}) == 3
    resp = c.heartbeat(w0.node_id)
    assert resp.known and list(resp.tasks) == [] and list(resp.cancelled_jobs) == []

    nodes = {n["node_id"]: n for n in c.nodes()}
    assert nodes[ps.node_id]["role"] == "ps" and nodes[ps.node_id]["address"] == "127.0.0.1:1"
    assert nodes[ps.node_id]["metrics_address"] == "127.0.0.1:9100"
    assert nodes[w1.node_id]["name"] == "w1"
    assert all(n["alive"] for n in nodes.values())
    assert all(0 <= n["last_seen"] < HEARTBEAT_TIMEOUT for n in nodes.values())


def test_silent_node_is_marked_dead_and_forgotten(master, heartbeats):
    c = master.client()
    alive = c.register("worker", name="alive").node_id
    silent = c.register("worker", name="silent").node_id
    heartbeats.add(alive)
    t0 = time.monotonic()
    wait_for(lambda: not {n["node_id"]: n for n in c.nodes()}[silent]["alive"], timeout=HEARTBEAT_TIMEOUT + 2)
    assert time.monotonic() - t0 >= HEARTBEAT_TIMEOUT * 0.9
    nodes = {n["node_id"]: n for n in c.nodes()}
    assert nodes[alive]["alive"] and nodes[silent]["last_seen"] > HEARTBEAT_TIMEOUT
    assert c.heartbeat(silent).known is False  # it must register again
    assert c.heartbeat(alive).known is True


def test_heartbeat_from_unknown_node_is_not_known(master):
    resp = master.client().heartbeat("worker-deadbeef")
    assert resp.known is False and list(resp.tasks) == []


@pytest.mark.parametrize(
    "role, address, needle", [("", "", "role"), ("chief", "", "'chief'"), ("ps", "", "address")]
)
def test_register_validates_role(master, role, address, needle):
    with pytest.raises(grpc.RpcError) as info:
        master.client().register(role, address=address)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    assert master.client().nodes() == []


def start_job(c: MasterClient, heartbeats: Heartbeats, spec, ps_address: str):
    """Submit with no nodes (PENDING), then register a PS and a worker and let the
    scheduler start it. Only the monitor starts the job: submitting onto registered
    nodes races the monitor (see test_submit_races_the_scheduler)."""
    job = c.submit_message(spec)
    assert job["state"] == "PENDING"
    ps, worker = c.register("ps", address=ps_address), c.register("worker", name="w0")
    heartbeats.add(ps.node_id)
    heartbeats.add(worker.node_id)
    wait_for(lambda: c.get(job["id"])["state"] == "RUNNING")
    return job["id"], ps.node_id, worker.node_id


# ---- scheduling onto a real parameter server --------------------------------------------------------------
def test_job_runs_on_registered_nodes_and_cancels(master, heartbeats, ps_server, spec):
    ps_address, ps_servicer = ps_server
    c = master.client()
    job_id, _, worker = start_job(c, heartbeats, spec, ps_address)
    job = c.get(job_id)
    assert job_id in ps_servicer.shards  # InitShard reached the parameter server
    assert any("running on 1 workers and 1 shards" in e for e in job["events"])
    assert job["workers"]["0"]["state"] == "running"  # the worker table is filled

    tasks = wait_for(lambda: heartbeats.received(worker, "tasks"))
    assert len(tasks) == 1
    task = tasks[0]
    assert task.job == job["id"] and task.worker_index == 0 and list(task.workers) == [0]
    assert list(task.shard_addresses) == [ps_address] and list(task.workers) == [0]
    assert {s.variable for s in task.slices} == set(spec.model.weight_order)
    assert set(task.grads) == set(spec.model.weight_order)
    assert task.loss == spec.model.loss and task.train.batch_size == 16 and task.dataset == "digits"

    # The shard holds the model's initial values.
    psc = ParameterServerClient(ps_address)
    try:
        _, params = psc.pull(job["id"], worker=0, step=0)
        init = spec.model.graph.initial_values
        for s in task.slices:
            np.testing.assert_array_equal(params[s.key], codec.tensor_from_proto(init[s.variable])[s.start:s.stop])
    finally:
        psc.close()

    assert c.cancel(job["id"])["state"] == "CANCELLED"
    assert job["id"] not in ps_servicer.shards  # EndJob reached the parameter server
    assert job["id"] in wait_for(lambda: heartbeats.received(worker, "cancelled_jobs"))


def test_job_succeeds_and_exports(master, heartbeats, ps_server, spec, tmp_path):
    ps_address, _ = ps_server
    c = master.client()
    job_id, _, worker = start_job(c, heartbeats, spec, ps_address)
    wait_for(lambda: heartbeats.received(worker, "tasks"))
    assert c.report(job_id, 0, step=3, epoch=0, loss=1.5, metrics={"accuracy": 0.25}) is False
    status = c.get(job_id)
    assert status["step"] == 3 and status["loss"] == pytest.approx(1.5)
    assert status["metrics"]["accuracy"] == pytest.approx(0.25)
    c.report(job_id, 0, step=3, epoch=1, loss=0.0, metrics={}, done=True)
    finished = wait_for(lambda: heartbeats.received(worker, "finished"))
    assert (finished[0].job, finished[0].evaluator) == (job_id, 0)
    c.report(job_id, 0, step=3, epoch=1, loss=1.2, metrics={"accuracy": 0.5}, final=True)
    assert c.get(job_id)["state"] == "SUCCEEDED"
    config, names, weights = c.export(job_id)
    assert names == list(spec.model.weight_order)
    assert config == json.loads(spec.model.model_config_json)
    for name, w in zip(names, weights):  # nothing was pushed: the initial values
        np.testing.assert_array_equal(w, codec.tensor_from_proto(spec.model.graph.initial_values[name]))
    # The weights on disk are the master's alone: it serves them to the submitter or an admin.
    assert stat.S_IMODE(os.stat(tmp_path / "exports").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "exports" / f"{job_id}.npz").st_mode) == 0o600


def test_a_master_without_a_database_file_exports_into_a_private_directory_of_its_own():
    """Not a fixed /tmp/exports, which another user could create first and read or write."""
    servers = [serve(MasterConfig(port=0, db=":memory:", metrics_port=-1)) for _ in range(2)]
    dirs = [coordinator.export_dir for _, _, coordinator in servers]
    for server, _, coordinator in servers:
        assert stat.S_IMODE(os.stat(coordinator.export_dir).st_mode) == 0o700
        server.stop(grace=None).wait(5)
        coordinator.close()
    assert dirs[0] != dirs[1] and not any(os.path.exists(d) for d in dirs)


def test_losing_the_only_worker_fails_the_job_when_no_process_takes_it_over(tmp_path, ps_server, spec):
    """With no other worker process, a lost slot waits ``recovery_timeout`` for one (a
    supervisor restarting the worker), then the job fails saying so."""
    ps_address, _ = ps_server
    m = Master(str(tmp_path / "m.db"), recovery_timeout=1.0)
    hb = Heartbeats(m.client())
    try:
        c = m.client()
        job_id, _, worker = start_job(c, hb, spec, ps_address)
        hb.silence(worker)
        status = wait_for(lambda: (s := c.get(job_id))["state"] == "FAILED" and s, timeout=HEARTBEAT_TIMEOUT + 4)
        assert "worker 0 was lost and no worker process took it over within 1s" in status["error"]
        assert any("worker 0 lost" in e for e in status["events"])
        assert status["workers"]["0"]["state"] == "lost" and "lost at step 0" in status["workers"]["0"]["note"]
    finally:
        hb.close()
        m.stop()


def _two_worker_job(c, heartbeats, spec, ps_address):
    spec.train.num_workers = 2
    job = c.submit_message(spec)
    ps = c.register("ps", address=ps_address)
    w0, w1 = c.register("worker", name="w0"), c.register("worker", name="w1")
    for node in (ps, w0, w1):
        heartbeats.add(node.node_id)
    wait_for(lambda: c.get(job["id"])["state"] == "RUNNING")
    return job["id"], w0, w1


def _tasks(heartbeats, node_id):
    return [(t.worker_index, t.owner_epoch, t.start_step) for t in heartbeats.received(node_id, "tasks")]


def test_a_lost_workers_slot_goes_to_a_survivor_and_its_zombie_is_fenced_off(master, heartbeats, ps_server, spec):
    """Bug: a SIGSTOPped worker, dropped after the heartbeat timeout, came back (SIGCONT),
    had its push refused ("not live"), and the error it reported failed the whole job;
    the dropped worker's part of each batch was never trained again. Its slot now goes
    to another process (owner epoch 1), which computes it from where it stopped; the
    old process's reports are ignored and answered "stop", and the shard refuses it."""
    ps_address, _ = ps_server
    c = master.client()
    job_id, w0, w1 = _two_worker_job(c, heartbeats, spec, ps_address)
    ps = ParameterServerClient(ps_address)
    try:
        ps.push(ps.push_request(job_id, 1, 0, {}, weight=0.0))  # slot 1 pushed step 0 before the pause
        heartbeats.silence(w1.node_id)  # the pause
        assert wait_for(lambda: (1, 1, 1) in _tasks(heartbeats, w0.node_id), timeout=HEARTBEAT_TIMEOUT + 3)
        status = c.get(job_id)
        assert status["workers"]["1"]["state"] == "running" and status["workers"]["1"]["node"] == w0.node_id
        assert status["workers"]["1"]["owner_epoch"] == 1 and "from step 1" in status["workers"]["1"]["note"]
        # The zombie resumes: the shard refuses it, the master ignores it and tells it to stop.
        with pytest.raises(grpc.RpcError) as refused:
            ps.push(ps.push_request(job_id, 1, 1, {}, weight=0.0))
        assert refused.value.code() == grpc.StatusCode.ABORTED and "fenced off" in refused.value.details()
        assert c.report(job_id, 1, step=5, epoch=0, loss=0.5, metrics={}) is True
        assert c.report(job_id, 1, step=5, epoch=0, loss=0.0, metrics={}, error="ABORTED: fenced off") is True
        status = c.get(job_id)
        assert status["state"] == "RUNNING" and status["error"] is None
        assert any("worker 1's previous process" in e and "ignored" in e for e in status["events"])
        # The survivor runs both slots to the end: the job finishes as before.
        for k, epoch in ((0, 0), (1, 1)):
            assert c.report(job_id, k, step=3, epoch=1, loss=0.4, metrics={}, owner_epoch=epoch) is False
            c.report(job_id, k, step=3, epoch=1, loss=0.0, metrics={}, done=True, owner_epoch=epoch)
        finished = wait_for(lambda: heartbeats.received(w0.node_id, "finished"))
        assert (finished[0].job, finished[0].evaluator) == (job_id, 0)
    finally:
        ps.close()


def test_a_new_worker_takes_a_slot_over_and_scale_moves_slots(master, heartbeats, ps_server, spec):
    """Bug: a replacement worker registered and was never given work. A process that
    joins a job short of processes takes a slot from the busiest one (asked to release
    it after its current step); ``scale`` moves slots between processes the same way."""
    ps_address, _ = ps_server
    c = master.client()
    job_id, w0, w1 = _two_worker_job(c, heartbeats, spec, ps_address)
    heartbeats.silence(w1.node_id)
    assert wait_for(lambda: (1, 1, 0) in _tasks(heartbeats, w0.node_id), timeout=HEARTBEAT_TIMEOUT + 3)
    w2 = c.register("worker", name="w2")  # the replacement
    heartbeats.add(w2.node_id)
    release = wait_for(lambda: heartbeats.received(w0.node_id, "release"))
    assert (release[0].job, release[0].worker, release[0].owner_epoch) == (job_id, 1, 1)
    assert c.get(job_id)["workers"]["1"]["state"] == "running"
    c.report(job_id, 1, step=2, epoch=0, loss=0.0, metrics={}, owner_epoch=1, released=True)
    assert wait_for(lambda: (1, 2, 0) in _tasks(heartbeats, w2.node_id))
    status = c.get(job_id)
    assert status["workers"]["1"]["node"] == w2.node_id and status["workers"]["1"]["owner_epoch"] == 2
    assert any("worker 1 moved to w2" in e for e in status["events"])
    # Scale down to one process: w2's slot (the quietest) moves back to w0.
    with pytest.raises(grpc.RpcError) as bad:
        c.scale(job_id, 3)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 to 2 worker processes" in bad.value.details()
    c.scale(job_id, 1)
    release = wait_for(lambda: heartbeats.received(w2.node_id, "release"))
    assert (release[0].worker, release[0].owner_epoch) == (1, 2)
    c.report(job_id, 1, step=0, epoch=0, loss=0.0, metrics={}, owner_epoch=2, released=True)
    assert wait_for(lambda: (1, 3, 0) in _tasks(heartbeats, w0.node_id))
    assert any("scaled to 1 worker processes" in e for e in c.get(job_id)["events"])


def test_a_paused_worker_that_registers_again_before_its_slot_moved_carries_on(master, heartbeats, ps_server, spec):
    """A worker declared lost while no process could take its slot (it was the only
    one) registers again with its slot and owner epoch: it is re-attached, not failed."""
    ps_address, _ = ps_server
    c = master.client()
    job_id, _, worker = start_job(c, heartbeats, spec, ps_address)
    heartbeats.silence(worker)
    wait_for(lambda: c.get(job_id)["workers"]["0"]["state"] == "lost", timeout=HEARTBEAT_TIMEOUT + 3)
    again = c.register("worker", name="w0", running=[SlotRef(job_id, 0, 0)])
    heartbeats.add(again.node_id)
    status = c.get(job_id)
    assert status["state"] == "RUNNING"
    assert status["workers"]["0"]["state"] == "running" and status["workers"]["0"]["node"] == again.node_id
    assert c.report(job_id, 0, step=1, epoch=0, loss=0.5, metrics={}) is False


def test_a_job_started_on_a_dead_shard_waits_for_a_live_one(master, heartbeats, ps_server, spec):
    """Bug: a job submitted just after a shard died (before its heartbeats stopped) failed
    at InitShard; it now stays PENDING and starts on live shards."""
    ps_address, _ = ps_server
    c = master.client()
    dead = c.register("ps", address="127.0.0.1:1")  # nothing listens there
    worker = c.register("worker", name="w0")
    heartbeats.add(dead.node_id)
    heartbeats.add(worker.node_id)
    job = c.submit_message(spec)
    status = wait_for(lambda: (s := c.get(job["id"])) and any("unreachable" in e for e in s["events"]) and s)
    assert status["state"] == "PENDING" and status["error"] is None
    live = c.register("ps", address=ps_address)
    heartbeats.add(live.node_id)
    wait_for(lambda: c.get(job["id"])["state"] == "RUNNING")


def test_watch_streams_are_bounded_and_heartbeats_stay_served(tmp_path, spec):
    """Bug: 70 open WatchJob streams exhausted the master's thread pool: heartbeats
    stopped being served and a healthy shard was declared lost. Streams beyond
    ``max_watchers`` are refused at once (RESOURCE_EXHAUSTED); unary calls keep a
    share of the pool."""
    config = MasterConfig(port=0, db=str(tmp_path / "w.db"), max_workers=8, max_watchers=2,
                          heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL)
    server, port, coordinator = serve(config)
    c = MasterClient(f"127.0.0.1:{port}", timeout=5.0)
    streams = []
    try:
        job = c.submit_message(spec)  # no nodes: it stays PENDING, so its watch streams stay open
        for _ in range(2):
            stream = c.stub.WatchJob(master_pb2.WatchJobRequest(id=job["id"]))
            next(stream)  # open and serving
            streams.append(stream)
        for _ in range(10):  # more than the pool has threads
            refused = c.stub.WatchJob(master_pb2.WatchJobRequest(id=job["id"]))
            with pytest.raises(grpc.RpcError) as info:
                next(refused)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_watchers" in info.value.details() or "PSTRAIN_MAX_WATCHERS" in info.value.details()
        node = c.register("ps", address="127.0.0.1:1")  # unary calls are still served
        assert c.heartbeat(node.node_id).known
        streams.pop().cancel()
        again = wait_for(lambda: _open_watch(c, job["id"]), timeout=5)  # a freed slot is reused
        streams.append(again)
    finally:
        for stream in streams:
            stream.cancel()
        c.close()
        server.stop(grace=None).wait(5)
        coordinator.close()


def _open_watch(c: MasterClient, job_id: str):
    stream = c.stub.WatchJob(master_pb2.WatchJobRequest(id=job_id))
    try:
        next(stream)
    except grpc.RpcError:
        return None
    return stream


# ---- restart -----------------------------------------------------------------------------------------
def test_jobs_survive_a_master_restart(master, ps_server, spec):
    """A master restarted on its database resumes a RUNNING job once the job's shard and
    worker register again (the worker saying which task it still runs); PENDING jobs stay
    PENDING and the scheduler starts them; the job then finishes as if nothing happened."""
    c = master.client()
    ps_address, ps_servicer = ps_server
    heartbeats = Heartbeats(c)
    running = c.get(start_job(c, heartbeats, spec, ps_address)[0])
    pending = c.submit_message(spec)  # the only worker is busy
    cancelled = c.submit_message(spec)
    c.cancel(cancelled["id"])
    assert c.report(running["id"], 0, step=2, epoch=0, loss=1.5, metrics={"accuracy": 0.25}) is False
    heartbeats.close()  # the old master's nodes stop beating

    master.restart()
    c = master.client()
    jobs = {j["id"]: j for j in c.list()}
    assert list(jobs) == [running["id"], pending["id"], cancelled["id"]]  # oldest first
    assert jobs[cancelled["id"]]["state"] == "CANCELLED" and jobs[cancelled["id"]]["error"] is None
    assert jobs[pending["id"]]["state"] == "PENDING"
    assert jobs[running["id"]]["state"] == "RUNNING" and jobs[running["id"]]["step"] == 2
    assert any("master restarted" in e for e in jobs[running["id"]]["events"])
    assert c.nodes() == []  # nodes are not durable: they register again
    assert running["id"] in ps_servicer.shards  # the shard kept the job all along

    beats = Heartbeats(c)
    try:
        ps = c.register("ps", address=ps_address)
        worker = c.register("worker", name="w0", running=[SlotRef(running["id"], 0)])
        beats.add(ps.node_id)
        beats.add(worker.node_id)
        status = wait_for(lambda: (s := c.get(running["id"])) and any("resumed" in e for e in s["events"]) and s)
        assert status["state"] == "RUNNING" and status["workers"]["0"]["node"] == worker.node_id
        assert beats.received(worker.node_id, "tasks") == []  # it already runs the task: nothing new to do
        # The job goes on: the worker finishes, evaluates, and the master exports the weights.
        c.report(running["id"], 0, step=4, epoch=1, loss=0.0, metrics={}, done=True)
        finished = wait_for(lambda: beats.received(worker.node_id, "finished"))
        assert (finished[0].job, finished[0].evaluator) == (running["id"], 0)
        c.report(running["id"], 0, step=4, epoch=1, loss=1.2, metrics={"accuracy": 0.5}, final=True)
        assert c.get(running["id"])["state"] == "SUCCEEDED"
        names = c.export(running["id"])[1]
        assert names == list(spec.model.weight_order)
    finally:
        beats.close()


def test_a_running_job_whose_shard_does_not_come_back_fails_clearly(tmp_path, ps_server, spec):
    ps_address, _ = ps_server
    m = Master(str(tmp_path / "r.db"), recovery_timeout=1.0)
    try:
        c = m.client()
        heartbeats = Heartbeats(c)
        job_id = start_job(c, heartbeats, spec, ps_address)[0]
        heartbeats.close()
        m.restart()
        c = m.client()
        worker = c.register("worker", name="w0", running=[SlotRef(job_id, 0)])  # the worker is back, the shard is not
        beats = Heartbeats(c)
        beats.add(worker.node_id)
        try:
            status = wait_for(lambda: (s := c.get(job_id))["state"] == "FAILED" and s, timeout=10)
        finally:
            beats.close()
        assert "could not resume the job after a master restart" in status["error"]
        assert f"shard(s) 0 ({ps_address}) did not register again" in status["error"]
        assert "\n" not in status["error"]
    finally:
        m.stop()


# ---- GetPlan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2])
def test_get_plan(master, spec, num_shards):
    spec.train.num_shards = num_shards
    text, plan, graph = master.client().plan_message(spec)
    assert "== graph passes ==" in text and "== parameter-server shards (sync; optimizer sgd) ==" in text
    total = sum(64 * 8 + 8 + 8 * 10 + 10 for _ in [0]) * 4
    assert sum(plan["shard_bytes"]) == total and len(plan["shard_bytes"]) == num_shards
    for k, b in enumerate(plan["shard_bytes"]):
        assert f"{k:>5}  {b:>12,}" in text  # per-shard bytes in the table
    assert f"{total:,}" in text
    assert sorted(plan["trainable"]) == sorted(spec.model.weight_order)
    assert {s["variable"] for s in plan["slices"]} == set(spec.model.weight_order)
    assert plan["mode"] == "sync" and plan["optimizer"]["name"] == "sgd"
    # The optimised training graph: forward, loss and one gradient node per variable.
    for name in list(spec.model.weight_order) + [spec.model.loss, spec.model.prediction, "x", "y"]:
        assert name in graph.nodes
    assert plan["nodes"] == len(graph.nodes)
    assert master.client().list() == []  # planning records nothing


# ---- known bugs ----------------------------------------------------------------------------------------
def test_submit_races_the_scheduler(tmp_path, ps_server, spec):
    ps_address, _ = ps_server
    config = MasterConfig(port=0, db=str(tmp_path / "race.db"), heartbeat_timeout=60.0,
                          heartbeat_interval=HEARTBEAT_INTERVAL, monitor_interval=0.001)
    server, port, coordinator = serve(config)
    c = MasterClient(f"127.0.0.1:{port}", timeout=10.0)
    try:
        c.register("ps", address=ps_address)
        workers = [c.register("worker").node_id for _ in range(30)]
        spec.train.num_workers = 1
        errors, ids = [], []
        for _ in range(15):
            try:
                ids.append(c.submit_message(spec)["id"])
            except grpc.RpcError as exc:
                errors.append(rpc_describe(exc))
        tasks: dict[str, int] = {}
        for w in workers:
            for t in c.heartbeat(w).tasks:
                tasks[t.job] = tasks.get(t.job, 0) + 1
        assert errors == []
        assert {j: n for j, n in tasks.items() if n != 1} == {}  # one worker per job, as asked
    finally:
        c.close()
        server.stop(grace=None).wait(5)
        coordinator.close()


def test_one_ps_registered_twice_does_not_lose_slices(master, heartbeats, ps_server, spec):
    ps_address, _ = ps_server
    c = master.client()
    for node in (c.register("ps", address=ps_address), c.register("ps", address=ps_address), c.register("worker")):
        heartbeats.add(node.node_id)
    job = c.submit_message(spec)
    worker = [n["node_id"] for n in c.nodes() if n["role"] == "worker"][0]
    task = wait_for(lambda: heartbeats.received(worker, "tasks"))[0] if job["state"] == "RUNNING" else None
    if task is not None:
        psc = ParameterServerClient(ps_address)
        try:
            _, params = psc.pull(job["id"], worker=0, step=0)
        finally:
            psc.close()
        assert {s.key for s in task.slices} <= set(params)


def test_dead_node_records_are_pruned_and_indices_never_reused(tmp_path):
    """Bug: dead node records stayed forever. A node dead for ``dead_node_ttl`` that no
    job refers to is forgotten; indices keep counting up, so none is given twice."""
    m = Master(str(tmp_path / "m.db"), dead_node_ttl=0.5)
    hb = Heartbeats(m.client())
    try:
        c = m.client()
        w0 = c.register("worker", name="w0")
        hb.add(w0.node_id)
        hb.silence(w0.node_id)
        wait_for(lambda: not any(n["node_id"] == w0.node_id for n in c.nodes()), timeout=HEARTBEAT_TIMEOUT + 3)
        w1 = c.register("worker", name="w1")
        assert (w0.index, w1.index) == (0, 1)
    finally:
        hb.close()
        m.stop()


def test_a_stalled_master_does_not_count_its_own_silence_against_the_nodes(master, heartbeats):
    """After the master itself did not run (SIGSTOP, swapped out) for longer than the
    heartbeat timeout, its nodes get a fresh timeout instead of all being declared lost."""
    c = master.client()
    worker = c.register("worker", name="w0")
    heartbeats.add(worker.node_id)
    heartbeats.silence(worker.node_id)  # silent, as every node is while the master is stopped
    coordinator = master.coordinator
    with coordinator.lock:  # what the master's threads see once it runs again
        coordinator._last_tick -= 10.0
        coordinator.nodes[worker.node_id].last_seen -= 10.0
    time.sleep(3 * coordinator.config.monitor_interval)
    assert [n["alive"] for n in c.nodes()] == [True]
    heartbeats.add(worker.node_id)  # it beats again: still the same live node
    assert [n["node_id"] for n in c.nodes() if n["alive"]] == [worker.node_id]


def test_a_node_that_registers_again_counts_a_restart(master, heartbeats, ps_server):
    """A worker restarted by its supervisor registers under the same name (a shard from
    the same address): ListNodes counts it, the old record is retired, and
    pstrain_node_restarts_total goes up."""
    ps_address, _ = ps_server
    c = master.client()
    first = c.register("worker", name="worker-1")
    heartbeats.add(first.node_id)
    twin = c.register("worker", name="worker-1")  # a live one of the same name: another process
    heartbeats.add(twin.node_id)
    heartbeats.silence(first.node_id)  # the first dies; its supervisor starts it again
    wait_for(lambda: not next(n for n in c.nodes() if n["node_id"] == first.node_id)["alive"],
             timeout=HEARTBEAT_TIMEOUT + 3)
    again = c.register("worker", name="worker-1")
    other = c.register("worker", name="worker-2")
    c.register("ps", address=ps_address)
    c.register("ps", address=ps_address)
    nodes = {n["node_id"]: n for n in c.nodes()}
    assert (nodes[first.node_id]["alive"], nodes[first.node_id]["restarts"]) == (False, 0)
    assert (nodes[twin.node_id]["alive"], nodes[twin.node_id]["restarts"]) == (True, 0)
    assert (nodes[again.node_id]["alive"], nodes[again.node_id]["restarts"]) == (True, 1)
    assert nodes[other.node_id]["restarts"] == 0
    assert sorted(n["restarts"] for n in nodes.values() if n["role"] == "ps") == [0, 1]
    registry = master.coordinator.metrics.registry
    assert registry.get_sample_value("pstrain_node_restarts_total", {"role": "worker"}) == 1
    assert registry.get_sample_value("pstrain_node_restarts_total", {"role": "ps"}) == 1


def test_after_a_master_restart_the_newest_owner_of_a_slot_is_attached(master, ps_server, spec):
    """A slot handed over just before the master died (owner epoch 1, not yet recorded)
    and its fenced-off old process (epoch 0) both register again: the newest owner is
    attached, the old one is not, and its reports are answered "stop"."""
    c = master.client()
    ps_address, _ = ps_server
    heartbeats = Heartbeats(c)
    job_id = start_job(c, heartbeats, spec, ps_address)[0]
    heartbeats.close()

    master.restart()
    c = master.client()
    beats = Heartbeats(c)
    try:
        ps = c.register("ps", address=ps_address)
        newest = c.register("worker", name="w1", running=[SlotRef(job_id, 0, 1)])
        old = c.register("worker", name="w0", running=[SlotRef(job_id, 0, 0)])
        for node in (ps, newest, old):
            beats.add(node.node_id)
        status = wait_for(lambda: (s := c.get(job_id)) and any("resumed" in e for e in s["events"]) and s)
        assert status["workers"]["0"]["node"] == newest.node_id and status["workers"]["0"]["owner_epoch"] == 1
        assert c.report(job_id, 0, step=1, epoch=0, loss=0.5, metrics={}, owner_epoch=0) is True  # fenced off
        assert c.report(job_id, 0, step=1, epoch=0, loss=0.5, metrics={}, owner_epoch=1) is False
    finally:
        beats.close()


def test_a_worker_reserved_for_a_move_is_freed_when_the_job_ends(master, heartbeats, ps_server, spec):
    """Bug (found by the chaos suite): a process reserved as the target of a slot's move
    stayed reserved after the job ended, so the next job asking for every worker waited
    forever. The reservation goes with the job."""
    ps_address, _ = ps_server
    c = master.client()
    job_id, w0, w1 = _two_worker_job(c, heartbeats, spec, ps_address)
    heartbeats.silence(w1.node_id)
    assert wait_for(lambda: (1, 1, 0) in _tasks(heartbeats, w0.node_id), timeout=HEARTBEAT_TIMEOUT + 3)
    w2 = c.register("worker", name="w2")
    heartbeats.add(w2.node_id)
    wait_for(lambda: heartbeats.received(w0.node_id, "release"))  # slot 1 is to move to w2 ...
    for k, epoch in ((0, 0), (1, 1)):  # ... but both slots finish first
        c.report(job_id, k, step=3, epoch=1, loss=0.0, metrics={}, done=True, owner_epoch=epoch)
    wait_for(lambda: heartbeats.received(w0.node_id, "finished"))
    c.report(job_id, 0, step=3, epoch=1, loss=1.2, metrics={"accuracy": 0.5}, final=True)
    assert c.get(job_id)["state"] == "SUCCEEDED"
    wait_for(lambda: all(n.job is None for n in master.coordinator.list_nodes() if n.alive))
