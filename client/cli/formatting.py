"""Job statuses and progress records as text for people (``psctl status``, ``list``, ``logs``).

Usage::

    print(format_status(client.get("job-000001")))
    print(format_table(client.list()))
    print(format_record({"worker": 0, "epoch": 1, "step": 10, "loss": 0.5}))   # "worker 0 epoch 1 step 10 - loss: 0.5000"
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from client.progress import format_metrics


def _fmt_number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _fmt_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def format_status(s: Mapping[str, Any]) -> str:
    """A job's status, for people (``psctl status``)."""
    lines = [f"{s['id']}  {s.get('name') or ''}  {s['state']}".rstrip()]
    lines.append(f"  epoch {s['epoch']}  step {s['step']}  loss {_fmt_number(s.get('loss'))}")
    if s.get("metrics"):
        lines.append("  " + format_metrics(dict(sorted(s["metrics"].items()))))
    if s.get("error"):
        lines.append(f"  error: {s['error']}")
    lines.append(f"  created {_fmt_time(s.get('created', 0))}  updated {_fmt_time(s.get('updated', 0))}")
    for worker, info in sorted((s.get("workers") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append("  " + format_worker(worker, info))
    return "\n".join(lines)


def format_worker(worker, info: Mapping[str, Any]) -> str:
    """One worker slot of ``psctl status``: its state, process, step, and what happened to it."""
    text = f"worker {worker}: {info.get('state') or '?'} on {info.get('node') or '-'}, step {info.get('step', 0)}"
    if info.get("step_time"):
        text += f", {info['step_time'] * 1000:.1f} ms/step"
    if info.get("owner_epoch"):
        text += f"; moved {info['owner_epoch']} time{'s' if info['owner_epoch'] != 1 else ''}"
    if info.get("note"):
        text += f" (last: {info['note']})"
    return text


def format_table(jobs: list[Mapping[str, Any]]) -> str:
    """``psctl list``: one row per job."""
    rows = [("ID", "NAME", "STATE", "EPOCH", "STEP", "LOSS", "ACCURACY")]
    for j in jobs:
        acc = j.get("metrics", {}).get("val_accuracy", j.get("metrics", {}).get("accuracy"))
        rows.append((j["id"], j.get("name") or "", j["state"], str(j["epoch"]), str(j["step"]),
                     _fmt_number(j.get("loss")), _fmt_number(acc)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_nodes(nodes: list[Mapping[str, Any]]) -> str:
    """``psctl nodes``: one row per registered node, shards first; RESTARTS counts its
    earlier records (restarted by a supervisor, or back after it was declared lost)."""
    rows = [("ROLE", "INDEX", "NAME", "ADDRESS", "STATE", "LAST SEEN", "RESTARTS")]
    for n in sorted(nodes, key=lambda n: (n["role"] != "ps", n["index"])):
        rows.append((n["role"], str(n["index"]), n.get("name") or "-", n.get("address") or "-",
                     "alive" if n["alive"] else "lost", f"{n['last_seen']:.1f}s ago", str(n.get("restarts", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_record(rec: Mapping[str, Any]) -> str:
    """One progress record from the master's history, as a log line."""
    rest = {k: v for k, v in rec.items() if k not in ("time", "worker", "step", "epoch", "final")}
    head = []
    if "time" in rec:
        head.append(_fmt_time(rec["time"]))
    if "worker" in rec:
        head.append(f"worker {rec['worker']}")
    if "epoch" in rec:
        head.append(f"epoch {rec['epoch']}")
    if "step" in rec:
        head.append(f"step {rec['step']}")
    if rec.get("final"):
        head.append("final")
    return " ".join(head) + (" - " + format_metrics(rest) if rest else "")
