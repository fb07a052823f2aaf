"""Parameter-server process configuration (flags over PSTRAIN_* variables over defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from protos.settings import check_port, check_positive


@dataclass(frozen=True)
class PSConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port, reported to the master
    advertise_host: str = ""  # the host others dial (default: host)
    master: str = ""  # host:port of the master to register with ("" = standalone)
    checkpoint_dir: str = ""  # "" = no checkpoints
    backend: str = "cpu"
    max_workers: int = 32
    pull_timeout: float = 120.0  # the longest a pull (or push+pull) waits here, whatever the client asks
    heartbeat_interval: float = 0.5
    metrics_port: int = 0  # /metrics on metrics_host (0 picks a free port, reported to the master; -1: none)
    metrics_host: str = "127.0.0.1"  # the interface /metrics listens on: loopback unless told otherwise
    tls_dir: str = ""  # mutual TLS: ca.crt and this role's certificate (psctl certs init); "" = plaintext
    insecure: bool = False  # allow plaintext on an address other machines can reach

    def __post_init__(self):
        check_port("PSConfig", "port", self.port)
        check_positive("PSConfig", "max_workers", self.max_workers)
        check_positive("PSConfig", "pull_timeout", self.pull_timeout)
        check_positive("PSConfig", "heartbeat_interval", self.heartbeat_interval)
        if not -1 <= int(self.metrics_port) <= 65535:
            raise ValueError(f"PSConfig.metrics_port={self.metrics_port!r} is out of range; allowed [-1, 65535] "
                             "(0 picks a free port, -1 serves no /metrics)")
        if self.backend not in ("cpu", "reference"):
            raise ValueError(f"PSConfig.backend={self.backend!r}: shards run on 'cpu' or 'reference'")
