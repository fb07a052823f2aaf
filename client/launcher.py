"""Launching a pstrain cluster (one master, S parameter-server shards, N workers).

One interface, one backend per class: :class:`LocalProcessLauncher` runs every service as
a local process today; a Ray launcher will implement the same :class:`Launcher` methods.

Usage::

    from client.launcher import ClusterSpec, LocalProcessLauncher, local_cluster

    with local_cluster(ClusterSpec(workers=2, ps=2, port=0, state_dir="/tmp/c")) as handle:
        MasterClient(handle.master_address).submit(spec)

    # or, for a cluster that outlives this process (``psctl up --detach``):
    launcher = LocalProcessLauncher()
    handle = launcher.start(ClusterSpec())          # writes <state_dir>/cluster.json
    ...
    launcher.stop(load_handle(ClusterSpec().state_dir))   # ``psctl down``

Each service gets its own session (process group), so a Ctrl-C in the terminal reaches
only psctl, which then stops the cluster in order: workers, shards, master.
"""
from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from pstrain.runtime.files import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
ROLES = ("master", "ps", "worker")
STOP_ORDER = ("worker", "ps", "master")  # workers first, so no one pushes to a stopped shard
DEVICES = ("cpu", "cuda", "auto")
MAX_PROCESSES = 256
READY_PREFIX = "PSTRAIN_READY"
_READY = re.compile(r"^PSTRAIN_READY\s+(master|ps|worker)\b[ \t]*(\S*)[ \t]*$", re.MULTILINE)
_METRICS = re.compile(r"^PSTRAIN_METRICS[ \t]+(master|ps|worker)[ \t]+(\S+)[ \t]*$", re.MULTILINE)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repository root


class ClusterError(RuntimeError):
    """A cluster could not be started or stopped; the message says which process and why."""


def default_state_dir() -> str:
    """``$PSTRAIN_HOME`` if set, else ``~/.pstrain/cluster``."""
    return os.environ.get("PSTRAIN_HOME") or os.path.join("~", ".pstrain", "cluster")


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSpec:
    """What to launch. ``port=0`` lets the master pick a free port; ``state_dir`` holds
    the state file, logs, the master's job database and (by default) checkpoints."""

    workers: int = 2
    ps: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    state_dir: str = ""
    device: str = "cpu"
    heartbeat_timeout: float = 5.0
    checkpoint_dir: str = ""

    def __post_init__(self):
        for name in ("workers", "ps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROCESSES:
                raise ValueError(f"ClusterSpec.{name}={value!r} is out of range; allowed: an integer in [1, {MAX_PROCESSES}]")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ClusterSpec.port={self.port!r} is out of range; allowed: [0, 65535] (0 picks a free port)")
        if not isinstance(self.host, str) or not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"ClusterSpec.host={self.host!r} must be a host name or IP address, e.g. 127.0.0.1")
        if self.device not in DEVICES:
            raise ValueError(f"ClusterSpec.device={self.device!r}; allowed: {', '.join(DEVICES)}")
        if isinstance(self.heartbeat_timeout, bool) or not isinstance(self.heartbeat_timeout, (int, float)) \
                or not 0.1 <= self.heartbeat_timeout <= 3600:
            raise ValueError(f"ClusterSpec.heartbeat_timeout={self.heartbeat_timeout!r} is out of range; "
                             "allowed: [0.1, 3600] seconds")
        # Absolute paths: the state file outlives the cwd psctl ran in.
        state_dir = os.path.abspath(os.path.expanduser(self.state_dir or default_state_dir()))
        object.__setattr__(self, "state_dir", state_dir)
        checkpoint_dir = self.checkpoint_dir or os.path.join(state_dir, "checkpoints")
        object.__setattr__(self, "checkpoint_dir", os.path.abspath(os.path.expanduser(checkpoint_dir)))
        object.__setattr__(self, "heartbeat_timeout", float(self.heartbeat_timeout))

    @property
    def log_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)


@dataclass
class ClusterHandle:
    """A running cluster: where its master is and which processes make it up.
    ``metrics_address`` is where the master serves /metrics (the master's ListNodes gives
    every other node's)."""

    master_address: str
    state_dir: str
    pids: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in ROLES})
    logs: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in ROLES})
    spec: ClusterSpec | None = None
    metrics_address: str = ""

    def processes(self) -> Iterator[tuple[str, int, int, str]]:
        """(role, index, pid, log path) for every process, master first."""
        for role in ROLES:
            logs = self.logs.get(role, [])
            for i, pid in enumerate(self.pids.get(role, [])):
                yield role, i, pid, logs[i] if i < len(logs) else ""

    def to_dict(self) -> dict:
        return {
            "master_address": self.master_address, "state_dir": self.state_dir,
            "pids": self.pids, "logs": self.logs, "spec": asdict(self.spec) if self.spec else None,
            "metrics_address": self.metrics_address,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterHandle":
        spec = ClusterSpec(**d["spec"]) if d.get("spec") else None
        return cls(
            master_address=str(d["master_address"]), state_dir=str(d["state_dir"]),
            pids={r: [int(p) for p in d.get("pids", {}).get(r, [])] for r in ROLES},
            logs={r: [str(p) for p in d.get("logs", {}).get(r, [])] for r in ROLES},
            spec=spec, metrics_address=str(d.get("metrics_address", "")),
        )


@dataclass(frozen=True)
class ProcessStatus:
    role: str
    index: int
    pid: int
    alive: bool
    log: str

    @property
    def label(self) -> str:
        return f"{self.role}-{self.index}"


# ---- state file ---------------------------------------------------------------------------------------
def write_handle(handle: ClusterHandle) -> str:
    """Write ``<state_dir>/cluster.json`` atomically (temp file, fsync, rename)."""
    path = os.path.join(handle.state_dir, STATE_FILE)
    with atomic_write(path, text=True, mode=0o600) as f:
        json.dump(handle.to_dict(), f, indent=2)
    return path


def load_handle(state_dir: str | None = None) -> ClusterHandle | None:
    """The cluster recorded in ``state_dir`` (default: :func:`default_state_dir`), or None."""
    state_dir = os.path.abspath(os.path.expanduser(state_dir or default_state_dir()))
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        return ClusterHandle.from_dict(data)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the cluster state file {path} is unreadable ({exc}); stop any pstrain processes "
                         "by hand and delete it") from None


def remove_handle(handle: ClusterHandle) -> None:
    """Delete the state file if it still describes ``handle`` (not a newer cluster)."""
    current = None
    with contextlib.suppress(ValueError):
        current = load_handle(handle.state_dir)
    if current is not None and current.pids.get("master") == handle.pids.get("master"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(handle.state_dir, STATE_FILE))


# ---- pure helpers -------------------------------------------------------------------------------------
def parse_ready_line(text: str, role: str) -> str | None:
    """The address in a ``PSTRAIN_READY <role> [host:port]`` line of ``text``: the
    address ("" for a worker, which serves nothing), or None if there is no such line."""
    for m in _READY.finditer(text):
        if m.group(1) == role:
            return m.group(2)
    return None


def parse_metrics_line(text: str, role: str) -> str | None:
    """The address in a ``PSTRAIN_METRICS <role> host:port`` line of ``text`` (where
    that service serves /metrics), or None if there is no such line."""
    for m in _METRICS.finditer(text):
        if m.group(1) == role:
            return m.group(2)
    return None


def connectable(address: str) -> str:
    """``0.0.0.0:P`` / ``[::]:P`` (listen on all interfaces) -> an address to dial locally."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        return f"127.0.0.1:{port}"
    return address


def tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ("" if it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def describe_exit(role: str, index: int, pid: int, code: int | None, log_path: str, lines: int = 20) -> str:
    """A user-facing message for a service that died, with the tail of its log."""
    if code is None:
        how = "exited"
    elif code < 0:
        how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    text = tail(log_path, lines) or "(the log is empty)"
    indented = "\n".join("    " + line for line in text.splitlines())
    return f"{role}-{index} (pid {pid}) {how}; last lines of {log_path}:\n{indented}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child is reaped and counts as gone)."""
    if pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own exited children
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel below
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_pstrain_process(pid: int, role: str) -> bool:
    # A pid in an old state file may have been reused by an unrelated process; only
    # signal it if its command line is the service we launched (where /proc tells us).
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return pid_alive(pid)
    module = {"master": b"master", "ps": b"psserver", "worker": b"worker"}[role]
    return any(a == b"-m" and b == module for a, b in zip(argv, argv[1:]))


# ---- the interface --------------------------------------------------------------------------------------
class Launcher(abc.ABC):
    """Starts and stops the services of a cluster; one subclass per backend."""

    @abc.abstractmethod
    def start(self, spec: ClusterSpec) -> ClusterHandle:
        """Start a cluster and return once every shard and worker is registered and alive."""

    @abc.abstractmethod
    def stop(self, handle: ClusterHandle, timeout: float = 10.0) -> None:
        """Stop every process of the cluster (workers, then shards, then the master)."""

    @abc.abstractmethod
    def status(self, handle: ClusterHandle) -> list[ProcessStatus]:
        """Whether each process of the cluster still runs."""


def thread_env(role: str, workers: int, cores: int | None = None) -> dict[str, str]:
    """Thread counts for a process sharing this machine with the rest of the cluster.

    OpenBLAS and OpenMP pools spin while they wait; with several processes each
    spinning a pool as wide as the machine, they steal each other's cores and a step
    takes ten times longer. Workers split the cores between them; shards and the
    master (no big matrix products) get one thread. Explicit settings in the
    environment win."""
    cores = cores or os.cpu_count() or 1
    n = max(1, cores // max(workers, 1)) if role == "worker" else 1
    env = {
        var: os.environ.get(var, str(n))
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    }
    # Every step moves megabytes of tensors through fresh buffers; glibc would map and
    # unmap each one (~900 page faults per push measured on a shard). Keeping freed
    # memory in the heap (both thresholds together) takes that off the critical path.
    env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(256 * 2**20))
    env["MALLOC_TRIM_THRESHOLD_"] = os.environ.get("MALLOC_TRIM_THRESHOLD_", str(512 * 2**20))
    return env


class LocalProcessLauncher(Launcher):
    """Runs the master, shards and workers as processes of this machine.

    ``start_timeout`` bounds how long :meth:`start` waits for the master's READY line and
    for every node to register; ``poll`` is how often it checks.
    """

    def __init__(self, start_timeout: float = 120.0, poll: float = 0.2, python: str | None = None):
        self.start_timeout = start_timeout
        self.poll = poll
        self.python = python or sys.executable
        self._children: dict[int, subprocess.Popen] = {}

    # -- start ------------------------------------------------------------------------------------------
    def start(self, spec: ClusterSpec) -> ClusterHandle:
        existing = load_handle(spec.state_dir)
        if existing is not None:
            live = [s for s in self.status(existing) if s.alive]
            if live:
                raise ClusterError(
                    f"a cluster is already running at {existing.master_address} (state in {spec.state_file}, "
                    f"{len(live)} live processes); run psctl down first"
                )
            log.info("removing the stale state file %s (no live processes)", spec.state_file)
            remove_handle(existing)
        os.makedirs(spec.log_dir, exist_ok=True)
        os.makedirs(spec.checkpoint_dir, exist_ok=True)
        address = f"{spec.host}:{spec.port}"
        handle = ClusterHandle(master_address=address, state_dir=spec.state_dir, spec=spec)
        deadline = time.monotonic() + self.start_timeout
        try:
            self._spawn(handle, "master", 0, [
                "-m", "master", "--host", spec.host, "--port", str(spec.port),
                "--db", os.path.join(spec.state_dir, "master.db"),
                "--heartbeat-timeout", repr(spec.heartbeat_timeout), "--metrics-port", "0",
            ])
            write_handle(handle)  # from here on, `psctl down` can clean up whatever happens
            # Wait for the READY line even on a fixed port: it gives the port when port=0,
            # and a master that cannot serve (e.g. the port is taken) fails here, before
            # shards and workers start dialling it.
            handle.master_address = self._wait_master_address(handle, deadline)
            metrics = parse_metrics_line(tail(handle.logs["master"][0], 200), "master")
            handle.metrics_address = connectable(metrics) if metrics else ""
            write_handle(handle)
            for i in range(spec.ps):
                self._spawn(handle, "ps", i, [
                    "-m", "psserver", "--master", handle.master_address, "--host", spec.host, "--port", "0",
                    "--checkpoint-dir", spec.checkpoint_dir, "--metrics-port", "0",
                ])
            for i in range(spec.workers):
                self._spawn(handle, "worker", i, ["-m", "worker", "--master", handle.master_address,
                                                  "--device", spec.device, "--host", spec.host, "--metrics-port", "0"])
            write_handle(handle)
            self._wait_registered(handle, spec, deadline)
        except BaseException:
            # Whatever went wrong (a dead service, a timeout, Ctrl-C), leave nothing running.
            self.stop(handle, timeout=5.0)
            raise
        log.info("cluster up: master at %s, %d ps, %d workers", handle.master_address, spec.ps, spec.workers)
        return handle

    def _spawn(self, handle: ClusterHandle, role: str, index: int, args: list[str]) -> None:
        log_path = os.path.join(handle.state_dir, "logs", f"{role}-{index}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(thread_env(role, handle.spec.workers))
        # The services import the packages of this checkout even when pstrain is not installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [self.python, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self._children[proc.pid] = proc
        handle.pids.setdefault(role, []).append(proc.pid)
        handle.logs.setdefault(role, []).append(log_path)
        log.debug("started %s-%d (pid %d): %s", role, index, proc.pid, " ".join(args))

    def _check_alive(self, handle: ClusterHandle) -> None:
        for role, i, pid, log_path in handle.processes():
            proc = self._children.get(pid)
            if proc is None:  # not started by this launcher: cannot learn its exit code
                if not pid_alive(pid):
                    raise ClusterError("the cluster did not start: " + describe_exit(role, i, pid, None, log_path))
            elif proc.poll() is not None:
                raise ClusterError("the cluster did not start: " + describe_exit(role, i, pid, proc.returncode, log_path))

    def _wait_master_address(self, handle: ClusterHandle, deadline: float) -> str:
        log_path = handle.logs["master"][0]
        while True:
            address = parse_ready_line(tail(log_path, 200), "master")
            if address:
                return connectable(address)
            self._check_alive(handle)
            if time.monotonic() > deadline:
                text = "\n".join("    " + line for line in (tail(log_path) or "(the log is empty)").splitlines())
                raise ClusterError(
                    f"the master did not print '{READY_PREFIX} master HOST:PORT' within "
                    f"{self.start_timeout:.0f}s; last lines of {log_path}:\n{text}"
                )
            time.sleep(self.poll)

    def _wait_registered(self, handle: ClusterHandle, spec: ClusterSpec, deadline: float) -> None:
        import grpc

        from pstrain.transport.master_client import MasterClient, MasterUnavailable  # grpc only when a cluster runs

        client = MasterClient(handle.master_address, timeout=5.0, connect_timeout=1.0)
        counts = {"ps": 0, "worker": 0}
        try:
            while True:
                self._check_alive(handle)
                try:
                    nodes = client.nodes()
                    counts = {r: sum(1 for n in nodes if n["role"] == r and n["alive"]) for r in counts}
                    if counts["ps"] >= spec.ps and counts["worker"] >= spec.workers:
                        return
                except (MasterUnavailable, grpc.RpcError) as exc:
                    log.debug("waiting for the master at %s: %s", handle.master_address, exc)
                if time.monotonic() > deadline:
                    lacking = [r for r, want in (("ps", spec.ps), ("worker", spec.workers)) if counts[r] < want]
                    tails = "\n".join(
                        f"  {role}-{i} ({log_path}):\n" + "\n".join("    " + l for l in (tail(log_path, 10) or "(empty)").splitlines())
                        for role, i, _, log_path in handle.processes() if role in lacking or role == "master"
                    )
                    raise ClusterError(
                        f"the cluster did not come up within {self.start_timeout:.0f}s: the master at "
                        f"{handle.master_address} lists {counts['ps']}/{spec.ps} ps shards and "
                        f"{counts['worker']}/{spec.workers} workers alive. Last log lines:\n{tails}"
                    )
                time.sleep(self.poll)
        finally:
            client.close()

    # -- stop / status ------------------------------------------------------------------------------------------
    def stop(self, handle: ClusterHandle, timeout: float = 10.0) -> None:
        """SIGTERM each role in turn (workers, shards, master), waiting up to ``timeout``
        seconds per role before SIGKILL; then delete the state file."""
        stuck = []
        for role in STOP_ORDER:
            pids = [p for p in handle.pids.get(role, []) if self._alive(p) and _is_pstrain_process(p, role)]
            for pid in pids:
                _signal_group(pid, signal.SIGTERM)
            left = self._wait_gone(pids, timeout)
            for pid in left:
                log.warning("%s (pid %d) did not stop within %.0fs of SIGTERM; killing it", role, pid, timeout)
                _signal_group(pid, signal.SIGKILL)
            stuck += [(role, p) for p in self._wait_gone(left, 5.0)]
        for pid in [p for ps in handle.pids.values() for p in ps]:
            self._children.pop(pid, None)
        remove_handle(handle)
        if stuck:
            raise ClusterError("could not stop " + ", ".join(f"{r} (pid {p})" for r, p in stuck))

    def status(self, handle: ClusterHandle) -> list[ProcessStatus]:
        return [ProcessStatus(role, i, pid, self._alive(pid) and _is_pstrain_process(pid, role), log_path)
                for role, i, pid, log_path in handle.processes()]

    def exit_code(self, pid: int) -> int | None:
        """The exit status of a service this launcher started (None: running or unknown)."""
        proc = self._children.get(pid)
        return proc.poll() if proc is not None else None

    def _alive(self, pid: int) -> bool:
        proc = self._children.get(pid)
        if proc is not None:
            return proc.poll() is None
        return pid_alive(pid)

    def _wait_gone(self, pids: list[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        left = list(pids)
        while left:
            left = [p for p in left if self._alive(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return left


def _signal_group(pid: int, sig: int) -> None:
    # Each service leads its own process group (start_new_session), so this also reaches
    # anything it spawned.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def local_cluster(spec: ClusterSpec, launcher: Launcher | None = None, stop_timeout: float = 10.0) -> Iterator[ClusterHandle]:
    """Start a cluster for the ``with`` block and always stop it afterwards."""
    launcher = launcher or LocalProcessLauncher()
    handle = launcher.start(spec)
    try:
        yield handle
    finally:
        launcher.stop(handle, timeout=stop_timeout)
