"""Master process configuration (flags over PSTRAIN_* variables over defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from protos.settings import check_port, check_positive


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
    metrics_port: int = 9464  # /metrics on host (0 picks a free port; -1: none)
    tls_dir: str = ""  # mutual TLS: ca.crt and master.crt/.key (psctl certs init); "" = plaintext
    insecure: bool = False  # allow plaintext on an address other machines can reach
    tokens_file: str = ""  # users' tokens (psctl token create; default: tokens.json beside the db)

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
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"MasterConfig.heartbeat_timeout={self.heartbeat_timeout} must exceed "
                f"heartbeat_interval={self.heartbeat_interval}"
            )
