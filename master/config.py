"""Master process configuration (flags over PSTRAIN_* variables over defaults)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from protos.settings import check_port, check_positive
from pstrain.transport.rpc import max_message_bytes


@dataclass(frozen=True)
class MasterConfig:
    @property
    def watcher_limit(self) -> int:
        """How many WatchJob streams may be open at once."""
        return self.max_watchers or max(1, self.max_workers // 2)

    host: str = "127.0.0.1"
    port: int = 50051
    db: str = "pstrain-master.db"  # SQLite file (":memory:" for tests)
    export_dir: str = ""  # final weights of finished jobs (default: beside the db)
    heartbeat_interval: float = 0.5  # what nodes are told to use
    heartbeat_timeout: float = 5.0  # a node silent this long is lost
    monitor_interval: float = 0.25
    max_workers: int = 64  # threads serving RPCs
    # Open WatchJob streams each hold one of those threads for as long as they last; at
    # most this many at once (0: half of max_workers), so heartbeats are always served.
    max_watchers: int = 0
    # After a restart, how long a RUNNING job waits for its shards and workers to register
    # again before it resumes with the workers that came back (or fails without its shards).
    recovery_timeout: float = 30.0
    # Shards checkpoint every this many versions (sync: all at the same versions, so a
    # shard that restarts from its checkpoint and the others roll back to one they share).
    checkpoint_every: int = 100
    # And at least this often (seconds) while versions advance: a slow job loses at most this
    # much work to a shard's restart (0: versions only).
    checkpoint_seconds: float = 30.0
    dead_node_ttl: float = 300.0  # a lost node's record is kept this long (ListNodes), unless a job refers to it
    metrics_port: int = 9464  # /metrics on metrics_host (0 picks a free port; -1: none)
    metrics_host: str = "127.0.0.1"  # the interface /metrics listens on: loopback unless told otherwise
    tls_dir: str = ""  # mutual TLS: ca.crt and master.crt/.key (psctl certs init); "" = plaintext
    insecure: bool = False  # allow plaintext on an address other machines can reach
    tokens_file: str = ""  # users' tokens (psctl token create; default: tokens.json beside the db)
    # Limits on what one job may ask for (master/limits.py), checked before any work.
    # Decoding and planning cost master CPU and memory per node (10^6 nodes: 51 s and 1.4 GB;
    # 10^5: about 6 s), so this bounds one request to roughly 15 s; real models have 10^2-10^4.
    max_graph_nodes: int = 200_000
    # Longest path, in nodes: a step runs it in order. Covers a 1000-step unrolled RNN.
    max_graph_depth: int = 20_000
    # The variables' initial values, all together: what the shards hold (plus optimizer
    # slots). 2 GiB is gRPC's ceiling for one message, so the default refuses nothing a
    # request can carry; lower it to bound the shards' memory.
    max_variable_bytes: int = 2 * 1024**3
    # A SubmitJob / GetPlan request; 0: the gRPC message limit (PSTRAIN_MAX_MESSAGE_BYTES,
    # 256 MiB by default). Never above it: gRPC refuses a larger message before the master sees it.
    max_request_bytes: int = 0
    max_epochs: int = 1_000_000  # far beyond any real job; stops a typo running for ever
    max_batch_size: int = 10_000_000  # 10^7 examples: larger than any dataset pstrain loads
    max_job_workers: int = 1024  # worker slots of one job (each is a task, a report stream, a barrier member)
    max_job_shards: int = 256  # shards of one job (each step pushes to every one)
    # Seconds a PENDING job waits while fewer workers or shards are registered than it asked
    # for, then fails saying what it waited for (0: for ever). Waiting for busy ones is not counted.
    pending_timeout: float = 600.0
    # Dataset paths must lie inside this directory (relative ones are joined to it): it
    # must be where the workers keep datasets. "" = any path the workers can read.
    data_root: str = ""

    def __post_init__(self):
        check_port("MasterConfig", "port", self.port)
        if not -1 <= int(self.metrics_port) <= 65535:
            raise ValueError(f"MasterConfig.metrics_port={self.metrics_port!r} is out of range; allowed [-1, 65535] "
                             "(0 picks a free port, -1 serves no /metrics)")
        for name in ("heartbeat_interval", "heartbeat_timeout", "monitor_interval", "max_workers", "recovery_timeout",
                     "dead_node_ttl"):
            check_positive("MasterConfig", name, getattr(self, name))
        if not 0 <= float(self.checkpoint_seconds) < float("inf"):
            raise ValueError(f"MasterConfig.checkpoint_seconds={self.checkpoint_seconds!r} must be >= 0 "
                             "(0: versions only)")
        if not int(self.checkpoint_every) >= 0:
            raise ValueError(f"MasterConfig.checkpoint_every={self.checkpoint_every!r} must be >= 0 (0: only at the end)")
        if not 0 <= int(self.max_watchers) < self.max_workers:
            raise ValueError(f"MasterConfig.max_watchers={self.max_watchers!r} is out of range; allowed "
                             f"[0, max_workers={self.max_workers}) (0: half of max_workers)")
        for name in ("max_graph_nodes", "max_graph_depth", "max_variable_bytes", "max_epochs", "max_batch_size",
                     "max_job_workers", "max_job_shards"):
            if isinstance(getattr(self, name), bool) or not int(getattr(self, name)) >= 1:
                raise ValueError(f"MasterConfig.{name}={getattr(self, name)!r} must be an integer >= 1")
        grpc_limit = max_message_bytes()
        if not 0 <= int(self.max_request_bytes) <= grpc_limit:
            raise ValueError(f"MasterConfig.max_request_bytes={self.max_request_bytes!r} is out of range; allowed "
                             f"[0, {grpc_limit}], the gRPC message limit (PSTRAIN_MAX_MESSAGE_BYTES; 0: that limit)")
        if not 0 <= float(self.pending_timeout) < float("inf"):
            raise ValueError(f"MasterConfig.pending_timeout={self.pending_timeout!r} must be >= 0 (0: wait for ever)")
        if self.data_root and not os.path.isabs(self.data_root):
            raise ValueError(f"MasterConfig.data_root={self.data_root!r} must be an absolute path (where the workers "
                             "keep datasets), or empty for any path")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"MasterConfig.heartbeat_timeout={self.heartbeat_timeout} must exceed "
                f"heartbeat_interval={self.heartbeat_interval}"
            )
