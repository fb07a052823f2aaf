"""Helpers for the end-to-end tests of the distributed runtime (fixtures: conftest.py).

Everything here runs the real services (``python -m master``, ``psserver``,
``worker``) as local processes on port 0, with state in a temporary directory,
and stops them in teardown. Users' commands run as subprocesses of ``psctl``
(``python -m client.cli``), exactly as a user would type them.

tests/conftest.py sets ``NUMBA_ENABLE_CUDASIM`` for the CUDA simulator tests; the
services must not inherit it (they run real CPU kernels), so the environment of
every subprocess started here drops it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from typing import Iterator

from client.launchers import ClusterHandle, ClusterSpec, LocalProcessLauncher, load_handle, parse_ready_line, pid_alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST_EXAMPLE = os.path.join(ROOT, "examples", "mnist_mlp.py")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
CONTRACT_FIELDS = ("id", "state", "step", "epoch", "loss", "metrics", "error")
# Variables a test process may carry that must not reach the services or psctl.
_SCRUBBED = ("NUMBA_ENABLE_CUDASIM", "PSTRAIN_MASTER", "PSTRAIN_HOME")


# ---- environments --------------------------------------------------------------------------------
def service_env(state_dir: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """The environment for psctl and the services: this checkout on PYTHONPATH, no CUDA
    simulator, no inherited master address, ``PSTRAIN_HOME`` = ``state_dir``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    if state_dir is not None:
        env["PSTRAIN_HOME"] = str(state_dir)
    env.update(extra)
    return env


@contextlib.contextmanager
def services_environment() -> Iterator[None]:
    """While in the block, ``os.environ`` is what the services should inherit
    (LocalProcessLauncher passes this process's environment to them)."""
    saved = {k: os.environ.get(k) for k in _SCRUBBED}
    for k in _SCRUBBED:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def psctl(args: list[str], env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``psctl ARGS`` as a user would (from the repository root); never a traceback."""
    out = subprocess.run([sys.executable, "-m", "client.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    if check:
        assert out.returncode == 0, f"psctl {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr}"
    return out


def last_json(text: str):
    """The last line of ``text`` that is JSON (psctl --json prints one line)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise AssertionError(f"no JSON line in:\n{text}")


# ---- job files -----------------------------------------------------------------------------------
def digits_job_source(epochs: int = 3, batch_size: int = 64, seed: int = 7, mode: str = "sync",
                      optimizer: str = "nn.optimizers.SGD(0.05, momentum=0.9)", **job_kw) -> str:
    """A small, fast job file: digits, Dense(32 relu) -> Dense(10 softmax)."""
    extra = "".join(f", {k}={v!r}" for k, v in job_kw.items())
    return textwrap.dedent(f"""\
        from client import nn
        from client.job import Job


        def job():
            m = nn.Sequential([nn.Dense(32, activation="relu", input_dim=64),
                               nn.Dense(10, activation="softmax")], seed={seed})
            m.compile({optimizer}, "sparse_categorical_crossentropy", metrics=["accuracy"])
            return Job(m, dataset="digits", batch_size={batch_size}, epochs={epochs}, mode={mode!r}{extra})
        """)


def make_job(epochs: int = 3, num_workers: int = 0, num_shards: int = 0, seed: int = 7):
    """The same digits job as an in-process ``Job``: Dense(32 relu) -> Dense(10 softmax),
    SGD(0.05, momentum 0.9), batch 64, float32, sync."""
    from client import nn
    from client.job import Job

    model = nn.Sequential([nn.Dense(32, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")],
                          seed=seed)
    model.compile(nn.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return Job(model, dataset="digits", batch_size=64, epochs=epochs, mode="sync",
               num_workers=num_workers, num_shards=num_shards)


def write_job(directory, name: str = "digits_job.py", **kw) -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(digits_job_source(**kw))
    return path


def assert_same_weights(client, baseline_id: str, job_id: str) -> None:
    """The two jobs' exported weights are bit-identical (same names, same arrays)."""
    import numpy as np

    _, names, want = client.export(baseline_id)
    _, names2, got = client.export(job_id)
    assert names == names2
    for name, a, b in zip(names, want, got):
        np.testing.assert_array_equal(a, b, err_msg=name)


# ---- clusters -------------------------------------------------------------------------------------------
def wait_job(client, job_id: str, timeout: float = 120.0, until=TERMINAL, poll: float = 0.1) -> dict:
    """Poll a job until its state is in ``until`` (or a predicate on its status holds)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(job_id)
        done = until(status) if callable(until) else status["state"] in until
        if done:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there within {timeout:.0f}s; last status: {status}")
        time.sleep(poll)


def worker_node_ids(handle: ClusterHandle) -> list[str]:
    """The master's node id of each launched worker process, in launch order (from the
    ``PSTRAIN_READY worker <node id>`` line of its log)."""
    ids = []
    for path in handle.logs["worker"]:
        with open(path) as f:
            ids.append(parse_ready_line(f.read(), "worker"))
    return ids


def all_gone(pids, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return not any(pid_alive(p) for p in pids)


@contextlib.contextmanager
def running_cluster(state_dir, workers: int = 2, ps: int = 2, heartbeat_timeout: float = 5.0) -> Iterator[tuple[ClusterHandle, LocalProcessLauncher]]:
    """A LocalProcessLauncher cluster on port 0, always stopped afterwards (and checked gone)."""
    spec = ClusterSpec(workers=workers, ps=ps, port=0, state_dir=str(state_dir), heartbeat_timeout=heartbeat_timeout)
    launcher = LocalProcessLauncher(start_timeout=120)
    with services_environment():
        handle = launcher.start(spec)
    pids = [p for ps_ in handle.pids.values() for p in ps_]
    try:
        yield handle, launcher
    finally:
        launcher.stop(handle, timeout=10)
        assert all_gone(pids), f"cluster processes still alive after stop: {[p for p in pids if pid_alive(p)]}"


def stop_leftover(state_dir) -> None:
    """Safety net for tests that start clusters through psctl: stop whatever the state
    file still records."""
    handle = load_handle(str(state_dir))
    if handle is not None:
        LocalProcessLauncher().stop(handle, timeout=5)


ADDRESS_RE = re.compile(r"master at (\S+?:\d+)")
