"""The parameter-server gRPC service: a thin servicer over ``psserver.shard.Shard``.

Decode → call the shard → encode; domain errors become status codes in
``protos.rpc``. One process serves any number of jobs, one ``Shard`` each.

Usage (normally through ``python -m psserver``)::

    server, port, servicer = serve(PSConfig(port=0))
    servicer.metrics.serve("127.0.0.1", 0)   # /metrics (python -m psserver does this)
"""
from __future__ import annotations

import json
import logging
import re
import os
import threading

import grpc

from protos import codec, ps_pb2, ps_pb2_grpc, rpc, shm, tensorwire
from protos.shm import Segment, SegmentUnavailable
from psserver.config import PSConfig
from psserver.metrics import PSMetrics
from psserver.optimizers import optimizer_from_config
from psserver.shard import CheckpointConfig, Shard, ShardClosed
from psserver.store import PushRejected

log = logging.getLogger(__name__)

rpc.register_error(PushRejected, grpc.StatusCode.INVALID_ARGUMENT)
rpc.register_error(ShardClosed, grpc.StatusCode.ABORTED)


RAW_SERVICE = "pstrain.ParameterServerRaw"


class UnknownJob(KeyError):
    pass


class ResponseTooLarge(ValueError):
    """A response would exceed the gRPC message limit (gRPC would drop it with a bare error)."""


_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


rpc.register_error(UnknownJob, grpc.StatusCode.NOT_FOUND)
rpc.register_error(ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED)
rpc.register_error(SegmentUnavailable, grpc.StatusCode.FAILED_PRECONDITION)


def _check_response_size(shard: Shard, size: int) -> None:
    """Refuse (and count) a response over the gRPC message limit: gRPC would drop it with a bare error."""
    if size > rpc.max_message_bytes():
        shard.reject("oversize")
        raise ResponseTooLarge(
            f"job '{shard.job}' shard {shard.shard_id}: the response is {size} bytes, over the "
            f"{rpc.max_message_bytes()}-byte message limit; raise PSTRAIN_MAX_MESSAGE_BYTES on every process "
            "or spread the variables over more shards"
        )


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, config: PSConfig, metrics: PSMetrics | None = None):
        self.config = config
        self.metrics = metrics or PSMetrics()
        self.shards: dict[str, Shard] = {}
        self.segments: dict[str, dict[str, Segment]] = {}  # job -> segment name -> workers' shared memory
        self._lock = threading.Lock()
        self.metrics.track(self)  # RPCs in progress: pstrain_request_queue_depth

    def _sent(self, request, response, shard: Shard | None = None):
        """Count the RPC's bytes; refuse a response gRPC could not send."""
        size = response.ByteSize()
        if shard is not None:
            _check_response_size(shard, size)
        self.metrics.transferred(request.job, request.ByteSize(), size)
        return response

    def _shard(self, job: str) -> Shard:
        shard = self.shards.get(job)
        if shard is None:
            raise UnknownJob(f"this parameter server holds no shard of job '{job}' (not initialised, or ended)")
        return shard

    def _checkpoint(self, job: str, shard: int) -> CheckpointConfig | None:
        if not self.config.checkpoint_dir:
            return None
        if not _JOB_ID.match(job):
            raise ValueError(f"job id {job!r} is not a safe name ([A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 characters)")
        path = os.path.join(self.config.checkpoint_dir, job, f"shard-{shard}.ckpt")
        return CheckpointConfig(path=path, every_versions=0)

    @rpc.guarded
    def InitShard(self, request, context):
        with self._lock:
            shard = self.shards.get(request.job)
            if shard is not None and shard.shard_id != request.shard:
                raise ValueError(
                    f"this parameter server already holds shard {shard.shard_id} of job '{request.job}'; "
                    f"it cannot also hold shard {request.shard} (one shard of a job per server)"
                )
            if shard is None:
                ckpt = self._checkpoint(request.job, request.shard)
                if ckpt is not None and request.checkpoint_every:
                    ckpt = CheckpointConfig(path=ckpt.path, every_versions=int(request.checkpoint_every))
                shard = Shard(
                    job=request.job,
                    shard_id=request.shard,
                    variables={k: v.copy() for k, v in codec.read_named(request.variables).items()},
                    trainable=set(request.trainable),
                    optimizer=optimizer_from_config(json.loads(request.optimizer_json)),
                    mode=request.mode,
                    staleness=request.staleness,
                    workers=list(request.workers),
                    backend=self.config.backend,
                    checkpoint=ckpt,
                    observer=self.metrics.shard(request.job, request.shard),
                )
                self.shards[request.job] = shard
                log.info("job %s: shard %d holds %d tensors", request.job, request.shard, len(request.variables))
            stats = shard.stats()
        return self._sent(request, ps_pb2.InitShardResponse(
            version=stats["version"], bytes=stats.get("bytes", 0), restored=bool(stats.get("restored", False))
        ))

    @rpc.guarded
    def Push(self, request, context):
        shard = self._shard(request.job)
        ack = shard.push(
            request.worker,
            request.step,
            codec.read_named(request.grads),
            codec.read_named(request.assigns),
            request.weight,
        )
        response = ps_pb2.PushResponse(version=ack.version, duplicate=ack.duplicate)
        if request.pull:
            version, params = shard.pull(
                request.worker, request.step + 1, request.min_version, request.timeout or self.config.pull_timeout
            )
            response.version = version
            codec.write_named(response.params, params)
        return self._sent(request, response, shard)

    @rpc.guarded
    def PushRaw(self, frame: bytes, context) -> bytes:
        """Push (+pull) with tensors in a raw frame (protos/tensorwire.py): the hot path.
        Gradients are named "g:<key>", assignments "a:<key>". A frame whose meta names a
        shared-memory segment (see ``Attach``) is only a pointer: the push frame is in
        the segment's request area, and the reply frame goes to its reply area."""
        meta, tensors = tensorwire.unpack(frame)
        job = str(meta.get("job", ""))
        shard = self._shard(job)
        link = meta.get("shm")
        if link is None:
            # The frame's bytes never change, so a sync barrier may keep views of them.
            return self._push(shard, meta, tensors, len(frame), immutable=True)
        segment = self._segment(job, str(link.get("name")))
        size = int(link.get("size", -1))
        if not 0 <= size <= segment.request_capacity:
            raise ValueError(f"job '{job}': shared-memory push of {size} bytes does not fit segment "
                             f"{segment.name} ({segment.request_capacity} request bytes)")
        meta, tensors = tensorwire.unpack(segment.request[:size])
        # The worker writes its next push over these bytes, so a sync barrier copies them.
        return self._push(shard, meta, tensors, len(frame) + size, immutable=False, segment=segment)

    def _push(self, shard: Shard, meta: dict, tensors: dict, received: int, immutable: bool,
              segment: Segment | None = None) -> bytes:
        grads = {k[2:]: v for k, v in tensors.items() if k.startswith("g:")}
        assigns = {k[2:]: v for k, v in tensors.items() if k.startswith("a:")}
        worker, step = int(meta["worker"]), int(meta["step"])
        ack = shard.push(worker, step, grads, assigns, float(meta.get("weight", 1.0)), immutable=immutable)
        reply = {"version": ack.version, "duplicate": ack.duplicate}
        if not meta.get("pull"):
            out = tensorwire.pack(reply, {})
        else:
            def encode(version, params):  # under the shard's lock: framed from the live variables, one copy
                reply["version"] = version
                if segment is not None:
                    try:
                        reply["shm_reply"] = tensorwire.pack_into(segment.reply, reply, params)
                        return tensorwire.pack(reply, {})
                    except ValueError:  # does not fit: the reply travels over gRPC instead
                        pass
                return tensorwire.pack(reply, params)

            _, out = shard.pull_encoded(
                worker, step + 1, int(meta.get("min_version", 0)),
                float(meta.get("timeout") or self.config.pull_timeout), encode,
            )
        _check_response_size(shard, len(out))
        self.metrics.transferred(shard.job, received, len(out) + reply.get("shm_reply", 0))
        return out

    @rpc.guarded
    def Attach(self, frame: bytes, context) -> bytes:
        """A worker on this host offers a shared-memory segment for its pushes to this
        shard (protos/shm.py); FAILED_PRECONDITION when this process cannot map it."""
        meta, _ = tensorwire.unpack(frame)
        job, link = str(meta.get("job", "")), meta.get("shm") or {}
        self._shard(job)
        try:
            token = bytes.fromhex(str(link.get("token", "")))
            capacity = int(link.get("request_capacity", -1))
        except ValueError:
            raise SegmentUnavailable(f"job '{job}': malformed shared-memory offer {link!r}") from None
        segment = Segment.attach(str(link.get("name")), token, capacity)
        with self._lock:
            if job not in self.shards:
                segment.close()
                raise UnknownJob(f"this parameter server holds no shard of job '{job}' (it just ended)")
            old = self.segments.setdefault(job, {}).pop(segment.name, None)
            self.segments[job][segment.name] = segment
        if old is not None:  # the worker restarted and made a new segment of the same name
            old.close()
        log.info("job %s: worker pushes through shared memory %s", job, segment.name)
        return tensorwire.pack({"attached": True}, {})

    def _segment(self, job: str, name: str) -> Segment:
        segment = self.segments.get(job, {}).get(name)
        if segment is None:
            raise SegmentUnavailable(f"job '{job}': shared-memory segment {name!r} was never attached here; call Attach first")
        return segment

    @rpc.guarded
    def Pull(self, request, context):
        shard = self._shard(request.job)
        version, params = shard.pull(
            request.worker, request.step, request.min_version, request.timeout or self.config.pull_timeout
        )
        response = ps_pb2.PullResponse(version=version)
        codec.write_named(response.params, params)
        return self._sent(request, response, shard)

    @rpc.guarded
    def SetMembership(self, request, context):
        self._shard(request.job).set_live_workers(list(request.live_workers))
        return ps_pb2.MembershipResponse()

    @rpc.guarded
    def Status(self, request, context):
        return ps_pb2.ShardStatusResponse(stats_json=json.dumps(self._shard(request.job).stats(), default=str))

    @rpc.guarded
    def EndJob(self, request, context):
        with self._lock:
            shard = self.shards.pop(request.job, None)
            segments = self.segments.pop(request.job, {})
        for segment in segments.values():
            segment.close(unlink=True)  # the job is over; its worker may have been killed
        if shard is not None:
            shard.close()
            self.metrics.end_job(request.job)
        return ps_pb2.EndJobResponse()

    def Echo(self, request, context):
        return request

    def close(self) -> None:
        with self._lock:
            shards, self.shards = list(self.shards.values()), {}
            segments, self.segments = [g for job in self.segments.values() for g in job.values()], {}
        for segment in segments:
            segment.close()
        for shard in shards:
            shard.close()


def serve(config: PSConfig) -> tuple[grpc.Server, int, ParameterServerServicer]:
    """Start a parameter server; returns (server, bound port, servicer)."""
    server = rpc.make_server(max_workers=config.max_workers)
    servicer = ParameterServerServicer(config)
    ps_pb2_grpc.add_ParameterServerServicer_to_server(servicer, server)
    # The raw-frame push: bytes in, bytes out, no protobuf message around the tensors.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        RAW_SERVICE, {
            "Push": grpc.unary_unary_rpc_method_handler(servicer.PushRaw),
            "Attach": grpc.unary_unary_rpc_method_handler(servicer.Attach),
            "Echo": grpc.unary_unary_rpc_method_handler(lambda payload, context: payload),  # transport baseline
        }),))
    port = rpc.bind(server, config.host, config.port)
    server.start()
    log.info("parameter server listening on %s:%d", config.host, port)
    return server, port, servicer


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
