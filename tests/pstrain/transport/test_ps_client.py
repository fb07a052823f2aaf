"""ShardedParameterClient against a fake transport: per-shard fake clients, injected
through ``connect``, that keep their slices, record every call and can fail with a
gRPC status a given number of times. Checked: variables are sliced per shard and
assembled back across 2-3 shards, retryable failures are retried and then succeed,
other failures propagate, and every byte is counted."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos import ps_pb2
from protos.tensorwire import RAW_SERVICE
from pstrain.runtime.placement import place
from pstrain.transport.ps_client import ShardedParameterClient

VARIABLES = {
    "dense/kernel": ((6, 4), np.float32),
    "dense/bias": ((4,), np.float32),
    "scale": ((), np.float32),
    "bn/mean": ((4,), np.float32),
}
LR = 0.5


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(f"fake {code.name}")
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


class FakeCall:
    """What ``start_push_pull`` returns: ``result`` and ``retry`` as ParameterServerClient's PushCall."""

    def __init__(self, shard, push, sent):
        self.shard, self.push, self.sent, self.received = shard, push, sent, 0
        self.checkpoint_due = False

    def result(self):
        return self._answer()

    def retry(self):
        self.sent += self.shard.frame_bytes(*self.push)
        return self._answer()

    def _answer(self):
        version, params = self.shard.apply(*self.push)
        self.received = sum(p.nbytes for p in params.values()) + 10
        return version, params


class FakeShard:
    """One shard: plain SGD over its slices; pushes idempotent per step, as a real shard's."""

    def __init__(self, address, values, fail=0, code=grpc.StatusCode.UNAVAILABLE):
        self.address, self.values = address, {k: v.copy() for k, v in values.items()}
        self.fail, self.code = fail, code
        self.version, self.applied = 0, set()
        self.calls, self.closed, self.offers = [], False, []

    def _maybe_fail(self):
        if self.fail:
            self.fail -= 1
            raise FakeError(self.code)

    @staticmethod
    def frame_bytes(step, grads, assigns, weight, min_version):
        return sum(g.nbytes for g in grads.values()) + sum(a.nbytes for a in assigns.values()) + 100

    def start_push_pull(self, job, worker, step, grads, assigns=None, *, weight=1.0, min_version=0, timeout=600.0,
                        rpc_timeout=660.0, wait=True, owner_epoch=0, checkpoint=False):
        self.calls.append(("push", job, worker, step, {k: np.array(v) for k, v in grads.items()},
                           {k: np.array(v) for k, v in (assigns or {}).items()}, weight, min_version, wait))
        push = (step, grads, assigns or {}, weight, min_version)
        return FakeCall(self, push, self.frame_bytes(*push))

    def apply(self, step, grads, assigns, weight, min_version):
        self._maybe_fail()
        if step not in self.applied:
            self.applied.add(step)
            for k, g in grads.items():
                self.values[k] -= LR * weight * g
            for k, a in assigns.items():
                self.values[k][...] = a
            self.version += 1
        return self.version, {k: v.copy() for k, v in self.values.items()}

    def pull_with_size(self, job, worker, step, min_version=0, timeout=0.0, owner_epoch=0):
        self.calls.append(("pull", job, worker, step))
        self._maybe_fail()
        return self.version, {k: v.copy() for k, v in self.values.items()}, sum(v.nbytes for v in self.values.values())

    def use_shared_memory(self, job, name, request_capacity, reply_capacity):
        self.offers.append((name, request_capacity))
        return False

    def close(self):
        self.closed = True


def initial():
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=shape).astype(dtype) for name, (shape, dtype) in VARIABLES.items()}


def make(num_shards, fail=None, code=grpc.StatusCode.UNAVAILABLE, **kw):
    """A client over ``num_shards`` fakes holding ``initial()``, as the master would have placed it."""
    p = place(VARIABLES, num_shards)
    values = initial()
    shards = {}
    for s in range(num_shards):
        held = p.slice_for_shard(values, s)
        shards[f"shard-{s}"] = FakeShard(f"shard-{s}", held, fail=(fail or {}).get(s, 0), code=code)
    transfers = []
    client = ShardedParameterClient("job-1", 3, list(shards), p, retry_delay=0.0, connect=shards.__getitem__,
                                    on_transfer=lambda sent, received: transfers.append((sent, received)), **kw)
    return client, shards, transfers, p


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_pull_assembles_full_variables_from_every_shard(num_shards):
    client, shards, _, p = make(num_shards)
    params = client.pull()
    want = initial()
    assert set(params) == set(VARIABLES)
    for name in VARIABLES:
        np.testing.assert_array_equal(params[name], want[name])
    assert all(len(p.slices_for(s)) for s in range(num_shards))  # every shard really holds a part
    assert [c[:4] for s in shards.values() for c in s.calls] == [("pull", "job-1", 3, 0)] * num_shards


@pytest.mark.parametrize("num_shards", [2, 3])
def test_push_pull_sends_each_shard_its_slices_and_assembles_the_reply(num_shards):
    client, shards, _, p = make(num_shards)
    client.pull()
    rng = np.random.default_rng(1)
    grads = {n: rng.normal(size=VARIABLES[n][0]).astype(np.float32) for n in ("dense/kernel", "dense/bias", "scale")}
    updates = {"bn/mean": np.full(4, 0.25, np.float32)}
    params = client.push_pull(0, grads, updates, weight=0.5, min_version=1)
    # What each shard got: exactly its rows of the gradients and updates, keyed by slice key.
    for s, shard in enumerate(shards.values()):
        (_, job, worker, step, got_grads, got_updates, weight, min_version, wait), = [c for c in shard.calls if c[0] == "push"]
        assert (job, worker, step, weight, min_version) == ("job-1", 3, 0, 0.5, 1)
        assert wait == (s == num_shards - 1)  # the others stay in flight while the last runs here
        want_grads = p.slice_for_shard(grads, s)
        assert set(got_grads) == set(want_grads)
        for k in want_grads:
            np.testing.assert_array_equal(got_grads[k], want_grads[k])
        assert set(got_updates) == set(p.slice_for_shard(updates, s))
    # What came back, assembled: one SGD step on the full variables.
    want = initial()
    for n, g in grads.items():
        np.testing.assert_allclose(params[n], want[n] - LR * 0.5 * g, rtol=1e-6)
    np.testing.assert_array_equal(params["bn/mean"], updates["bn/mean"])
    assert client.version == 1


def test_the_assembled_variables_are_the_same_on_1_2_and_3_shards():
    grads = {n: np.full(VARIABLES[n][0], 0.125, np.float32) for n in ("dense/kernel", "dense/bias", "scale")}
    results = []
    for num_shards in (1, 2, 3):
        client, _, _, _ = make(num_shards)
        client.pull()
        for step in range(3):
            params = client.push_pull(step, grads, {}, min_version=step + 1)
        results.append({k: v.copy() for k, v in params.items()})
    for other in results[1:]:
        for k in VARIABLES:
            assert np.array_equal(results[0][k], other[k])


def test_shared_memory_is_offered_once_with_room_for_the_shards_slices():
    client, shards, _, p = make(2)
    client.pull()
    client.push_pull(0, {}, {})
    client.push_pull(1, {}, {})
    for s, shard in enumerate(shards.values()):
        (name, room), = shard.offers
        assert name.startswith(f"pstrain-job-1-w3-s{s}-")
        assert room == 2 * p.shard_bytes[s] + 65536


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_retryable_push_failure_is_retried_then_succeeds_once(code):
    client, shards, transfers, _ = make(2, fail={1: 3}, code=code, retries=5)
    client.pull()
    g = {"dense/bias": np.ones(4, np.float32)}
    params = client.push_pull(0, g, {}, min_version=1)
    np.testing.assert_allclose(params["dense/bias"], initial()["dense/bias"] - LR, rtol=1e-6)
    assert shards["shard-1"].version == 1  # applied once, whatever the retries
    assert client.version == 1


def test_a_retryable_pull_failure_is_retried():
    client, shards, _, _ = make(3, fail={2: 2})
    client.pull()
    assert [c[0] for c in shards["shard-2"].calls] == ["pull"] * 3


def test_retries_give_up_after_the_limit():
    client, _, _, _ = make(2, fail={0: 10}, retries=2)
    with pytest.raises(grpc.RpcError) as err:
        client.pull()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND])
def test_a_non_retryable_failure_propagates_at_once(code):
    client, shards, _, _ = make(2)
    client.pull()
    shards["shard-0"].fail, shards["shard-0"].code = 1, code
    with pytest.raises(grpc.RpcError) as err:
        client.push_pull(0, {"dense/bias": np.ones(4, np.float32)}, {})
    assert err.value.code() == code
    assert shards["shard-0"].version == 0


def test_bytes_are_counted_for_every_call():
    client, shards, transfers, p = make(2)
    client.pull()
    pulled = sum(p.shard_bytes)
    assert transfers == [(0, p.shard_bytes[0]), (0, p.shard_bytes[1])]
    shards["shard-0"].fail = 1
    g = {"dense/kernel": np.ones((6, 4), np.float32)}
    client.push_pull(0, g, {})
    pushed = transfers[2:]
    assert len(pushed) == 2
    # shard 0 failed once: the first frame and the retried one were both sent
    frame0 = sum(v.nbytes for v in p.slice_for_shard(g, 0).values()) + 100
    frame1 = sum(v.nbytes for v in p.slice_for_shard(g, 1).values()) + 100
    assert pushed == [(2 * frame0, p.shard_bytes[0] + 10), (frame1, p.shard_bytes[1] + 10)]
    assert client.bytes_sent == 2 * frame0 + frame1
    assert client.bytes_received == pulled + sum(p.shard_bytes) + 20


def test_close_closes_every_shard():
    client, shards, _, _ = make(3)
    client.close()
    assert all(s.closed for s in shards.values())


def test_addresses_must_match_the_placement():
    p = place(VARIABLES, 2)
    with pytest.raises(ValueError, match="1 shard addresses for a placement on 2 shards"):
        ShardedParameterClient("job-1", 0, ["a"], p, connect=lambda a: None)



def test_the_raw_service_the_client_calls_is_the_one_ps_proto_declares():
    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServerRaw"]
    assert service.full_name == RAW_SERVICE
    assert {m.name for m in service.methods} == {"Push", "Attach", "Echo"}


# ---- shard restarts and rollbacks (fault-tolerance issue) ------------------------------------------
class RolledBackError(FakeError):
    def __init__(self, version):
        super().__init__(grpc.StatusCode.ABORTED)
        self.version = version

    def details(self):
        return f"job 'job-1' shard 0 rolled back to version {self.version}; pull and compute again from step {self.version}"


def test_a_restarting_shard_not_found_is_retried_within_retry_for():
    client, shards, _, _ = make(2, fail={1: 3}, code=grpc.StatusCode.NOT_FOUND, retry_for=5.0, retries=0)
    client.pull()
    assert len([c for c in shards["shard-1"].calls if c[0] == "pull"]) == 4


def test_retrying_stops_once_the_task_is_cancelled():
    stop = {"now": False}
    client, shards, _, _ = make(1, fail={0: 100}, retry_for=60.0, retries=0, stop=lambda: stop["now"])
    stop["now"] = True
    with pytest.raises(grpc.RpcError):
        client.pull()
    assert len(shards["shard-0"].calls) == 1


@pytest.mark.parametrize("num_shards", [1, 2])
def test_a_rollback_is_raised_as_rolled_back_with_its_version(num_shards):
    from pstrain.runtime.parameters import RolledBack

    client, shards, _, _ = make(num_shards)
    client.pull()
    shards["shard-0"].fail, shards["shard-0"].code = 1, None
    shards["shard-0"]._maybe_fail = lambda: (_ for _ in ()).throw(RolledBackError(40))
    with pytest.raises(RolledBack) as info:
        client.push_pull(41, {n: np.zeros(s, d) for n, (s, d) in VARIABLES.items() if n != "bn/mean"}, {})
    assert info.value.version == 40 and "rolled back to version 40" in str(info.value)
