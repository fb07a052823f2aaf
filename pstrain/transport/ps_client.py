"""The client side of the parameter-server protocol for one shard address: the
protobuf calls (init, pull, membership, status, end) and the hot-path raw-frame
push (``pstrain.ParameterServerRaw``, declared in protos/ps.proto), through shared
memory where the shard shares this host.

Usage::

    client = ParameterServerClient("127.0.0.1:50061")
    version, params = client.start_push_pull("job-1", 0, step, grads, {}, min_version=step + 1).result()
"""
from __future__ import annotations

import json
import logging

import grpc

from protos import codec, ps_pb2, ps_pb2_grpc, shm, tensorwire
from protos.shm import Segment
from protos.tensorwire import RAW_SERVICE
from pstrain.transport import rpc

log = logging.getLogger(__name__)


class ParameterServerClient:
    """Client side of the PS protocol for one shard address (workers, master, tests)."""

    def __init__(self, address: str, timeout: float = 30.0):
        self.address = address
        self.channel = rpc.make_channel(address)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)
        self.raw_push = self.channel.unary_unary(f"/{RAW_SERVICE}/Push")  # bytes in, bytes out
        self.raw_echo = self.channel.unary_unary(f"/{RAW_SERVICE}/Echo")  # the same, returning what it gets
        self._attach = self.channel.unary_unary(f"/{RAW_SERVICE}/Attach")
        self.timeout = timeout
        self.segment: Segment | None = None  # set by use_shared_memory

    def use_shared_memory(self, job: str, name: str, request_capacity: int, reply_capacity: int) -> bool:
        """Offer the shard a shared-memory segment for this client's pushes (protos/shm.py);
        True if it took it. False (and frames over gRPC from then on) when it cannot map
        it: another host or container, or ``PSTRAIN_SHM=off``."""
        if not shm.enabled():
            return False
        segment = Segment.create(name, request_capacity, reply_capacity)
        offer = {"name": name, "token": segment.token.hex(), "request_capacity": request_capacity}
        try:
            self._attach(tensorwire.pack({"job": job, "shm": offer}, {}), timeout=self.timeout)
        except grpc.RpcError as exc:
            segment.close()
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.info("shard %s cannot share memory with this process (%s); pushing over gRPC", self.address, exc.details())
            return False
        self.close_segment()
        self.segment = segment
        return True

    def start_push_pull(self, job, worker, step, grads, assigns=None, *, weight=1.0, min_version=0, timeout=600.0,
                        rpc_timeout=660.0, wait=True) -> PushCall:
        """Push with pull, through shared memory when ``use_shared_memory`` took, else a
        raw frame; ``wait=False`` leaves the call in flight. ``.result()`` of what it
        returns gives (version, params: read-only arrays, valid until the next push)."""
        args = (job, worker, step, grads, assigns, weight, True, min_version, timeout)
        frame, size = None, 0
        if self.segment is not None:
            try:
                size = tensorwire.pack_into(self.segment.request, push_meta(*args), push_tensors(grads, assigns))
                frame = tensorwire.pack({"job": job, "shm": {"name": self.segment.name, "size": size}}, {})
            except ValueError:  # does not fit the segment: this one goes as a frame
                frame, size = None, 0
        if frame is None:
            frame = self.push_frame(*args)
        outcome = self.raw_push(frame, timeout=rpc_timeout) if wait else self.raw_push.future(frame, timeout=rpc_timeout)
        return PushCall(self, args, len(frame) + size, outcome, rpc_timeout)

    def close_segment(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None

    @staticmethod
    def push_frame(job, worker, step, grads, assigns=None, weight=1.0, pull=False, min_version=0, timeout=0.0) -> bytes:
        """A raw-frame push (see PushRaw)."""
        return tensorwire.pack(push_meta(job, worker, step, grads, assigns, weight, pull, min_version, timeout),
                               push_tensors(grads, assigns))

    def read_reply(self, reply: bytes) -> tuple[int, bool, dict]:
        """(version, duplicate, params) from a PushRaw reply (params from the segment's
        reply area when the shard put them there)."""
        return self._read_reply(reply)[:3]

    def _read_reply(self, reply: bytes) -> tuple[int, bool, dict, int]:
        """``read_reply`` plus the bytes that came through shared memory."""
        meta, params = tensorwire.unpack(reply)
        shared = int(meta.get("shm_reply", 0))
        if shared:
            if self.segment is None:
                raise RuntimeError(f"shard {self.address} answered through shared memory this client does not have")
            meta, params = tensorwire.unpack(self.segment.reply[:shared])
        return int(meta["version"]), bool(meta["duplicate"]), params, shared

    def init_shard(self, job, shard, variables, trainable, optimizer_json, mode, staleness, workers, checkpoint_every=0):
        req = ps_pb2.InitShardRequest(
            job=job, shard=shard, trainable=sorted(trainable), optimizer_json=optimizer_json, mode=mode,
            staleness=staleness, workers=list(workers), checkpoint_every=checkpoint_every,
        )
        codec.write_named(req.variables, variables)
        return self.stub.InitShard(req, timeout=self.timeout)

    def push_request(self, job, worker, step, grads, assigns=None, weight=1.0, pull=False, min_version=0, timeout=0.0):
        req = ps_pb2.PushRequest(
            job=job, worker=worker, step=step, weight=weight, pull=pull, min_version=min_version, timeout=timeout
        )
        codec.write_named(req.grads, grads)
        codec.write_named(req.assigns, assigns or {})
        return req

    def push(self, request, timeout=None):
        """Send a prepared push; returns (version, duplicate, params or None)."""
        resp = self.stub.Push(request, timeout=timeout or self.timeout)
        return resp.version, resp.duplicate, codec.read_named(resp.params) if request.pull else None

    def push_future(self, request, timeout=None):
        return self.stub.Push.future(request, timeout=timeout or self.timeout)

    def pull(self, job, worker, step, min_version=0, timeout=0.0):
        resp = self.pull_response(job, worker, step, min_version, timeout)
        return resp.version, codec.read_named(resp.params)

    def pull_response(self, job, worker, step, min_version=0, timeout=0.0) -> ps_pb2.PullResponse:
        """``pull`` undecoded (callers that count its bytes)."""
        return self.stub.Pull(
            ps_pb2.PullRequest(job=job, worker=worker, step=step, min_version=min_version, timeout=timeout),
            timeout=(timeout or self.timeout) + 5,
        )

    def set_membership(self, job, live_workers):
        self.stub.SetMembership(ps_pb2.MembershipRequest(job=job, live_workers=list(live_workers)), timeout=self.timeout)

    def status(self, job) -> dict:
        return json.loads(self.stub.Status(ps_pb2.ShardStatusRequest(job=job), timeout=self.timeout).stats_json)

    def end_job(self, job):
        self.stub.EndJob(ps_pb2.EndJobRequest(job=job), timeout=self.timeout)

    def echo(self, payload: bytes) -> bytes:
        return self.stub.Echo(ps_pb2.EchoMessage(payload=payload), timeout=self.timeout).payload

    def close(self):
        self.close_segment()
        self.channel.close()


def push_meta(job, worker, step, grads, assigns, weight, pull, min_version, timeout) -> dict:
    """The meta of a push frame (``grads`` and ``assigns`` only keep the signature that of ``push_frame``)."""
    return {"job": job, "worker": worker, "step": step, "weight": weight, "pull": pull,
            "min_version": min_version, "timeout": timeout}


def push_tensors(grads, assigns) -> dict:
    """A push frame's tensors: gradients as "g:<key>", assignments as "a:<key>"."""
    tensors = {f"g:{k}": v for k, v in grads.items()}
    tensors.update({f"a:{k}": v for k, v in (assigns or {}).items()})
    return tensors


class PushCall:
    """A push with pull from ``ParameterServerClient.start_push_pull``, maybe in flight."""

    def __init__(self, client: ParameterServerClient, args: tuple, sent: int, outcome, rpc_timeout: float):
        self.client, self.args, self.sent, self._outcome, self._rpc_timeout = client, args, sent, outcome, rpc_timeout
        self.received = 0

    def result(self) -> tuple[int, dict]:
        """(version, params); raises the call's grpc.RpcError."""
        reply = self._outcome if isinstance(self._outcome, bytes) else self._outcome.result()
        version, _, params, shared = self.client._read_reply(reply)
        self.received = len(reply) + shared
        return version, params

    def retry(self) -> tuple[int, dict]:
        """Send the same push again, as a frame over gRPC, and stop using shared memory
        with this shard: the first call may still be running there, and two calls must
        not share a segment. Pushes are idempotent (job, worker, step), so the shard
        applies it at most once."""
        self.client.close_segment()  # and frames from now on: the first call may yet write its reply there
        frame = self.client.push_frame(*self.args)
        reply = self.client.raw_push(frame, timeout=self._rpc_timeout)
        self.sent, self.received = self.sent + len(frame), len(reply)
        version, _, params = self.client.read_reply(reply)
        return version, params
