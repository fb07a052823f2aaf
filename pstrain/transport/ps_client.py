"""The client side of the parameter-server protocol.

- ``ShardedParameterClient``: what a worker trains against — the ``ParameterClient``
  interface (``pull``, ``push_pull`` of full variables) over all of a job's shards;
  slicing, shared memory, frames, deadlines and retries are its business.
- ``ParameterServerClient``: one shard address: the protobuf calls (init, pull,
  membership, status, end; the master uses these) and the hot-path raw-frame push
  (``pstrain.ParameterServerRaw``, declared in protos/ps.proto), through shared
  memory where the shard shares this host.

Usage::

    params = ShardedParameterClient("job-1", 0, ["127.0.0.1:50061", "127.0.0.1:50062"], placement)
    values = params.pull()
    values = params.push_pull(step, grads, updates, min_version=step + 1)

    client = ParameterServerClient("127.0.0.1:50061")
    version, params = client.start_push_pull("job-1", 0, step, grads, {}, min_version=step + 1).result()
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np

from protos import codec, ps_pb2, ps_pb2_grpc, shm, tensorwire
from protos.shm import Segment
from protos.tensorwire import RAW_SERVICE
from pstrain.runtime.parameters import Fenced, ParameterClient, RolledBack
from pstrain.runtime.placement import Placement
from pstrain.transport import rpc
from pstrain.transport.security import Credentials

log = logging.getLogger(__name__)

# What a retry may cure: the shard restarting or briefly unreachable, a deadline hit
# under load. Anything else (a rejected push, an unknown job) would fail again.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A shard process restarted by its supervisor answers NOT_FOUND for the job until the
# master has initialised it again (from its checkpoint): retried too, within retry_for.
RESTARTING = grpc.StatusCode.NOT_FOUND
_ROLLED_BACK = re.compile(r"rolled back to version (\d+)")
_FENCED = "is fenced off"


def shard_aborted(exc: grpc.RpcError) -> RolledBack | Fenced | None:
    """What an ABORTED call means: ``RolledBack`` from a shard that rolled back,
    ``Fenced`` when another process took this worker slot over; else None."""
    if exc.code() != grpc.StatusCode.ABORTED:
        return None
    details = exc.details() or ""
    if _FENCED in details:
        return Fenced(details)
    m = _ROLLED_BACK.search(details)
    return RolledBack(int(m.group(1)), details) if m else None


class ShardedParameterClient(ParameterClient):
    """One worker's parameters across all shards of a job, over gRPC.

    ``placement`` says which rows of which variable each shard holds (a worker
    rebuilds it from its task with ``placement.layout``). Each ``push_pull`` sends
    every shard its slices of the gradients and updates at once and assembles the
    slices that come back into full arrays: one round trip per step. Calls that fail
    with UNAVAILABLE or DEADLINE_EXCEEDED are retried ``retries`` times with
    exponential backoff from ``retry_delay`` seconds (a push is idempotent per
    (job, worker, step), so resending one is safe). ``timeout`` is how long a shard
    may hold a pull for its version; ``rpc_timeout`` the deadline of a push.
    ``on_transfer(sent, received)`` hears the bytes of every call; ``connect`` makes
    the client of one shard address (tests pass fakes). ``owner_epoch`` is this process's
    ownership epoch of worker slot ``worker``: once another process takes the slot
    over (a newer epoch), every call raises ``Fenced``.

    Usage::

        params = ShardedParameterClient(job, worker, addresses, placement, on_transfer=metrics.transferred)
        values = params.pull()
        values = params.push_pull(step, grads, updates, weight=0.5, min_version=step + 1)
        params.close()
    """

    def __init__(self, job: str, worker: int, addresses: Sequence[str], placement: Placement, *,
                 timeout: float = 600.0, rpc_timeout: float = 660.0, retries: int = 5, retry_delay: float = 0.2,
                 on_transfer: Callable[[int, int], None] | None = None,
                 connect: Callable[[str], ParameterServerClient] | None = None, retry_for: float = 0.0,
                 stop: Callable[[], bool] | None = None, owner_epoch: int = 0,
                 credentials: Credentials | None = None):
        if len(addresses) != placement.num_shards:
            raise ValueError(f"job '{job}': {len(addresses)} shard addresses for a placement on {placement.num_shards} "
                             "shards; give one address per shard, in shard order")
        self.job, self.worker, self.placement, self.owner_epoch = job, int(worker), placement, int(owner_epoch)
        self.timeout, self.rpc_timeout = float(timeout), float(rpc_timeout)
        self.retries, self.retry_delay, self.retry_for = int(retries), float(retry_delay), float(retry_for)
        self.on_transfer = on_transfer
        self.stop = stop  # () -> True once retrying is pointless (the task was cancelled)
        self.bytes_sent = self.bytes_received = 0
        connect = connect or (lambda address: ParameterServerClient(address, timeout=60.0, credentials=credentials))
        self.shards = []
        try:
            for address in addresses:
                self.shards.append(connect(address))
        except BaseException:
            self.close()
            raise
        self._params = {name: np.empty(shape, dtype) for name, (shape, dtype) in placement.variables.items()}
        self._version = 0
        self.versions = [0] * placement.num_shards  # each shard's version at the last pull or push
        self._offered = False  # shared memory is offered at the first push, once the shards answered a pull
        self._checkpoint = False  # a shard's time bound for checkpoints passed: mark the next push on every shard

    @property
    def version(self) -> int:
        return self._version

    def pull(self, step: int = 0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        for s, client in enumerate(self.shards):
            version, parts, size = self._retry(
                lambda c=client: c.pull_with_size(self.job, self.worker, step, min_version, timeout=self.timeout,
                                                  owner_epoch=self.owner_epoch), s)
            self._count(0, size)
            self.placement.assemble_shard(parts, s, self._params)
            self._version = max(self._version, version)
            self.versions[s] = version
        return self._params

    def push_pull(self, step: int, grads: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray],
                  weight: float = 1.0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        # The other shards' calls are in flight while the last one runs on this thread
        # (a future for every call would start a gRPC polling thread per step).
        if not self._offered:
            self._offer_shared_memory()
        p, last = self.placement, len(self.shards) - 1
        calls = [
            client.start_push_pull(
                self.job, self.worker, step, p.slice_for_shard(grads, s), p.slice_for_shard(updates, s),
                weight=weight, min_version=min_version, timeout=self.timeout, rpc_timeout=self.rpc_timeout,
                wait=s == last, owner_epoch=self.owner_epoch, checkpoint=self._checkpoint,
            )
            for s, client in enumerate(self.shards)
        ]
        self._checkpoint = False
        for s, call in enumerate(calls):
            try:
                version, parts = call.result()
            except grpc.RpcError as exc:
                back = shard_aborted(exc)
                if back is not None:
                    self._settle(calls[s + 1:])
                    raise back from None
                # A restarted shard no longer knows this worker's shared memory: the retry goes as a frame.
                moved = exc.code() == grpc.StatusCode.FAILED_PRECONDITION and getattr(call.client, "segment", None) is not None
                if not (self._retryable(exc) or moved):
                    raise
                log.warning("job %s worker %d: push of step %d to shard %d failed (%s); retrying", self.job,
                            self.worker, step, s, rpc.describe(exc))
                version, parts = self._retry(call.retry, s)
            self._count(call.sent, call.received)
            self._checkpoint |= call.checkpoint_due
            p.assemble_shard(parts, s, self._params)
            self._version = max(self._version, version)
            self.versions[s] = version
        return self._params

    def close(self) -> None:
        for client in self.shards:
            client.close()
        self.shards = []

    def _offer_shared_memory(self) -> None:
        """Offer every shard a segment for the pushes (taken where the shard is on this
        host), with room for this worker's slices both ways."""
        self._offered = True
        for s, client in enumerate(self.shards):
            room = 2 * self.placement.shard_bytes[s] + 65536  # gradients and updates out (or parameters back), headers
            try:
                client.use_shared_memory(self.job, f"pstrain-{self.job}-w{self.worker}-s{s}-{os.getpid()}", room, room)
            except OSError as exc:  # e.g. /dev/shm is full: frames still work
                log.warning("no shared memory for shard %d (%s); pushing over gRPC", s, exc)

    def _retry(self, call: Callable, shard: int):
        """``call()``, retried on RETRYABLE errors with exponential backoff: at least
        ``retries`` times, and for ``retry_for`` seconds (then NOT_FOUND too: a restarted
        shard before the master initialised it again). A rollback raises ``RolledBack``."""
        delay, deadline, attempt = self.retry_delay, time.monotonic() + self.retry_for, 0
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                back = shard_aborted(exc)
                if back is not None:
                    raise back from None
                if not self._retryable(exc) or (attempt >= self.retries and time.monotonic() >= deadline):
                    raise
                if self.stop is not None and self.stop():
                    raise
                attempt += 1
                log.warning("job %s worker %d: shard %d: %s; retrying", self.job, self.worker, shard, rpc.describe(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0 if self.retry_for else 5.0)

    def _retryable(self, exc: grpc.RpcError) -> bool:
        """Whether resending may cure ``exc``: RETRYABLE, and with ``retry_for`` a restarting shard too."""
        return exc.code() in RETRYABLE or bool(self.retry_for and exc.code() == RESTARTING)

    @staticmethod
    def _settle(calls) -> None:
        """Wait for calls still in flight (their replies may use shared memory), ignoring their outcome."""
        for call in calls:
            try:
                call.result()
            except grpc.RpcError:
                pass

    def _count(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        if self.on_transfer is not None:
            self.on_transfer(sent, received)


class ParameterServerClient:
    """Client side of the PS protocol for one shard address (workers, master, tests)."""

    def __init__(self, address: str, timeout: float = 30.0, credentials: Credentials | None = None):
        self.address = address
        self.channel = rpc.make_channel(address, "ps", credentials)
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
                        rpc_timeout=660.0, wait=True, owner_epoch=0, checkpoint=False) -> PushCall:
        """Push with pull, through shared memory when ``use_shared_memory`` took, else a
        raw frame; ``wait=False`` leaves the call in flight. ``.result()`` of what it
        returns gives (version, params: read-only arrays, valid until the next push)."""
        args = (job, worker, step, grads, assigns, weight, True, min_version, timeout, owner_epoch, checkpoint)
        frame, size = None, 0
        if self.segment is not None:
            try:
                size = tensorwire.pack_into(self.segment.request, push_meta(*args), push_tensors(grads, assigns))
                frame = tensorwire.pack({"job": job, "shm": {"name": self.segment.name, "size": size}}, {})
            except ValueError:  # does not fit the segment: this one goes as a frame
                frame, size = None, 0
        if frame is None:
            frame = self.push_frame(*args)
        if not wait:
            return PushCall(self, args, len(frame) + size, self.raw_push.future(frame, timeout=rpc_timeout), rpc_timeout)
        try:
            outcome = self.raw_push(frame, timeout=rpc_timeout)
        except grpc.RpcError as exc:  # raised by .result(), as for a call left in flight
            return PushCall(self, args, len(frame) + size, None, rpc_timeout, error=exc)
        return PushCall(self, args, len(frame) + size, outcome, rpc_timeout)

    def close_segment(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None

    @staticmethod
    def push_frame(job, worker, step, grads, assigns=None, weight=1.0, pull=False, min_version=0, timeout=0.0,
                   owner_epoch=0, checkpoint=False) -> bytes:
        """A raw-frame push (see PushRaw)."""
        return tensorwire.pack(push_meta(job, worker, step, grads, assigns, weight, pull, min_version, timeout,
                                         owner_epoch, checkpoint),
                               push_tensors(grads, assigns))

    def read_reply(self, reply: bytes) -> tuple[int, bool, dict]:
        """(version, duplicate, params) from a PushRaw reply (params from the segment's
        reply area when the shard put them there)."""
        return self._read_reply(reply)[:3]

    def _read_reply(self, reply: bytes) -> tuple[int, bool, dict, int, bool]:
        """``read_reply`` plus the bytes that came through shared memory and whether the
        shard's checkpoint time bound passed."""
        meta, params = tensorwire.unpack(reply)
        shared = int(meta.get("shm_reply", 0))
        if shared:
            if self.segment is None:
                raise RuntimeError(f"shard {self.address} answered through shared memory this client does not have")
            meta, params = tensorwire.unpack(self.segment.reply[:shared])
        return int(meta["version"]), bool(meta["duplicate"]), params, shared, bool(meta.get("checkpoint_due"))

    def init_shard(self, job, shard, variables, trainable, optimizer_json, mode, staleness, workers, checkpoint_every=0,
                   incarnation="", checkpoint_seconds=0.0):
        req = ps_pb2.InitShardRequest(
            job=job, shard=shard, trainable=sorted(trainable), optimizer_json=optimizer_json, mode=mode,
            staleness=staleness, workers=list(workers), checkpoint_every=checkpoint_every, incarnation=incarnation,
            checkpoint_seconds=checkpoint_seconds,
        )
        codec.write_named(req.variables, variables)
        return self.stub.InitShard(req, timeout=self.timeout)

    def push_request(self, job, worker, step, grads, assigns=None, weight=1.0, pull=False, min_version=0, timeout=0.0,
                     owner_epoch=0):
        req = ps_pb2.PushRequest(
            job=job, worker=worker, step=step, weight=weight, pull=pull, min_version=min_version, timeout=timeout,
            owner_epoch=owner_epoch,
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

    def pull(self, job, worker, step, min_version=0, timeout=0.0, owner_epoch=0):
        resp = self.pull_response(job, worker, step, min_version, timeout, owner_epoch)
        return resp.version, codec.read_named(resp.params)

    def pull_with_size(self, job, worker, step, min_version=0, timeout=0.0, owner_epoch=0) -> tuple[int, dict, int]:
        """``pull`` plus the bytes of the reply: (version, params, size)."""
        resp = self.pull_response(job, worker, step, min_version, timeout, owner_epoch)
        return resp.version, codec.read_named(resp.params), resp.ByteSize()

    def pull_response(self, job, worker, step, min_version=0, timeout=0.0, owner_epoch=0) -> ps_pb2.PullResponse:
        """``pull`` undecoded (callers that count its bytes)."""
        return self.stub.Pull(
            ps_pb2.PullRequest(job=job, worker=worker, step=step, min_version=min_version, timeout=timeout,
                               owner_epoch=owner_epoch),
            timeout=(timeout or self.timeout) + 5,
        )

    def fence(self, job: str, worker: int, epoch: int) -> tuple[int, int]:
        """Give worker slot ``worker`` to a new owner (``epoch``), fencing off older ones;
        returns (version, the slot's first step this shard has not received)."""
        resp = self.stub.Fence(ps_pb2.FenceRequest(job=job, worker=worker, owner_epoch=epoch), timeout=self.timeout)
        return resp.version, resp.next_step

    def restore(self, job: str, version: int) -> int:
        """Roll the job's shard back to its checkpoint of ``version``; returns the version held."""
        return self.stub.Restore(ps_pb2.RestoreRequest(job=job, version=version), timeout=self.timeout).version

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


def push_meta(job, worker, step, grads, assigns, weight, pull, min_version, timeout, owner_epoch=0,
              checkpoint=False) -> dict:
    """The meta of a push frame (``grads`` and ``assigns`` only keep the signature that of ``push_frame``)."""
    meta = {"job": job, "worker": worker, "step": step, "weight": weight, "pull": pull,
            "min_version": min_version, "timeout": timeout, "owner_epoch": owner_epoch}
    if checkpoint:
        meta["checkpoint"] = True
    return meta


def push_tensors(grads, assigns) -> dict:
    """A push frame's tensors: gradients as "g:<key>", assignments as "a:<key>"."""
    tensors = {f"g:{k}": v for k, v in grads.items()}
    tensors.update({f"a:{k}": v for k, v in (assigns or {}).items()})
    return tensors


class PushCall:
    """A push with pull from ``ParameterServerClient.start_push_pull``, maybe in flight."""

    def __init__(self, client: ParameterServerClient, args: tuple, sent: int, outcome, rpc_timeout: float,
                 error: grpc.RpcError | None = None):
        self.client, self.args, self.sent, self._outcome, self._rpc_timeout = client, args, sent, outcome, rpc_timeout
        self._error = error  # of a call made with wait=True (a future is itself an RpcError: no isinstance test)
        self.received = 0
        self.checkpoint_due = False  # the shard's checkpoint time bound passed (set by result / retry)

    def result(self) -> tuple[int, dict]:
        """(version, params); raises the call's grpc.RpcError."""
        if self._error is not None:
            raise self._error
        reply = self._outcome if isinstance(self._outcome, bytes) else self._outcome.result()
        version, _, params, shared, self.checkpoint_due = self.client._read_reply(reply)
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
        version, _, params, _, self.checkpoint_due = self.client._read_reply(reply)
        return version, params
