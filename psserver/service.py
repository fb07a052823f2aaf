"""The parameter-server gRPC service: a thin servicer over ``psserver.shard.Shard``.

Decode → call the shard → encode; domain errors become status codes in
``pstrain.transport.rpc``. One process serves any number of jobs, one ``Shard`` each.

Usage (normally through ``python -m psserver``)::

    server, port, servicer = serve(PSConfig(port=0))
    servicer.metrics.serve("127.0.0.1", 0)   # /metrics (python -m psserver does this)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading

import grpc
import numpy as np

from protos import codec, ps_pb2, ps_pb2_grpc, tensorwire
from protos.shm import Segment, SegmentUnavailable
from protos.tensorwire import RAW_SERVICE
from psserver.config import PSConfig
from psserver.metrics import PSMetrics
from psserver.shard import CheckpointConfig, Fenced, PullRefused, RolledBack, Shard, ShardClosed
from pstrain.runtime.optimizers import optimizer_from_config
from pstrain.runtime.store import PushRejected
from pstrain.transport import rpc
from pstrain.transport.security import Authenticator, Credentials, methods_of, service_credentials

log = logging.getLogger(__name__)

rpc.register_error(PushRejected, grpc.StatusCode.INVALID_ARGUMENT)
rpc.register_error(ShardClosed, grpc.StatusCode.ABORTED)




class UnknownJob(KeyError):
    pass


class ShardSpecMismatch(ValueError):
    """InitShard for a job this server already holds, with another spec."""


class ResponseTooLarge(ValueError):
    """A response would exceed the gRPC message limit (gRPC would drop it with a bare error)."""


_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


rpc.register_error(UnknownJob, grpc.StatusCode.NOT_FOUND)
rpc.register_error(ShardSpecMismatch, grpc.StatusCode.ALREADY_EXISTS)
rpc.register_error(PullRefused, grpc.StatusCode.OUT_OF_RANGE)
rpc.register_error(RolledBack, grpc.StatusCode.ABORTED)
rpc.register_error(Fenced, grpc.StatusCode.ABORTED)
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
        self.specs: dict[str, dict[str, str]] = {}  # job -> fingerprint of the InitShard that created its shard
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

    def _wait(self, asked: float) -> float:
        """How long a pull may wait: what the client asked (0: the most), never more than
        the server's ``pull_timeout``, so no client can hold a server thread longer."""
        cap = self.config.pull_timeout
        asked = float(asked)
        return cap if not math.isfinite(asked) or asked <= 0 else min(asked, cap)

    @rpc.guarded
    def InitShard(self, request, context):
        spec = _init_fingerprint(request)
        with self._lock:
            shard = self.shards.get(request.job)
            if shard is not None and shard.shard_id != request.shard:
                raise ValueError(
                    f"this parameter server already holds shard {shard.shard_id} of job '{request.job}'; "
                    f"it cannot also hold shard {request.shard} (one shard of a job per server)"
                )
            if shard is not None and self.specs.get(request.job) != spec:
                held = self.specs.get(request.job, {})
                differ = [k for k in spec if held.get(k) != spec[k]]
                raise ShardSpecMismatch(
                    f"this parameter server already holds shard {shard.shard_id} of job '{request.job}' with a "
                    f"different {', '.join(differ)}; end that job first (EndJob), or use a new job id"
                )
            if shard is None:
                ckpt = self._checkpoint(request.job, request.shard)
                if ckpt is not None:
                    ckpt = CheckpointConfig(path=ckpt.path, every_versions=int(request.checkpoint_every),
                                            every_seconds=float(request.checkpoint_seconds))
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
                    incarnation=request.incarnation,
                )
                self.shards[request.job] = shard
                self.specs[request.job] = spec
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
            owner_epoch=request.owner_epoch,
        )
        response = ps_pb2.PushResponse(version=ack.version, duplicate=ack.duplicate)
        if request.pull:
            version, params = shard.pull(request.worker, request.step + 1, request.min_version, self._wait(request.timeout),
                                         owner_epoch=request.owner_epoch)
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
        if not isinstance(link, dict):
            raise ValueError(f"job '{job}': the frame's shm link must be an object, got {type(link).__name__}")
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
        worker, step, epoch = int(meta["worker"]), int(meta["step"]), int(meta.get("owner_epoch", 0))
        # Everything the pull needs is read before the push changes anything: a bad value
        # refuses the whole call, never half of it.
        min_version, wait = int(meta.get("min_version", 0)), self._wait(float(meta.get("timeout") or 0))
        ack = shard.push(worker, step, grads, assigns, float(meta.get("weight", 1.0)), immutable=immutable,
                         owner_epoch=epoch, checkpoint=bool(meta.get("checkpoint")))
        reply = {"version": ack.version, "duplicate": ack.duplicate}
        if ack.checkpoint_due:
            reply["checkpoint_due"] = True
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

            _, out = shard.pull_encoded(worker, step + 1, min_version, wait, encode, owner_epoch=epoch)
        _check_response_size(shard, len(out))
        self.metrics.transferred(shard.job, received, len(out) + reply.get("shm_reply", 0))
        return out

    @rpc.guarded
    def Attach(self, frame: bytes, context) -> bytes:
        """A worker on this host offers a shared-memory segment for its pushes to this
        shard (protos/shm.py); FAILED_PRECONDITION when this process cannot map it."""
        meta, _ = tensorwire.unpack(frame)
        job, link = str(meta.get("job", "")), meta.get("shm") or {}
        if not isinstance(link, dict):
            raise SegmentUnavailable(f"job '{job}': malformed shared-memory offer {link!r}")
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
        version, params = shard.pull(request.worker, request.step, request.min_version, self._wait(request.timeout),
                                     owner_epoch=request.owner_epoch)
        response = ps_pb2.PullResponse(version=version)
        codec.write_named(response.params, params)
        return self._sent(request, response, shard)

    @rpc.guarded
    def Restore(self, request, context):
        return ps_pb2.RestoreResponse(version=self._shard(request.job).rollback(int(request.version)))

    @rpc.guarded
    def Fence(self, request, context):
        version, next_step = self._shard(request.job).fence(request.worker, request.owner_epoch)
        return ps_pb2.FenceResponse(version=version, next_step=next_step)

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
            self.specs.pop(request.job, None)
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


def _init_fingerprint(request) -> dict[str, str]:
    """What makes two InitShard requests the same job: a retry (equal) is idempotent,
    anything else for a held job is refused. Values are digests, so the map stays small."""
    variables = hashlib.sha256()
    for name, value in sorted(codec.read_named(request.variables).items()):
        variables.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        variables.update(memoryview(np.ascontiguousarray(value)).cast("B"))
    try:
        optimizer = json.dumps(json.loads(request.optimizer_json), sort_keys=True)
    except ValueError:
        optimizer = request.optimizer_json
    return {
        "variables": variables.hexdigest(),
        "trainable": ",".join(sorted(request.trainable)),
        "optimizer": optimizer,
        "mode": request.mode,
        "staleness": str(request.staleness),
        "workers": ",".join(str(w) for w in sorted(request.workers)),
        "checkpoint_every": str(request.checkpoint_every),
        "checkpoint_seconds": repr(request.checkpoint_seconds),
        "incarnation": request.incarnation,
    }


def authenticator(node_token: str) -> Authenticator:
    """Every method of a shard, the raw ones too, is a node call."""
    methods = methods_of(ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"], {}, default="node")
    methods.update({f"/{RAW_SERVICE}/{name}": "node" for name in ("Push", "Attach", "Echo")})
    return Authenticator(methods, node_token=node_token)


def serve(config: PSConfig, credentials: Credentials | None = None) -> tuple[grpc.Server, int, ParameterServerServicer]:
    """Start a parameter server; returns (server, bound port, servicer). ``credentials``:
    the cluster's (default: from the environment, see ``service_credentials``)."""
    creds = credentials or service_credentials("ps", config.tls_dir)
    server = rpc.make_server(max_workers=config.max_workers, authenticator=authenticator(creds.node_token))
    servicer = ParameterServerServicer(config)
    ps_pb2_grpc.add_ParameterServerServicer_to_server(servicer, server)
    # The raw-frame push: bytes in, bytes out, no protobuf message around the tensors.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        RAW_SERVICE, {
            "Push": grpc.unary_unary_rpc_method_handler(servicer.PushRaw),
            "Attach": grpc.unary_unary_rpc_method_handler(servicer.Attach),
            "Echo": grpc.unary_unary_rpc_method_handler(lambda payload, context: payload),  # transport baseline
        }),))
    try:
        port = rpc.bind(server, config.host, config.port, tls=creds.tls, insecure=config.insecure)
    except BaseException:
        servicer.close()
        raise
    server.start()
    log.info("parameter server listening on %s:%d (%s)", config.host, port, "mutual TLS" if creds.tls else "plaintext")
    return server, port, servicer
