"""Limits on what a job may ask for (master/limits.py): each one accepts a job at the
limit and refuses one just over it with INVALID_ARGUMENT naming the field, the value and
the limit, through a real master on port 0; a job short of registered nodes says what
it waits for and fails after ``pending_timeout``; dataset paths outside the data root
get one message whatever the file, and so does a worker that cannot read a path.
"""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

from graph.core import Graph
from master import limits
from master.config import MasterConfig
from master.service import serve
from protos import jobcodec, master_pb2
from protos.settings import from_sources
from pstrain.runtime import datasets
from pstrain.runtime.spec import JobSpec, ModelSpec, TrainConfig
from pstrain.transport import rpc
from pstrain.transport.master_client import MasterClient
from tests.master.helpers import wait_for

TINY_NODES, TINY_VARIABLE_BYTES = 22, 2440  # the tiny model below: 64*8 + 8 + 8*10 + 10 float32


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def masters(tmp_path):
    """``start(**config)``: a master on port 0 with those settings and a client to it."""
    started = []

    def start(**config):
        server, port, coordinator = serve(MasterConfig(port=0, db=str(tmp_path / f"m{len(started)}.db"), **config))
        client = MasterClient(f"127.0.0.1:{port}", timeout=10.0)
        started.append((server, coordinator, client))
        return client, coordinator

    yield start
    for server, coordinator, client in started:
        client.close()
        server.stop(grace=None).wait(5)
        coordinator.close()


def refused(call, msg) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(msg)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def chain_spec(adds: int) -> JobSpec:
    """A job whose graph is a chain: x*w, then ``adds`` adds of x, then a squared error."""
    g = Graph()
    x = g.placeholder((None, 1), name="x")
    y = g.placeholder((None, 1), name="y")
    h = x * g.variable(np.ones((1, 1), np.float32), name="w")
    for _ in range(adds):
        h = g.add(h, x)
    g.reduce_mean(g.square(h - y), name="loss")
    train = TrainConfig(optimizer={"name": "sgd", "learning_rate": 0.01}, batch_size=4, epochs=1)
    return JobSpec("chain", ModelSpec(g, "x", "y", "loss", "loss"), train, dataset="synthetic")


CHAIN_ADDS = 60
CHAIN_DEPTH = CHAIN_ADDS + 5  # x, mul, the adds, sub, square, reduce_mean


# ---- the pure checks -----------------------------------------------------------------------------
def test_graph_depth_is_the_longest_path_in_nodes():
    g = Graph()
    x = g.placeholder((None, 2), name="x")
    a = g.relu(x, name="a")
    b = g.tanh(g.sigmoid(x, name="b0"), name="b")  # the longer branch
    g.add(a, b, name="out")
    assert limits.graph_depth(g) == (4, "out")
    assert limits.graph_depth(chain_spec(CHAIN_ADDS).model.graph) == (CHAIN_DEPTH, "loss")


def test_graph_depth_of_a_long_chain_needs_no_recursion():
    g = Graph()
    h = g.placeholder((None, 1), name="x")
    for _ in range(5000):  # far beyond Python's recursion limit
        h = g.neg(h)
    assert limits.graph_depth(g)[0] == 5001


@pytest.mark.parametrize("asked, have, text", [
    ((3, 0), (1, 1), "3 workers (1 registered)"),
    ((3, 2), (1, 0), "3 workers (1 registered) and 2 parameter-server shards (0 registered)"),
    ((0, 0), (0, 0), "1 worker (0 registered) and 1 parameter-server shard (0 registered)"),
    ((2, 1), (2, 1), ""),  # enough registered: it only waits for some to be free
    ((0, 0), (5, 2), ""),
])
def test_waiting_for_names_what_is_not_registered(asked, have, text):
    assert limits.waiting_for(*asked, *have) == text


@pytest.mark.parametrize("field, value, words", [
    ("max_graph_nodes", 0, "MasterConfig.max_graph_nodes=0 must be an integer >= 1"),
    ("max_graph_depth", -1, "MasterConfig.max_graph_depth=-1 must be an integer >= 1"),
    ("max_job_workers", 0, "max_job_workers=0"),
    ("max_request_bytes", 2**31, "MasterConfig.max_request_bytes=2147483648 is out of range; allowed [0, "),
    ("max_request_bytes", -1, "max_request_bytes=-1"),
    ("pending_timeout", -1.0, "MasterConfig.pending_timeout=-1.0 must be >= 0"),
    ("data_root", "datasets", "MasterConfig.data_root='datasets' must be an absolute path"),
])
def test_bad_limits_name_the_field(field, value, words):
    with pytest.raises(ValueError) as info:
        MasterConfig(**{field: value})
    assert words in str(info.value)


def test_limits_are_read_from_the_environment():
    config = from_sources(MasterConfig, environ={"PSTRAIN_MAX_GRAPH_NODES": "50", "PSTRAIN_PENDING_TIMEOUT": "2.5",
                                                 "PSTRAIN_DATA_ROOT": "/data"})
    assert (config.max_graph_nodes, config.pending_timeout, config.data_root) == (50, 2.5, "/data")


# ---- every limit at the limit and just over it -----------------------------------------------------
def _request_bytes(spec) -> int:
    return master_pb2.SubmitJobRequest(spec=spec).ByteSize()


def _set_train(field, value):
    def change(spec):
        setattr(spec.train, field, value)
        return value
    return change


# field -> (what the job asks for: a function that sets it on the spec and returns it, the words in the refusal)
LIMITS = {
    "max_graph_nodes": (lambda spec: len(spec.model.graph.nodes), "the graph has {v} nodes"),
    "max_variable_bytes": (lambda spec: TINY_VARIABLE_BYTES, "the variables' initial values total {v} bytes"),
    "max_request_bytes": (_request_bytes, "the request is {v} bytes"),
    "max_epochs": (_set_train("epochs", 5), "train.epochs=5 is out of range; allowed [0, {limit}]"),
    "max_batch_size": (_set_train("batch_size", 16), "train.batch_size=16 is out of range; allowed [1, {limit}]"),
    "max_job_workers": (_set_train("num_workers", 3), "train.num_workers=3 is out of range; allowed [0, {limit}]"),
    "max_job_shards": (_set_train("num_shards", 2), "train.num_shards=2 is out of range; allowed [0, {limit}]"),
}


def test_the_tiny_job_measures_what_the_limits_say(spec):
    assert len(spec.model.graph.nodes) == TINY_NODES
    assert sum(v.nbytes for v in jobcodec.job_spec_from_proto(spec).model.graph.initial_values.values()) \
        == TINY_VARIABLE_BYTES


@pytest.mark.parametrize("field", list(LIMITS))
def test_a_job_at_the_limit_is_accepted(masters, spec, field):
    value = LIMITS[field][0](spec)
    client, _ = masters(**{field: value})
    client.plan_message(spec)
    assert client.submit_message(spec)["state"] == "PENDING"


@pytest.mark.parametrize("field", list(LIMITS))
def test_a_job_just_over_the_limit_is_invalid_argument_naming_field_value_and_limit(masters, spec, field):
    measure, words = LIMITS[field]
    value = measure(spec)
    client, _ = masters(**{field: value - 1})
    flag = f"--{field.replace('_', '-')} / PSTRAIN_{field.upper()}"
    for call in (client.submit_message, client.plan_message):
        details = refused(call, spec)
        assert words.format(v=value, limit=value - 1) in details, details
        assert str(value - 1) in details and flag in details, details
    assert client.list() == []  # nothing was recorded


def test_graph_depth_at_the_limit_and_over_it(masters):
    msg = jobcodec.job_spec_to_proto(chain_spec(CHAIN_ADDS))
    client, _ = masters(max_graph_depth=CHAIN_DEPTH)
    assert client.submit_message(msg)["state"] == "PENDING"
    client, _ = masters(max_graph_depth=CHAIN_DEPTH - 1)
    for call in (client.submit_message, client.plan_message):
        details = refused(call, msg)
        assert (f"job spec: the graph is {CHAIN_DEPTH} nodes deep (its longest path ends at node 'loss'); "
                f"the limit is {CHAIN_DEPTH - 1} (--max-graph-depth / PSTRAIN_MAX_GRAPH_DEPTH)") == details


def test_the_node_count_is_checked_before_the_graph_is_decoded(masters, spec):
    spec.model.graph.nodes[3].inputs.append("no_such_node")  # would fail decoding, naming the node
    client, _ = masters(max_graph_nodes=TINY_NODES - 1)
    details = refused(client.submit_message, spec)
    assert details == (f"job spec: the graph has {TINY_NODES} nodes; the limit is {TINY_NODES - 1} "
                       "(--max-graph-nodes / PSTRAIN_MAX_GRAPH_NODES)")


@pytest.mark.parametrize("field, value, words", [
    ("epochs", -1, "epochs=-1"),
    ("batch_size", 0, "batch_size=0"),
    ("staleness", -1, "staleness=-1"),
    ("num_workers", -3, "num_workers=-3"),
    ("num_shards", -1, "num_shards=-1"),
])
def test_out_of_range_train_settings_are_refused(masters, spec, field, value, words):
    setattr(spec.train, field, value)
    client, _ = masters()
    for call in (client.submit_message, client.plan_message):
        assert words in refused(call, spec)
    assert client.list() == []


def test_zero_epochs_is_accepted(masters, spec):
    spec.train.epochs = 0
    client, _ = masters()
    assert client.submit_message(spec)["state"] == "PENDING"


def test_check_job_refuses_what_the_spec_types_let_through():
    """In-process callers build specs without the wire's checks: the limits hold anyway."""
    job = chain_spec(1)
    for field, value in (("epochs", -5), ("staleness", -4), ("num_workers", -3), ("num_shards", 1000)):
        train = job.train
        object.__setattr__(train, field, value)
        with pytest.raises(ValueError, match=f"train.{field}={value}"):
            limits.check_job(job, MasterConfig())
        object.__setattr__(train, field, 0)


# ---- waiting for nodes ------------------------------------------------------------------------------
def test_a_job_short_of_workers_says_so_then_fails_after_the_pending_timeout(masters, spec):
    spec.train.num_workers, spec.train.num_shards = 3, 1
    client, _ = masters(pending_timeout=1.0)
    job = client.submit_message(spec)
    started = time.monotonic()
    failed = wait_for(lambda: (s := client.get(job["id"]))["state"] == "FAILED" and s, timeout=10.0)
    assert time.monotonic() - started >= 0.9
    what = "3 workers (0 registered) and 1 parameter-server shard (0 registered)"
    assert failed["events"].count(f"waiting for {what}") == 1, failed["events"]
    assert failed["error"] == (f"not started: it waited 1s for {what}; start more nodes, ask for fewer (train "
                               "num_workers / num_shards), or raise --pending-timeout / PSTRAIN_PENDING_TIMEOUT")


def test_the_waiting_event_is_added_only_when_the_numbers_change(masters, spec):
    spec.train.num_workers = 3
    client, _ = masters(pending_timeout=0)  # wait for ever
    client.register("ps", address="127.0.0.1:1", name="ps0")
    client.register("worker", name="w0")
    job = client.submit_message(spec)
    wait_for(lambda: "waiting for 3 workers (1 registered)" in client.get(job["id"])["events"], timeout=10.0)
    time.sleep(0.8)  # a few monitor passes
    client.register("worker", name="w1")
    events = wait_for(lambda: (e := client.get(job["id"])["events"]) and "waiting for 3 workers (2 registered)" in e
                      and e, timeout=10.0)
    waiting = [e for e in events if e.startswith("waiting for")]
    assert waiting == ["waiting for 3 workers (1 registered)", "waiting for 3 workers (2 registered)"]
    assert client.get(job["id"])["state"] == "PENDING"


# ---- dataset paths ----------------------------------------------------------------------------------
def test_paths_outside_the_data_root_get_one_message_whatever_the_file(masters, spec, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.npz").write_bytes(b"exists")
    os.symlink("/etc", root / "etc")  # a link inside the root that leads out of it
    client, _ = masters(data_root=str(root))
    messages = {}
    for path in ("../../etc/passwd", "/etc/shadow", "/etc/nonexistent-file", "/tmp/x/missing.npz", "../outside.npz",
                 "etc/passwd", "a\0b"):
        spec.data.dataset = path
        details = refused(client.submit_message, spec)
        assert details == refused(client.plan_message, spec)
        messages[path] = details.replace(repr(path), "<path>")
    assert len(set(messages.values())) == 1, messages
    assert messages["/etc/shadow"] == (f"dataset <path> is neither a named dataset (digits, mnist, synthetic) nor a "
                                       f"path inside the data root {str(root)!r} (--data-root / PSTRAIN_DATA_ROOT)")
    assert client.list() == []


def test_paths_inside_the_data_root_and_named_datasets_are_accepted(masters, spec, tmp_path):
    root = tmp_path / "root"
    client, coordinator = masters(data_root=str(root))
    for path, stored in (("data.npz", str(root / "data.npz")), ("sub/../data.npz", str(root / "data.npz")),
                         (str(root / "x.npz"), str(root / "x.npz")), ("digits", "digits")):
        spec.data.dataset = path
        job = client.submit_message(spec)
        # The workers load the path joined to the root, not one relative to their own directory.
        assert jobcodec.job_spec_from_bytes(coordinator.store.get(job["id"]).spec).dataset == stored


def test_without_a_data_root_any_path_is_accepted_as_given(masters, spec):
    client, coordinator = masters()
    spec.data.dataset = "relative/data.npz"
    job = client.submit_message(spec)
    assert jobcodec.job_spec_from_bytes(coordinator.store.get(job["id"]).spec).dataset == "relative/data.npz"


def test_a_worker_reports_one_message_for_any_path_it_cannot_read(tmp_path):
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 3)))
    (tmp_path / "secret.npz").write_bytes(b"x")
    (tmp_path / "secret.npz").chmod(0)
    paths = ["missing.npz", "dir.npz", "garbage.npz", "partial.npz", "no-suffix"]
    if os.geteuid() != 0:  # root reads a file whatever its mode
        paths.append("secret.npz")
    seen = set()
    for name in paths:
        path = str(tmp_path / name)
        with pytest.raises(datasets.DatasetUnavailable) as info:
            datasets.load_for_job(path)
        seen.add(rpc.one_line(info.value).replace(repr(path), "<path>"))  # as the worker reports it
    assert seen == {"DatasetUnavailable: dataset <path> is not a named dataset (digits, mnist, synthetic) nor a "
                    "readable .npz file with arrays x_train, y_train, x_test, y_test on this worker"}


def test_a_worker_loads_good_files_and_named_datasets_as_before(tmp_path):
    path = tmp_path / "good.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((6, 3), np.float32), y_train=np.arange(6) % 2,
             x_test=rng.random((2, 3), np.float32), y_test=np.array([0, 1]))
    got, want = datasets.load_for_job(str(path)), datasets.load(path)
    assert got.name == want.name and got.num_classes == want.num_classes == 2
    np.testing.assert_array_equal(got.x_train, want.x_train)
    np.testing.assert_array_equal(got.y_test, want.y_test)
    assert datasets.load_for_job("synthetic").x_train.shape == datasets.load("synthetic").x_train.shape
