"""The launcher interface: what to launch (:class:`ClusterSpec`), what was launched
(:class:`ClusterHandle`, kept in the state file ``<state_dir>/cluster.json``) and the
:class:`Launcher` methods every backend implements.

A backend is one module with one :class:`Launcher` subclass, registered by name in
:mod:`client.launchers`; ``psctl up|train --launcher NAME`` picks it and ``psctl down``
finds it again through the ``launcher`` field of the state file. Usage::

    class MyLauncher(Launcher):
        name = "mine"

        def start(self, spec: ClusterSpec) -> ClusterHandle:
            handle = ClusterHandle(master_address=..., state_dir=spec.state_dir, spec=spec, launcher=self.name)
            write_handle(handle)  # so that `psctl down` can stop it
            return handle

        def stop(self, handle, timeout=10.0): ...
        def status(self, handle): ...
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator

from pstrain.runtime.files import atomic_write
from pstrain.runtime.spec import Device

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TARGETS_FILE = "prometheus-targets.json"  # file_sd targets of every role (see write_scrape_targets)
METRICS_TOKEN_FILE = "metrics.token"  # the bearer token every /metrics of the cluster asks for (0600)
ROLES = ("master", "ps", "worker")
STOP_ORDER = ("worker", "ps", "master")  # workers first, so no one pushes to a stopped shard
DEVICES = (Device.CPU.value, Device.CUDA.value, Device.AUTO.value)  # what a cluster's workers may run on
MAX_PROCESSES = 256
DEFAULT_LAUNCHER = "local"


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
    tls_dir: str = ""  # mutual TLS between every process (psctl certs init); "" = plaintext on loopback
    insecure: bool = False  # plaintext even where other machines can reach the services

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
        if self.tls_dir:
            object.__setattr__(self, "tls_dir", os.path.abspath(os.path.expanduser(self.tls_dir)))

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
    every other node's). ``launcher`` names the backend that started it (the
    :class:`Launcher` to stop it with); state files written before it existed mean
    ``"local"``."""

    master_address: str
    state_dir: str
    pids: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in ROLES})
    logs: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in ROLES})
    spec: ClusterSpec | None = None
    metrics_address: str = ""
    launcher: str = DEFAULT_LAUNCHER
    # How to start each process again (the launcher's own argument lists, by role and
    # index), how often each was restarted, and the pid of a detached supervisor (0: none).
    args: dict[str, list[list[str]]] = field(default_factory=lambda: {r: [] for r in ROLES})
    restarts: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in ROLES})
    supervisor_pid: int = 0
    # The backend's own state (JSON values): e.g. the Ray launcher's cluster address,
    # namespace and actor names, so that ``psctl down`` from another process finds them.
    backend: dict[str, Any] = field(default_factory=dict)
    # The cluster's secrets (the state file is 0600): "token", the admin user's token psctl
    # presents; "node_token", what the cluster's processes present to each other.
    secrets: dict[str, str] = field(default_factory=dict)

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
            "metrics_address": self.metrics_address, "launcher": self.launcher,
            "args": self.args, "restarts": self.restarts, "supervisor_pid": self.supervisor_pid,
            "backend": self.backend, "secrets": self.secrets,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterHandle":
        spec = ClusterSpec(**d["spec"]) if d.get("spec") else None
        return cls(
            master_address=str(d["master_address"]), state_dir=str(d["state_dir"]),
            pids={r: [int(p) for p in d.get("pids", {}).get(r, [])] for r in ROLES},
            logs={r: [str(p) for p in d.get("logs", {}).get(r, [])] for r in ROLES},
            spec=spec, metrics_address=str(d.get("metrics_address", "")),
            launcher=str(d.get("launcher") or DEFAULT_LAUNCHER),
            args={r: [[str(a) for a in argv] for argv in d.get("args", {}).get(r, [])] for r in ROLES},
            restarts={r: [int(n) for n in d.get("restarts", {}).get(r, [])] for r in ROLES},
            supervisor_pid=int(d.get("supervisor_pid", 0) or 0),
            backend=dict(d.get("backend") or {}),
            secrets={str(k): str(v) for k, v in (d.get("secrets") or {}).items()},
        )

    # -- credentials --------------------------------------------------------------------------------
    def make_secrets(self) -> None:
        """The cluster's tokens, made once: the environment's when set (``PSTRAIN_NODE_TOKEN``,
        ``PSTRAIN_ADMIN_TOKEN``, ``PSTRAIN_METRICS_TOKEN``), else new random ones. Every
        /metrics of the cluster asks for the metrics token: the cluster's numbers (jobs,
        losses, addresses) are not for every user of the machine."""
        from protos.observability import metrics_token
        from pstrain.transport.security import admin_token_from_env, new_token, node_token_from_env

        if not self.secrets.get("node_token"):
            self.secrets["node_token"] = node_token_from_env() or new_token()
        if not self.secrets.get("token"):
            self.secrets["token"] = admin_token_from_env() or new_token()
        if not self.secrets.get("metrics_token"):
            self.secrets["metrics_token"] = metrics_token() or new_token()

    def service_env(self, role: str) -> dict[str, str]:
        """What a service of ``role`` needs in its environment to join the cluster."""
        self.make_secrets()
        env = {"PSTRAIN_NODE_TOKEN": self.secrets["node_token"], "PSTRAIN_METRICS_TOKEN": self.secrets["metrics_token"]}
        if role == "master":
            env["PSTRAIN_ADMIN_TOKEN"] = self.secrets["token"]
        if self.spec is not None and self.spec.tls_dir:
            env["PSTRAIN_TLS_DIR"] = self.spec.tls_dir
        if self.spec is not None and self.spec.insecure:
            env["PSTRAIN_INSECURE"] = "1"
        return env

    def user_credentials(self):
        """What psctl presents to this cluster's master: the admin token (and, with TLS,
        the user certificate)."""
        return self._credentials("user", user_token=self.secrets.get("token", ""))

    def node_credentials(self):
        """What a node of this cluster presents (benchmarks and tests calling shards)."""
        return self._credentials("worker", node_token=self.secrets.get("node_token", ""))

    def _credentials(self, role: str, **tokens):
        from pstrain.transport.security import Credentials, TLSFiles

        tls_dir = self.spec.tls_dir if self.spec is not None else ""
        return Credentials(tls=TLSFiles(tls_dir, role) if tls_dir else None, **tokens)


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


def open_log(path: str):
    """``path`` opened to append, binary, readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "ab")


def make_private_dirs(spec: ClusterSpec) -> None:
    """The state and log directories, the owner's only (0700): they hold the cluster's
    tokens, its job database and the services' logs."""
    for path in (spec.state_dir, spec.log_dir):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)


def user_credentials(master: str, state_dir: str | None = None):
    """What a user's call to the master at ``master`` presents: ``PSTRAIN_TOKEN`` (or
    ``PSTRAIN_TOKEN_FILE``) and ``PSTRAIN_TLS_DIR``'s user certificate when set; else the
    admin token and TLS directory of the cluster psctl up recorded in ``state_dir``
    (default: :func:`default_state_dir`), if that cluster's master is the one called (a
    token is never sent to another master)."""
    import dataclasses

    from pstrain.transport.security import Credentials

    creds = Credentials.from_env("user")
    try:
        handle = load_handle(state_dir)
    except ValueError:
        handle = None
    if handle is None or handle.master_address != master:
        return creds
    recorded = handle.user_credentials()  # what is not in the environment, from the state file
    return dataclasses.replace(creds, user_token=creds.user_token or recorded.user_token, tls=creds.tls or recorded.tls)


def write_scrape_targets(handle: ClusterHandle, nodes: list[dict]) -> str:
    """Write ``<state_dir>/prometheus-targets.json``: every role's /metrics address in
    Prometheus' file_sd format (a ``file_sd_configs`` entry watching it makes one
    Prometheus scrape the whole cluster, wherever its processes run), and beside it
    ``metrics.token`` (0600), the bearer token those endpoints ask for (the scrape job's
    ``authorization: {credentials_file: ...}``). ``nodes`` are the master's ListNodes
    records; the master's own address comes from the handle. Labels: ``role`` and
    ``node`` (the worker's name, else ``ps-<index>``), stable across restarts."""
    if handle.secrets.get("metrics_token"):
        with atomic_write(os.path.join(handle.state_dir, METRICS_TOKEN_FILE), text=True, mode=0o600) as f:
            f.write(handle.secrets["metrics_token"] + "\n")
    groups = []
    if handle.metrics_address:
        groups.append({"targets": [handle.metrics_address], "labels": {"role": "master", "node": "master"}})
    for n in sorted(nodes, key=lambda n: (n["role"], n["index"])):
        if n.get("alive", True) and n.get("metrics_address"):
            name = n.get("name") or f"{n['role']}-{n['index']}"
            groups.append({"targets": [n["metrics_address"]], "labels": {"role": n["role"], "node": name}})
    path = os.path.join(handle.state_dir, TARGETS_FILE)
    with atomic_write(path, text=True, mode=0o644) as f:
        json.dump(groups, f, indent=2)
    return path


def remove_handle(handle: ClusterHandle) -> None:
    """Delete the state file if it still describes ``handle`` (not a newer cluster)."""
    current = None
    with contextlib.suppress(ValueError):
        current = load_handle(handle.state_dir)
    if current is not None and current.pids.get("master") == handle.pids.get("master"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(handle.state_dir, STATE_FILE))


# ---- service logs -----------------------------------------------------------------------------------
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


def indented_tail(path: str, lines: int = 20, empty: str = "(the log is empty)") -> str:
    """The last ``lines`` lines of a log, indented for an error message."""
    return "\n".join("    " + line for line in (tail(path, lines) or empty).splitlines())


def describe_exit(role: str, index: int, pid: int, code: int | None, log_path: str, lines: int = 20) -> str:
    """A user-facing message for a service that died, with the tail of its log."""
    if code is None:
        how = "exited"
    elif code < 0:
        how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    indented = indented_tail(log_path, lines)
    return f"{role}-{index} (pid {pid}) {how}; last lines of {log_path}:\n{indented}"



# ---- elastic scaling ---------------------------------------------------------------------------------------
def scale_job(client, job_id: str, workers: int, launcher: "Launcher | None" = None,
              handle: ClusterHandle | None = None, timeout: float = 120.0) -> tuple[dict, list[str]]:
    """``psctl scale``: serve running job ``job_id`` with ``workers`` worker processes.
    With an elastic launcher and its cluster's handle, first start the processes the
    cluster lacks, then (once the job's slots have moved) stop those left idle. Returns
    the job's status after the ScaleJob call and what the launcher did."""
    elastic = launcher is not None and handle is not None and launcher.elastic
    lines = launcher.resize_workers(handle, workers) if elastic else []
    status = client.scale(job_id, workers)
    if not elastic:
        return status, lines
    deadline = time.monotonic() + timeout
    while True:
        now = client.get(job_id)
        serving = {w["node"] for w in now["workers"].values() if w.get("state") != "done"}
        if now["state"] not in ("RUNNING", "PENDING") or len(serving) <= workers:
            break
        if time.monotonic() > deadline:
            return status, lines + [f"the job's slots still sit on {len(serving)} processes after {timeout:.0f}s; "
                                    "no process stopped"]
        time.sleep(0.2)
    busy = {w["node"] for job in client.list() if job["state"] in ("RUNNING", "PENDING")
            for w in job["workers"].values() if w.get("state") != "done"}
    return status, lines + launcher.resize_workers(handle, workers, busy=busy)


# ---- the interface --------------------------------------------------------------------------------------
class Launcher(abc.ABC):
    """Starts and stops the services of a cluster; one subclass per backend, registered
    under its :attr:`name` (see :func:`client.launchers.register_launcher`).

    Every launcher takes the keyword ``start_timeout`` (seconds :meth:`start` may wait
    for the cluster to come up); ``psctl`` builds one from its flags with
    :meth:`options_from_args`.
    """

    name: ClassVar[str] = ""  # what --launcher and the state file call this backend

    @abc.abstractmethod
    def start(self, spec: ClusterSpec) -> ClusterHandle:
        """Start a cluster and return once every shard and worker is registered and alive.
        The handle's ``launcher`` is :attr:`name`, and it is written to the state file
        (:func:`write_handle`) so that ``psctl down`` can stop the cluster."""

    @abc.abstractmethod
    def stop(self, handle: ClusterHandle, timeout: float = 10.0) -> None:
        """Stop every process of the cluster (workers, then shards, then the master)."""

    @abc.abstractmethod
    def status(self, handle: ClusterHandle) -> list[ProcessStatus]:
        """Whether each process of the cluster still runs."""

    # True when ``restart`` works, so pstrain's ``Supervisor`` should watch the cluster
    # (a backend with restarts of its own, like Ray's actors, leaves it False).
    restartable: ClassVar[bool] = False

    def restart(self, handle: ClusterHandle, role: str, index: int) -> int:
        """Start process ``role``-``index`` of ``handle`` again (it died), as it was started
        and at the same address; returns the new pid. Supervision (``Supervisor``) calls
        this; a launcher that cannot restart raises ClusterError."""
        raise ClusterError(f"the {self.name} launcher cannot restart processes")

    def exit_code(self, pid: int) -> int | None:
        """The exit status of a service that stopped (None: running, or not known here)."""
        return None

    # -- shared by the backends ---------------------------------------------------------------------------
    def claim_state_dir(self, spec: ClusterSpec) -> None:
        """Refuse to start where a cluster still runs; remove a stale state file."""
        existing = load_handle(spec.state_dir)
        if existing is None:
            return
        if existing.launcher != self.name:
            raise ClusterError(f"{spec.state_file} records a cluster started by the {existing.launcher} launcher; "
                               f"run psctl down --state-dir {spec.state_dir} first")
        live = [s for s in self.status(existing) if s.alive]
        if live:
            raise ClusterError(
                f"a cluster is already running at {existing.master_address} (state in {spec.state_file}, "
                f"{len(live)} live processes); run psctl down first"
            )
        log.info("removing the stale state file %s (no live processes)", spec.state_file)
        remove_handle(existing)

    def check_alive(self, handle: ClusterHandle) -> None:
        """Raise ClusterError naming the process if one of a starting cluster died."""

    def wait_registered(self, handle: ClusterHandle, spec: ClusterSpec, deadline: float, timeout: float,
                        poll: float = 0.2) -> list[dict]:
        """Wait until the master lists every shard and worker of ``spec`` alive (checking
        :meth:`check_alive` meanwhile); returns the master's node records. Past ``deadline``
        (``timeout`` seconds after the start), a ClusterError with the lacking roles' log tails."""
        import grpc

        from pstrain.transport.master_client import MasterClient, MasterUnavailable  # grpc only when a cluster runs

        client = MasterClient(handle.master_address, timeout=5.0, connect_timeout=1.0,
                              credentials=handle.user_credentials())
        counts = {"ps": 0, "worker": 0}
        try:
            while True:
                self.check_alive(handle)
                try:
                    nodes = client.nodes()
                    counts = {r: sum(1 for n in nodes if n["role"] == r and n["alive"]) for r in counts}
                    if counts["ps"] >= spec.ps and counts["worker"] >= spec.workers:
                        return nodes
                except (MasterUnavailable, grpc.RpcError) as exc:
                    log.debug("waiting for the master at %s: %s", handle.master_address, exc)
                if time.monotonic() > deadline:
                    lacking = [r for r, want in (("ps", spec.ps), ("worker", spec.workers)) if counts[r] < want]
                    tails = "\n".join(
                        f"  {role}-{i} ({log_path}):\n" + indented_tail(log_path, 10, "(empty)")
                        for role, i, _, log_path in handle.processes() if role in lacking or role == "master"
                    )
                    raise ClusterError(
                        f"the cluster did not come up within {timeout:.0f}s: the master at "
                        f"{handle.master_address} lists {counts['ps']}/{spec.ps} ps shards and "
                        f"{counts['worker']}/{spec.workers} workers alive. Last log lines:\n{tails}"
                    )
                time.sleep(poll)
        finally:
            client.close()

    # True when ``resize_workers`` works: ``psctl scale`` then adds worker processes a job
    # is scaled out to, and removes idle ones after it is scaled in (see scale_job).
    elastic: ClassVar[bool] = False

    def resize_workers(self, handle: ClusterHandle, workers: int, busy: set[str] | None = None) -> list[str]:
        """Start worker processes until ``workers`` run; with ``busy`` (the node ids
        serving a job), also stop idle ones beyond ``workers``. Returns what it did, one
        line each. A backend that cannot raises ClusterError."""
        raise ClusterError(f"the {self.name} launcher cannot add or remove worker processes")

    # -- psctl's flags: a new backend adds its own here, so the CLI needs no edit ------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this backend's own flags (e.g. ``--ray-address``) to ``psctl up`` and
        ``psctl train``; flags are shared by every backend, so name them after yours.
        None by default."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The constructor's keyword arguments from ``psctl``'s parsed flags."""
        return {"start_timeout": args.start_timeout}
