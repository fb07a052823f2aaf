"""Worker process configuration (flags over PSTRAIN_* variables over defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from protos.settings import check_positive


@dataclass(frozen=True)
class WorkerConfig:
    master: str = "127.0.0.1:50051"
    device: str = "auto"  # auto | cpu | cuda
    name: str = ""
    report_interval: float = 1.0

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda", "reference"):
            raise ValueError(f"WorkerConfig.device={self.device!r}; allowed: auto, cpu, cuda")
        check_positive("WorkerConfig", "report_interval", self.report_interval)
