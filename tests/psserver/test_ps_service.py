"""The parameter-server gRPC service with real servers on 127.0.0.1 port 0.

The ps-lite invariant over the wire (K worker threads, each with its own clients,
push known gradients N times to S server processes' shards; the pulled values equal
the closed form in every mode), idempotent retried pushes, rejected pushes that
change nothing and carry INVALID_ARGUMENT / RESOURCE_EXHAUSTED, unknown jobs,
pull timeouts, membership changes releasing a sync barrier, Echo and Status.
"""
from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest

from protos import codec, ps_pb2, ps_pb2_grpc
from psserver.config import PSConfig
from psserver.service import serve
from pstrain.runtime.placement import assemble, place, split
from pstrain.transport import rpc
from pstrain.transport.ps_client import ParameterServerClient

JOB = "svc-test"
SGD_LR1 = json.dumps({"name": "sgd", "learning_rate": 1.0})
N_STEPS = 4


# ---- servers and clients ----------------------------------------------------------------------
@pytest.fixture
def cluster():
    """Start parameter servers with ``cluster.start(config)``; all stop in teardown."""

    class Cluster:
        def __init__(self):
            self.servers = []  # (server, servicer)
            self.clients: list[ParameterServerClient] = []

        def start(self, config: PSConfig | None = None) -> str:
            server, port, servicer = serve(config or PSConfig(port=0))
            assert port > 0
            self.servers.append((server, servicer))
            return f"127.0.0.1:{port}"

        def client(self, address: str, timeout: float = 10.0) -> ParameterServerClient:
            c = ParameterServerClient(address, timeout=timeout)
            self.clients.append(c)
            return c

    c = Cluster()
    yield c
    for client in c.clients:
        client.close()
    for server, servicer in c.servers:
        servicer.close()  # wakes blocked pulls so the server threads can finish
        server.stop(grace=None).wait(5)


def initial() -> dict[str, np.ndarray]:
    # Small integers and dyadic gradients below: every sum and mean is exact in float32.
    return {
        "w": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.array([0.5, -0.5, 2.0], np.float32),
        "v": np.arange(5, dtype=np.float32) - 2.0,
    }


def grad(worker: int, name: str) -> np.ndarray:
    """Worker k's gradient of ``name``: (k + 1) * a fixed dyadic pattern."""
    p = initial()[name]
    pattern = (np.arange(p.size, dtype=np.float32).reshape(p.shape) % 4 + 1) / 8
    return ((worker + 1) * pattern).astype(np.float32)


def init_job(cluster, addresses, mode, workers, staleness=0, job=JOB):
    """Place the variables on the shards (one per address), row ranges ps-lite style,
    and initialise each shard; returns the placement."""
    variables = initial()
    placement = place({n: (v.shape, v.dtype) for n, v in variables.items()}, len(addresses))
    admin = [cluster.client(a) for a in addresses]
    for s, client in enumerate(admin):
        tensors = shard_values(placement, variables, s)
        resp = client.init_shard(job, s, tensors, set(tensors), SGD_LR1, mode, staleness, workers)
        assert resp.version == 0 and not resp.restored
    return placement


def init_one(cluster, address, mode, workers, staleness=0, job=JOB) -> ParameterServerClient:
    """One shard holding every variable under its own name; returns a client to it."""
    c = cluster.client(address)
    resp = c.init_shard(job, 0, initial(), set(initial()), SGD_LR1, mode, staleness, workers)
    assert resp.version == 0 and resp.bytes == sum(v.nbytes for v in initial().values())
    return c


def pull_one(c: ParameterServerClient, job=JOB) -> dict[str, np.ndarray]:
    return c.pull(job, worker=0, step=0)[1]


def shard_values(placement, values: dict, shard: int) -> dict[str, np.ndarray]:
    out = {}
    for name, value in values.items():
        for sl, part in zip(placement.slices_of(name), split(value, placement.slices_of(name))):
            if sl.shard == shard:
                out[sl.key] = np.ascontiguousarray(part)
    return out


def pull_all(clients, placement, job=JOB) -> dict[str, np.ndarray]:
    """Pull every shard and assemble full variables."""
    parts = {}
    for c in clients:
        _, params = c.pull(job, worker=0, step=0)
        parts.update(params)
    out = {}
    for name, value in initial().items():
        slices = placement.slices_of(name)
        out[name] = assemble(slices, [parts[s.key] for s in slices], np.empty_like(value))
    return out


def run_threads(fns, timeout: float = 15.0) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        def target():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        return target

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def closed_form(workers, mode: str, steps: int) -> dict[str, np.ndarray]:
    """SGD with learning rate 1 after ``steps`` steps of every worker: sync applies the
    mean of the workers' gradients per step, async and ssp each gradient."""
    out = {}
    for name, p0 in initial().items():
        gs = np.stack([grad(k, name) for k in workers])
        step = gs.mean(axis=0) if mode == "sync" else gs.sum(axis=0)
        out[name] = (p0 - steps * step).astype(np.float32)
    return out


# ---- the ps-lite invariant ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
@pytest.mark.parametrize("num_workers", [1, 3])
@pytest.mark.parametrize("num_servers", [1, 2])
def test_pslite_invariant_over_grpc(cluster, mode, num_workers, num_servers):
    addresses = [cluster.start() for _ in range(num_servers)]
    workers = list(range(num_workers))
    placement = init_job(cluster, addresses, mode, workers, staleness=1 if mode == "ssp" else 0)
    if num_servers > 1:  # the variable set really is split across the processes
        assert all(b > 0 for b in placement.shard_bytes)

    def worker(k: int):
        clients = [cluster.client(a) for a in addresses]
        grads = {name: grad(k, name) for name in initial()}
        for step in range(N_STEPS):
            futures = []
            for s, c in enumerate(clients):
                if mode == "sync":
                    req = c.push_request(JOB, k, step, shard_values(placement, grads, s), weight=1.0,
                                         pull=True, min_version=step + 1, timeout=10.0)
                elif mode == "ssp":  # push, then pull for the next step (waits for the slowest)
                    req = c.push_request(JOB, k, step, shard_values(placement, grads, s), weight=1.0,
                                         pull=True, timeout=10.0)
                else:
                    req = c.push_request(JOB, k, step, shard_values(placement, grads, s), weight=1.0)
                futures.append((c, req, c.push_future(req)))
            for c, req, fut in futures:
                resp = fut.result()
                assert not resp.duplicate
                if mode == "sync":  # the barrier completed exactly this step; the answer is after it
                    assert resp.version == step + 1
                    want = shard_values(placement, closed_form(workers, "sync", step + 1), clients.index(c))
                    got = codec.read_named(resp.params)
                    assert set(got) == set(want)
                    for key in want:
                        np.testing.assert_array_equal(got[key], want[key], err_msg=f"worker {k} step {step} {key}")

    run_threads([lambda k=k: worker(k) for k in workers])

    admin = [cluster.client(a) for a in addresses]
    got = pull_all(admin, placement)
    want = closed_form(workers, mode, N_STEPS)
    for name in initial():
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{mode} {name}")
    for c in admin:
        st = c.status(JOB)
        assert st["mode"] == mode
        assert st["version"] == (N_STEPS if mode == "sync" else N_STEPS * num_workers)
        assert st["applied_pushes"] == N_STEPS * num_workers
        assert st["duplicates"] == 0 and st["rejected"] == {}


# ---- idempotent pushes -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_retried_push_is_applied_once(cluster, mode):
    address = cluster.start()
    c = init_one(cluster, address, mode, [0])
    req = c.push_request(JOB, 0, 0, {n: grad(0, n) for n in initial()}, weight=1.0)
    assert c.push(req) == (1, False, None)
    version, duplicate, _ = c.push(req)  # the very same request: a retry
    assert (version, duplicate) == (1, True)
    got = pull_one(c)
    for name, p0 in initial().items():
        np.testing.assert_array_equal(got[name], p0 - grad(0, name))
    assert c.status(JOB)["duplicates"] == 1


# ---- rejected pushes -----------------------------------------------------------------------------
def _bad_grads():
    nan = grad(0, "w").copy()
    nan[1, 2] = np.nan
    inf = grad(0, "w").copy()
    inf[0, 0] = -np.inf
    return {
        "shape": ("w", {"w": np.zeros((3, 4), np.float32)}),
        "dtype": ("w", {"w": grad(0, "w").astype(np.float64)}),
        "nan": ("w", {"w": nan}),
        "inf": ("w", {"w": inf}),
        "unknown": ("nosuch/kernel", {"nosuch/kernel": np.zeros(3, np.float32)}),
    }


@pytest.mark.parametrize("case", list(_bad_grads()))
def test_rejected_push_is_invalid_argument_and_changes_nothing(cluster, case):
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    variable, bad = _bad_grads()[case]
    grads = {"b": grad(0, "b"), **bad}  # a good tensor alongside: the whole push is refused
    with pytest.raises(grpc.RpcError) as info:
        c.push(c.push_request(JOB, 0, 0, grads))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert f"'{variable}'" in details
    assert JOB in details and "worker 0" in details
    got = pull_one(c)
    for name, p0 in initial().items():
        np.testing.assert_array_equal(got[name], p0)
    st = c.status(JOB)
    assert st["version"] == 0 and st["applied_pushes"] == 0 and sum(st["rejected"].values()) == 1
    # The rejected step was not consumed: a good push for it is still applied.
    assert c.push(c.push_request(JOB, 0, 0, {"b": grad(0, "b")})) == (1, False, None)


LIMIT = 64 * 1024
ONE_MB = 1 << 20


def test_oversize_push_is_resource_exhausted(cluster, monkeypatch):
    """Server and client both read PSTRAIN_MAX_MESSAGE_BYTES: the client refuses to send."""
    monkeypatch.setenv("PSTRAIN_MAX_MESSAGE_BYTES", str(LIMIT))
    address = cluster.start()
    c = cluster.client(address)
    variables = {"big": np.zeros(ONE_MB // 4, np.float32)}
    # InitShard itself would be over the limit; initialise through the servicer directly.
    servicer = cluster.servers[-1][1]
    _init_in_process(servicer, variables)
    with pytest.raises(grpc.RpcError) as info:
        c.push(c.push_request(JOB, 0, 0, {"big": np.ones(ONE_MB // 4, np.float32)}))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details()
    assert str(LIMIT) in details and "larger than max" in details, details
    np.testing.assert_array_equal(servicer.shards[JOB].pull(0, 0)[1]["big"], 0)
    assert servicer.shards[JOB].stats()["version"] == 0


def test_oversize_push_is_refused_by_the_server(cluster, monkeypatch):
    """A client with the default (large) limit: the server's limit refuses the message."""
    monkeypatch.setenv("PSTRAIN_MAX_MESSAGE_BYTES", str(LIMIT))
    address = cluster.start()
    servicer = cluster.servers[-1][1]
    monkeypatch.delenv("PSTRAIN_MAX_MESSAGE_BYTES")
    c = cluster.client(address)  # default limit: 256 MiB
    _init_in_process(servicer, {"big": np.zeros(ONE_MB // 4, np.float32)})
    with pytest.raises(grpc.RpcError) as info:
        c.push(c.push_request(JOB, 0, 0, {"big": np.ones(ONE_MB // 4, np.float32)}))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details()
    assert str(LIMIT) in details and "larger than max" in details, details
    np.testing.assert_array_equal(servicer.shards[JOB].pull(0, 0)[1]["big"], 0)
    # A small push over the same connection still works.
    _init_in_process(servicer, {"small": np.zeros(4, np.float32)}, job="small-job")
    assert c.push(c.push_request("small-job", 0, 0, {"small": np.ones(4, np.float32)}))[:2] == (1, False)


def _init_in_process(servicer, variables, job=JOB):
    req = ps_pb2.InitShardRequest(job=job, shard=0, trainable=sorted(variables), optimizer_json=SGD_LR1,
                                  mode="async", workers=[0])
    codec.write_named(req.variables, variables)
    servicer.InitShard(req, context=None)


# ---- unknown jobs, timeouts, membership ------------------------------------------------------------
def test_push_and_pull_to_unknown_job_is_not_found(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    for call in (
        lambda: c.push(c.push_request("no-such-job", 0, 0, {"b": grad(0, "b")})),
        lambda: c.pull("no-such-job", 0, 0),
        lambda: c.status("no-such-job"),
        lambda: c.set_membership("no-such-job", [0]),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'no-such-job'" in info.value.details()


def test_ended_job_is_not_found(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    c.end_job(JOB)
    c.end_job(JOB)  # ending twice is fine
    with pytest.raises(grpc.RpcError) as info:
        c.pull(JOB, 0, 0)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and JOB in info.value.details()


def test_sync_pull_timeout_is_deadline_exceeded_naming_job_shard_worker(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "sync", [0, 1])
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        c.pull(JOB, worker=1, step=0, min_version=1000, timeout=0.2)
    assert time.monotonic() - t0 < 3.0  # the server's 0.2 s, not the client's deadline
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    details = info.value.details()
    assert f"job '{JOB}'" in details and "shard 0" in details and "worker 1" in details
    assert "1000" in details  # what it waited for

    # The same for a push that asks for the pull: the push is buffered, the wait times out.
    with pytest.raises(grpc.RpcError) as info:
        c.push(c.push_request(JOB, 0, 0, {"b": grad(0, "b")}, pull=True, min_version=1, timeout=0.2))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "worker(s) [1]" in info.value.details()  # who the barrier waits for


def test_set_membership_releases_a_sync_barrier(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "sync", [0, 1])
    req = c.push_request(JOB, 0, 0, {n: grad(0, n) for n in initial()}, pull=True, min_version=1, timeout=10.0)
    fut = c.push_future(req)
    time.sleep(0.2)
    assert not fut.done()  # waiting for worker 1
    assert c.status(JOB)["pending_steps"] == {"0": [0]}
    cluster.client(address).set_membership(JOB, [0])  # worker 1 is gone
    resp = fut.result(timeout=5)
    assert resp.version == 1 and not resp.duplicate
    got = pull_one(c)
    for name, p0 in initial().items():
        np.testing.assert_array_equal(got[name], p0 - grad(0, name))
    # The removed worker's pushes are refused from now on.
    with pytest.raises(grpc.RpcError) as info:
        c.push(c.push_request(JOB, 1, 1, {"b": grad(1, "b")}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker 1 is not live" in info.value.details()


def test_init_shard_twice_keeps_the_first_shard(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    c.push(c.push_request(JOB, 0, 0, {"b": grad(0, "b")}))
    resp = c.init_shard(JOB, 0, initial(), set(initial()), SGD_LR1, "async", 0, [0])
    assert resp.version == 1  # the existing shard (a master retrying InitShard; another spec is refused: test_bounds.py)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"mode": "bogus"}, "bogus"),
        ({"optimizer_json": json.dumps({"name": "nadam"})}, "nadam"),
        ({"workers": [-1]}, "-1"),
    ],
)
def test_bad_init_shard_is_invalid_argument(cluster, change, needle):
    address = cluster.start()
    c = cluster.client(address)
    args = dict(job=JOB, shard=0, variables=initial(), trainable=set(initial()), optimizer_json=SGD_LR1,
                mode="async", staleness=0, workers=[0])
    args.update(change)
    with pytest.raises(grpc.RpcError) as info:
        c.init_shard(**args)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # nothing was created
        c.status(JOB)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# ---- Echo and Status ------------------------------------------------------------------------------
def test_echo_returns_the_same_bytes(cluster):
    c = cluster.client(cluster.start())
    for payload in (b"", b"\x00\xffpstrain", np.random.default_rng(0).bytes(100_000)):
        assert c.echo(payload) == payload


def test_status_returns_stats_json(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "ssp", [0, 2], staleness=1)
    c.push(c.push_request(JOB, 2, 0, {"b": grad(2, "b")}))
    st = c.status(JOB)
    assert st["job"] == JOB and st["shard"] == 0 and st["mode"] == "ssp"
    assert st["version"] == 1 and st["live_workers"] == [0, 2]
    assert st["clocks"] == {"0": 0, "2": 1}
    assert st["bytes"] == sum(v.nbytes for v in initial().values())
    assert st["pushed_bytes"] == initial()["b"].nbytes and st["applied_pushes"] == 1


def test_raw_stub_status_is_json_text(cluster):
    address = cluster.start()
    init_one(cluster, address, "async", [0])
    channel = rpc.make_channel(address)
    try:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        resp = stub.Status(ps_pb2.ShardStatusRequest(job=JOB), timeout=5)
        assert json.loads(resp.stats_json)["job"] == JOB
    finally:
        channel.close()


def test_malformed_tensor_is_invalid_argument(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    req = c.push_request(JOB, 0, 0, {"b": grad(0, "b")})
    req.grads[0].tensor.content = req.grads[0].tensor.content[:-4]  # truncated in transit
    with pytest.raises(grpc.RpcError) as info:
        c.push(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'b'" in info.value.details() and "truncated" in info.value.details()
    np.testing.assert_array_equal(pull_one(c)["b"], initial()["b"])


# ---- known bugs -------------------------------------------------------------------------------------
def test_pull_waiting_when_the_job_ends_is_not_internal(cluster):
    address = cluster.start()
    c = init_one(cluster, address, "sync", [0, 1])
    fut = c.stub.Pull.future(ps_pb2.PullRequest(job=JOB, worker=0, step=0, min_version=5, timeout=10), timeout=10)
    time.sleep(0.2)
    c.end_job(JOB)
    with pytest.raises(grpc.RpcError) as info:
        fut.result(timeout=5)
    assert JOB in info.value.details()
    assert info.value.code() != grpc.StatusCode.INTERNAL, info.value.details()


@pytest.mark.parametrize("job", ["../escape", "ABSOLUTE"])
def test_checkpoint_stays_inside_checkpoint_dir(cluster, tmp_path, job):
    ckpt = tmp_path / "ckpt"
    address = cluster.start(PSConfig(port=0, checkpoint_dir=str(ckpt)))
    c = cluster.client(address)
    job = str(tmp_path / "abs") if job == "ABSOLUTE" else job
    try:
        c.init_shard(job, 0, initial(), set(initial()), SGD_LR1, "async", 0, [0])
        c.end_job(job)  # writes the final checkpoint
    except grpc.RpcError as exc:  # refusing the job name is fine too
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    outside = [p for p in tmp_path.rglob("*.ckpt") if ckpt not in p.parents]
    assert outside == []
