"""Worker process configuration (flags over PSTRAIN_* variables over defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from protos.settings import check_positive
from pstrain.runtime.spec import Device

DEVICES = tuple(d.value for d in Device)


@dataclass(frozen=True)
class WorkerConfig:
    master: str = "127.0.0.1:50051"
    device: str = "auto"  # auto | cpu | cuda
    name: str = ""
    report_interval: float = 1.0
    host: str = "127.0.0.1"  # the interface /metrics listens on
    advertise_host: str = ""  # the host others scrape (default: host; this machine's name for 0.0.0.0)
    metrics_port: int = 0  # /metrics (0 picks a free port, reported to the master; -1: none)
    tls_dir: str = ""  # mutual TLS: ca.crt and this role's certificate (psctl certs init); "" = plaintext
    insecure: bool = False  # allow plaintext on an address other machines can reach

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"WorkerConfig.device={self.device!r}; allowed: auto, cpu, cuda")
        check_positive("WorkerConfig", "report_interval", self.report_interval)
        if not -1 <= int(self.metrics_port) <= 65535:
            raise ValueError(f"WorkerConfig.metrics_port={self.metrics_port!r} is out of range; allowed [-1, 65535] "
                             "(0 picks a free port, -1 serves no /metrics)")
