"""The ``ray`` launcher: the master, S shards and N workers as Ray actors, each hosting
pstrain's own gRPC service in its own process (gRPC stays the data plane; Ray places,
resources and restarts the processes). Needs the ``ray`` extra (``pip install
pstrain[ray]``); nothing here imports Ray until a Ray cluster is used.

    psctl up --launcher ray                          # a private local Ray head (stopped by psctl down)
    psctl up --launcher ray --ray-address auto       # an existing Ray cluster (RAY_ADDRESS / ray start)
    psctl train job.py --launcher ray --ray-address 10.0.0.1:6379

How it maps onto Ray:

* **One placement group** of one bundle per process (``PACK`` by default, so co-located
  workers and shards keep pstrain's shared-memory path; ``--ray-spread`` for one process
  per node where possible); ``num_cpus`` per role may be fractional; ``--device cuda``
  workers ask for ``num_gpus`` (Ray sets ``CUDA_VISIBLE_DEVICES``). A group the cluster
  cannot hold fails within ``--start-timeout`` with the bundles that do not fit.
* **Names**: actors are ``pstrain-<cluster>-<role>-<i>`` in the Ray namespace recorded
  in the state file, so ``psctl down`` from another process finds them.
  ``psctl up --detach`` makes them detached; otherwise they end with psctl.
* **Restarts** are Ray's (``max_restarts``), and go through pstrain's own recovery: a
  restarted shard binds the port it had (kept in Ray's KV store), so the master
  recognises it by its address and restores its jobs from their checkpoints; a
  restarted worker registers under its name again and gets its slots back.
* **Metrics** stay pstrain's own /metrics endpoints; ``<state_dir>/prometheus-targets.json``
  lists them all for a Prometheus ``file_sd_configs`` entry.
* **A private head runs Ray's token auth** with a token of its own (``ray-auth.token`` in
  the state directory, 0600): Ray's ports listen on the machine's address, and without
  it anyone who reaches them could run code as this user. ``psctl`` commands find the
  token through the state file; joining an existing cluster uses its own setting.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Mapping

from client.launchers.base import (
    STOP_ORDER,
    ClusterError,
    ClusterHandle,
    ClusterSpec,
    Launcher,
    ProcessStatus,
    indented_tail,
    make_private_dirs,
    open_log,
    remove_handle,
    tail,
    write_handle,
    write_scrape_targets,
)
from client.launchers.local import pid_alive, process_env, remove_shared_memory, thread_env
from pstrain.transport.ports import unused_port

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "pstrain"
KV_NAMESPACE = "pstrain"
SERVICE_MODULES = {"master": "master.__main__", "ps": "psserver.__main__", "worker": "worker.__main__"}
DEFAULT_CPUS = {"master": 0.5, "ps": 0.5, "worker": 1.0}
# Passed from psctl's environment to every actor: where Numba caches its kernels (else
# beside the package), and Numba's CUDA simulator (a --device cuda cluster without a GPU).
PASSED_ENV = ("NUMBA_CACHE_DIR", "NUMBA_ENABLE_CUDASIM")
HEAD_OBJECT_STORE_BYTES = 512 * 2**20  # a private head's object store (/dev/shm, beside pstrain's segments)
RAY_TOKEN_FILE = "ray-auth.token"  # a private head's Ray auth token, in the cluster's state directory
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def actor_name(cluster: str, role: str, index: int) -> str:
    """``pstrain-<cluster>-<role>-<i>``: what ``psctl down`` looks an actor up by."""
    return f"pstrain-{cluster}-{role}-{index}"


def _kv_key(cluster: str, role: str, index: int) -> bytes:
    return f"pstrain/{cluster}/{role}-{index}".encode()


def _argv_set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def _port_of(address: str) -> str:
    return address.rsplit(":", 1)[1] if address else ""


# ---- the actor ----------------------------------------------------------------------------------------------
class ServiceHost:
    """A Ray actor's body: starts one pstrain service in this (the actor's) process with
    its ``python -m <role>`` flags, and keeps it serving until :meth:`stop`.

    A restarted actor (Ray's ``max_restarts``) binds the ports its first incarnation got,
    read back from Ray's KV store: a shard's address is its identity in its jobs' plans,
    and the master's is in every node's configuration."""

    def __init__(self, cluster: str, role: str, index: int, argv: list[str], log_path: str, loopback: bool):
        import ray
        from ray.experimental import internal_kv

        self.role, self.index = role, index
        self.log_path = log_path
        _log_to_file(log_path, role)
        _materialize_tls(role)
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        argv = _argv_set(argv, "--host", host)
        if role != "worker":  # (a worker's --host is its /metrics interface already)
            argv = _argv_set(argv, "--metrics-host", host)  # scraped from other nodes, like the gRPC port
        key = _kv_key(cluster, role, index)
        pinned = json.loads(internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) or b"{}")
        if pinned.get("port"):
            argv = _argv_set(argv, "--port", str(pinned["port"]))
        if pinned.get("metrics_port"):
            argv = _argv_set(argv, "--metrics-port", str(pinned["metrics_port"]))
        self.restarted = bool(pinned)
        if self.restarted:
            logging.getLogger(__name__).warning("%s-%d restarted by Ray (pid %d); binding its earlier ports %s",
                                                role, index, os.getpid(), pinned)
        self.service = importlib.import_module(SERVICE_MODULES[role]).start(argv)
        ports = {"metrics_port": _port_of(self.service.metrics_address)}
        if role != "worker":
            ports["port"] = _port_of(self.service.address)
        internal_kv._internal_kv_put(key, json.dumps({k: int(v) for k, v in ports.items() if v}).encode(),
                                     overwrite=True, namespace=KV_NAMESPACE)
        self.node_ip = ray.util.get_node_ip_address()

    def info(self) -> dict[str, Any]:
        """Where this service runs: pid, addresses, node and what Ray gave it."""
        return {"role": self.role, "index": self.index, "pid": os.getpid(), "address": self.service.address,
                "metrics_address": self.service.metrics_address, "node_ip": self.node_ip, "log": self.log_path,
                "restarted": self.restarted, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def stop(self) -> bool:
        self.service.stop()
        return True


_REMOTE_HOST = None


def _remote_host(ray):
    global _REMOTE_HOST
    if _REMOTE_HOST is None:
        _REMOTE_HOST = ray.remote(ServiceHost)
    return _REMOTE_HOST


TLS_PEM_VAR = "PSTRAIN_TLS_PEM"  # the role's TLS files (JSON {name: PEM}), through the actor's runtime env


def tls_pem_env(tls_dir: str, role: str) -> dict[str, str]:
    """The CA certificate and ``role``'s certificate and key, as one environment variable:
    an actor may land on any node, which need not see psctl's files."""
    files = {}
    for name in ("ca.crt", f"{role}.crt", f"{role}.key"):
        with open(os.path.join(tls_dir, name)) as f:
            files[name] = f.read()
    return {TLS_PEM_VAR: json.dumps(files)}


def _materialize_tls(role: str) -> None:
    """Write the TLS files the runtime env carries into a private directory (0700, keys
    0600) on this node, and point the service at it."""
    payload = os.environ.pop(TLS_PEM_VAR, "")
    if not payload:
        return
    from pstrain.transport.security import write_private

    directory = tempfile.mkdtemp(prefix=f"pstrain-tls-{role}-")
    for name, text in json.loads(payload).items():
        write_private(os.path.join(directory, os.path.basename(name)), text)
    os.environ["PSTRAIN_TLS_DIR"] = directory


def _log_to_file(path: str, role: str) -> None:
    """Send this process's log records to ``path`` too (Ray keeps the actor's stdout in
    its own session directory), in the format ``python -m <role>`` uses."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    open_log(path).close()  # the owner's only, like every log
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# ---- a private head ---------------------------------------------------------------------------------------
def _ray_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    found = here if os.path.exists(here) else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed; pip install 'pstrain[ray]'")
    return found


def write_ray_token(path: str) -> str:
    """A new random Ray auth token in ``path`` (created 0600, replacing any); returns the path."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def ray_auth_env(token_path: str | None, env: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """Ray's auth variables for a process that uses a cluster: with ``token_path`` (a
    private head's), token auth with that file; else ``env``'s own, with the mode
    ``disabled`` where it sets none (Ray 2.60 would otherwise turn token auth on for a
    head it starts and then refuse drivers without the token). None: unset."""
    if token_path:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": token_path}
    out = {k: env.get(k) for k in RAY_AUTH_VARS}
    out["RAY_AUTH_MODE"] = out["RAY_AUTH_MODE"] or "disabled"
    return out


def _apply(env: dict, values: Mapping[str, str | None]) -> bool:
    """Set (or, for None, remove) ``values`` in ``env``; whether anything changed."""
    changed = False
    for k, v in values.items():
        if env.get(k) != v:
            changed = True
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
    return changed


def start_head(log_path: str, temp_dir: str, num_cpus: float, num_gpus: int = 0, timeout: float = 60.0,
               dashboard_port: int = 0, auth_token_path: str | None = None) -> tuple[str, int]:
    """Start a Ray head on this machine (``ray start --head --block`` in its own process
    group, so :func:`stop_head` ends exactly it, not every Ray here as ``ray stop``
    would); returns (address, pid). Its ports are picked free, not Ray's fixed
    defaults, so it can run beside another head. ``dashboard_port``: serve the
    dashboard (and so Ray Jobs) on 127.0.0.1 at that port (0: no dashboard).
    ``auth_token_path``: run Ray's token auth with the token in that file (every
    driver then needs it: :func:`connect` with the same path)."""
    cmd = [_ray_binary(), "start", "--head", "--block", "--port", str(unused_port()),
           "--num-cpus", str(max(1, int(num_cpus + 0.999))), "--num-gpus", str(num_gpus),
           "--include-dashboard", "true" if dashboard_port else "false", "--disable-usage-stats",
           "--temp-dir", temp_dir, "--object-store-memory", str(HEAD_OBJECT_STORE_BYTES),
           "--ray-client-server-port", str(unused_port()), "--dashboard-agent-listen-port", str(unused_port())]
    if dashboard_port:
        cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    env = process_env()
    _apply(env, ray_auth_env(auth_token_path, env))
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    with open_log(log_path) as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = tail(log_path, 200)
        marker = "ray start --address='"
        if marker in text:
            return text.rsplit(marker, 1)[1].split("'", 1)[0], proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    how = f"exited with code {proc.returncode}" if proc.poll() is not None else f"did not start within {timeout:.0f}s"
    stop_head(proc.pid)
    raise ClusterError(f"the local Ray head {how}; last lines of {log_path}:\n" + indented_tail(log_path, empty="(empty)"))


def stop_head(pid: int) -> None:
    """End a head :func:`start_head` started, with every Ray process of its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the whole group is gone
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        pid_alive(pid)  # reaps the leader if it is our child
        time.sleep(0.05)


# ---- connecting --------------------------------------------------------------------------------------------
# The caller's own Ray auth variables while a private head's are in this process's
# environment (restored when it next connects to another cluster).
_callers_ray_auth: dict[str, str | None] | None = None


def _use_ray_auth(token_path: str | None) -> bool:
    """Put the Ray auth variables for a cluster in this process's environment (see
    ray_auth_env); whether they changed."""
    global _callers_ray_auth
    if token_path:
        if _callers_ray_auth is None:
            _callers_ray_auth = {k: os.environ.get(k) for k in RAY_AUTH_VARS}
        return _apply(os.environ, ray_auth_env(token_path))
    own, _callers_ray_auth = _callers_ray_auth, None
    return _apply(os.environ, ray_auth_env(None, own if own is not None else os.environ))


def connect(address: str, namespace: str, auth_token_path: str | None = None):
    """Connect this process to the Ray cluster at ``address`` (``auto``: RAY_ADDRESS or
    the cluster ``ray start`` made here); reuses a connection to the same cluster.
    ``auth_token_path``: the cluster's Ray auth token (a private head's)."""
    try:
        import ray
    except ImportError:
        raise ClusterError("the ray launcher needs Ray: pip install 'pstrain[ray]'") from None
    changed = _use_ray_auth(auth_token_path)
    if ray.is_initialized():
        current = ray.get_runtime_context()
        if not changed and current.namespace == namespace and (address == "auto" or current.gcs_address == address):
            return ray
        ray.shutdown()
    if changed:  # Ray keeps the mode and the token it read: have it read them again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    # Ray warns that removing a placement group kills its detached actors: that is how
    # psctl down ends them, on purpose.
    logging.getLogger("ray.actor").setLevel(logging.ERROR)
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    return ray


def connect_to(handle: ClusterHandle):
    """Connect to the Ray cluster and namespace a handle records."""
    b = handle.backend
    return connect(b["ray_address"], b.get("namespace", DEFAULT_NAMESPACE), b.get("ray_auth_token_path") or None)


# ---- the launcher ------------------------------------------------------------------------------------------
class RayLauncher(Launcher):
    """Runs a pstrain cluster as Ray actors (see the module docstring).

    ``ray_address``: None starts a private Ray head on this machine (stopped with the
    cluster); ``"auto"`` or ``host:port`` joins an existing Ray cluster. ``cpus``: logical
    CPUs per role (fractional allowed); ``worker_gpus``: GPUs per worker (default 1 for
    ``--device cuda``, else 0); ``detached``: the actors outlive this process (``psctl up
    --detach``); ``max_restarts``: Ray's restarts per actor."""

    name = "ray"
    restartable = False  # Ray restarts the actors itself

    def __init__(self, start_timeout: float = 120.0, ray_address: str | None = None, spread: bool = False,
                 namespace: str = DEFAULT_NAMESPACE, cpus: dict[str, float] | None = None,
                 worker_gpus: float | None = None, max_restarts: int = 3, detached: bool = False, poll: float = 0.2):
        self.start_timeout = start_timeout
        self.ray_address = ray_address or None
        self.spread = spread
        self.namespace = namespace
        self.cpus = {**DEFAULT_CPUS, **(cpus or {})}
        for role, n in self.cpus.items():
            if not 0 <= n <= 1024:
                raise ValueError(f"--ray-{role}-cpus={n!r} is out of range; allowed: [0, 1024] (fractions allowed)")
        if worker_gpus is not None and not 0 <= worker_gpus <= 64:
            raise ValueError(f"--ray-worker-gpus={worker_gpus!r} is out of range; allowed: [0, 64]")
        if max_restarts < -1:
            raise ValueError(f"--ray-max-restarts={max_restarts!r}; allowed: -1 (forever) or >= 0")
        self.worker_gpus = worker_gpus
        self.max_restarts = max_restarts
        self.detached = detached
        self.poll = poll
        # Handles of the actors this launcher started: a non-detached actor lives only as
        # long as a handle to it does.
        self._handles: dict[str, Any] = {}

    # -- psctl's flags --------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ray launcher (--launcher ray)")
        g.add_argument("--ray-address", metavar="ADDRESS",
                       help="an existing Ray cluster: auto (RAY_ADDRESS, or the one `ray start` made here) or "
                            "host:port; default: start a private Ray head on this machine")
        g.add_argument("--ray-spread", action="store_true",
                       help="spread the processes over the Ray nodes (default: pack them, which keeps shared memory)")
        g.add_argument("--ray-namespace", default=DEFAULT_NAMESPACE, help="Ray namespace of the actors (default pstrain)")
        for role in ("master", "ps", "worker"):
            g.add_argument(f"--ray-{role}-cpus", type=float, default=DEFAULT_CPUS[role], metavar="N",
                           help=f"logical CPUs per {role} actor (default {DEFAULT_CPUS[role]:g}; fractions allowed)")
        g.add_argument("--ray-worker-gpus", type=float, metavar="N",
                       help="GPUs per worker actor (default 1 with --device cuda, else 0)")
        g.add_argument("--ray-max-restarts", type=int, default=3,
                       help="times Ray restarts a dead actor (default 3; -1: forever)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"start_timeout": args.start_timeout, "ray_address": args.ray_address, "spread": args.ray_spread,
                "namespace": args.ray_namespace, "worker_gpus": args.ray_worker_gpus,
                "cpus": {r: getattr(args, f"ray_{r}_cpus") for r in ("master", "ps", "worker")},
                "max_restarts": args.ray_max_restarts, "detached": bool(getattr(args, "detach", False))}

    # -- start ------------------------------------------------------------------------------------------
    def bundles(self, spec: ClusterSpec) -> list[tuple[str, dict[str, float]]]:
        """(label, resources) of each process, in placement-group order: master, shards, workers."""
        gpus = self.worker_gpus if self.worker_gpus is not None else (1.0 if spec.device == "cuda" else 0.0)
        out = [("master-0", {"CPU": self.cpus["master"]})]
        out += [(f"ps-{i}", {"CPU": self.cpus["ps"]}) for i in range(spec.ps)]
        worker = {"CPU": self.cpus["worker"], **({"GPU": gpus} if gpus else {})}
        out += [(f"worker-{i}", dict(worker)) for i in range(spec.workers)]
        return [(label, {k: v for k, v in res.items() if v}) for label, res in out]

    def start(self, spec: ClusterSpec) -> ClusterHandle:
        self.claim_state_dir(spec)
        make_private_dirs(spec)
        os.makedirs(spec.checkpoint_dir, exist_ok=True)
        cluster = uuid.uuid4().hex[:8]
        handle = ClusterHandle(master_address="", state_dir=spec.state_dir, spec=spec, launcher=self.name,
                               backend={"cluster": cluster, "namespace": self.namespace, "ray_address": self.ray_address,
                                        "head_pid": 0, "head_temp_dir": "", "detached": self.detached,
                                        "options": {"cpus": self.cpus, "worker_gpus": self.worker_gpus,
                                                    "max_restarts": self.max_restarts, "spread": self.spread}})
        deadline = time.monotonic() + self.start_timeout
        try:
            address = self.ray_address
            if address is None:
                temp_dir = os.path.join(tempfile.gettempdir(), f"pstrain-ray-{cluster}")  # short: Ray's socket paths
                bundles = [res for _, res in self.bundles(spec)]
                need = {k: sum(res.get(k, 0.0) for res in bundles) for k in ("CPU", "GPU")}
                token = write_ray_token(os.path.join(spec.state_dir, RAY_TOKEN_FILE))
                handle.backend["ray_auth_token_path"] = token
                address, pid = start_head(os.path.join(spec.log_dir, "ray-head.log"), temp_dir,
                                          max(need["CPU"], os.cpu_count() or 1), int(need["GPU"] + 0.999),
                                          timeout=max(10.0, self.start_timeout), auth_token_path=token)
                handle.backend.update(ray_address=address, head_pid=pid, head_temp_dir=temp_dir)
                write_handle(handle)  # from here on, `psctl down` can clean up whatever happens
            ray = connect(address, self.namespace, handle.backend.get("ray_auth_token_path"))
            handle.backend["ray_address"] = ray.get_runtime_context().gcs_address
            pg = self._placement_group(ray, spec, cluster, deadline)
            handle.backend["placement_group"] = f"pstrain-{cluster}"
            write_handle(handle)
            master = self._actor(ray, handle, pg, 0, "master", 0, [
                "--port", str(spec.port), "--db", os.path.join(spec.state_dir, "master.db"),
                "--heartbeat-timeout", repr(spec.heartbeat_timeout), "--metrics-port", "0"])
            info = self._info(ray, handle, master, deadline, "master-0")
            handle.master_address, handle.metrics_address = info["address"], info["metrics_address"]
            write_handle(handle)
            actors = [self._actor(ray, handle, pg, 1 + i, "ps", i, [
                "--master", handle.master_address, "--port", "0", "--checkpoint-dir", spec.checkpoint_dir,
                "--metrics-port", "0"]) for i in range(spec.ps)]
            actors += [self._actor(ray, handle, pg, 1 + spec.ps + i, "worker", i, self._worker_argv(handle, i))
                       for i in range(spec.workers)]
            labels = [f"ps-{i}" for i in range(spec.ps)] + [f"worker-{i}" for i in range(spec.workers)]
            for actor, label in zip(actors, labels):
                self._info(ray, handle, actor, deadline, label)
            write_handle(handle)
            nodes = self.wait_registered(handle, spec, deadline, self.start_timeout, self.poll)
            write_scrape_targets(handle, nodes)
            write_handle(handle)
        except BaseException:
            self.stop(handle, timeout=5.0)
            raise
        log.info("Ray cluster %s up: master at %s, %d ps, %d workers", cluster, handle.master_address, spec.ps, spec.workers)
        return handle

    def _placement_group(self, ray, spec: ClusterSpec, cluster: str, deadline: float):
        from ray.util.placement_group import placement_group, remove_placement_group

        bundles = self.bundles(spec)
        pg = placement_group([res or {"CPU": 0.001} for _, res in bundles], strategy="SPREAD" if self.spread else "PACK",
                             name=f"pstrain-{cluster}", lifetime="detached" if self.detached else None)
        ready, _ = ray.wait([pg.ready()], timeout=max(0.5, deadline - time.monotonic()))
        if not ready:
            remove_placement_group(pg)
            raise ClusterError(self._unplaceable(ray, bundles))
        return pg

    def _unplaceable(self, ray, bundles: list[tuple[str, dict[str, float]]]) -> str:
        """Which bundles no node can hold, against each node's total resources."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        have = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(r.items()) if k in ("CPU", "GPU"))
                         for r in nodes) or "none alive"
        misfits = [f"{label} {res}" for label, res in bundles
                   if not any(all(node.get(k, 0.0) >= v for k, v in res.items()) for node in nodes)]
        if misfits:
            what = f"no Ray node can hold bundle{'s' if len(misfits) > 1 else ''} " + ", ".join(misfits)
        else:
            total = {k: sum(r.get(k, 0.0) for _, r in bundles) for k in ("CPU", "GPU")}
            what = (f"the bundles together ({', '.join(f'{k} {v:g}' for k, v in total.items() if v)}) do not fit "
                    "in what is free (other placement groups or actors hold the rest)")
        return (f"Ray could not place the cluster within {self.start_timeout:.0f}s: {what}; the nodes have: {have}. "
                "Lower --ray-*-cpus / --ray-worker-gpus, or add nodes")

    def _actor(self, ray, handle: ClusterHandle, pg, bundle: int, role: str, index: int, argv: list[str],
               detached: bool | None = None):
        """Create the actor of ``role``-``index`` in bundle ``bundle`` of ``pg`` (None: no
        placement group, e.g. a worker added by ``psctl scale``, which Ray's autoscaler
        may add a node for)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = handle.spec
        bundles = self.bundles(spec)
        res = bundles[min(bundle, len(bundles) - 1)][1]
        if self._loopback(handle):  # this machine only: split its cores as the local launcher does
            env = thread_env(role, spec.workers)
        else:  # a node of a cluster: a worker's threads are the CPUs Ray gave it
            env = thread_env(role, 1, cores=max(1, int(res.get("CPU", 1))))
        env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
        env.update(handle.service_env(role))  # the cluster's tokens reach the actor only
        if env.pop("PSTRAIN_TLS_DIR", ""):  # the files themselves: the actor's node may not see psctl's
            env.update(tls_pem_env(spec.tls_dir, role))
        name = actor_name(handle.backend["cluster"], role, index)
        log_path = os.path.join(spec.log_dir, f"{role}-{index}.log")
        detached = self.detached if detached is None else detached
        cls = _remote_host(ray).options(
            name=name, namespace=handle.backend.get("namespace", self.namespace),
            lifetime="detached" if detached else None, max_restarts=self.max_restarts,
            num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0),
            scheduling_strategy=None if pg is None else PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
            runtime_env={"env_vars": env})
        actor = self._handles[name] = cls.remote(handle.backend["cluster"], role, index, argv, log_path,
                                                 self._loopback(handle))
        pids, logs = handle.pids.setdefault(role, []), handle.logs.setdefault(role, [])
        if index == len(pids):
            pids.append(0)
            logs.append(log_path)
        return actor

    def _worker_argv(self, handle: ClusterHandle, index: int) -> list[str]:
        return ["--master", handle.master_address, "--name", f"worker-{index}", "--device", handle.spec.device,
                "--metrics-port", "0"]

    # -- elasticity (psctl scale) -----------------------------------------------------------------------------
    elastic = True

    def resize_workers(self, handle: ClusterHandle, workers: int, busy: set[str] | None = None) -> list[str]:
        """Grow the cluster to ``workers`` worker actors (new ones outside the placement
        group, detached, so they outlive ``psctl scale``; Ray's autoscaler may add nodes
        for them); with ``busy`` (node ids serving a job), also shrink it to ``workers``,
        stopping idle workers (highest index first), never one in ``busy`` and never the
        last one; a later grow reuses the indices (and bundles) stopped. Returns what it did."""
        b = handle.backend
        options = b.get("options", {})  # as the cluster was started (this launcher may be another psctl's)
        self.cpus = {**self.cpus, **options.get("cpus", {})}
        self.worker_gpus = options.get("worker_gpus", self.worker_gpus)
        self.max_restarts = options.get("max_restarts", self.max_restarts)
        ray = connect_to(handle)
        removed = set(b.setdefault("removed_workers", []))  # indices psctl scale stopped
        live = [i for i in range(len(handle.pids.get("worker", []))) if i not in removed]
        lines = []
        if workers > len(live):
            deadline = time.monotonic() + self.start_timeout
            pg, first = self._group(handle), 1 + handle.spec.ps  # a worker of the original size gets its bundle back
            free = sorted(removed) + list(range(len(handle.pids.get("worker", [])), workers + len(removed)))
            added = []
            for i in free[:workers - len(live)]:
                removed.discard(i)
                added.append((i, self._actor(ray, handle, pg if i < handle.spec.workers else None,
                                             first + min(i, handle.spec.workers - 1), "worker", i,
                                             self._worker_argv(handle, i), detached=True)))
            b["removed_workers"] = sorted(removed)
            for i, actor in added:
                info = self._info(ray, handle, actor, deadline, f"worker-{i}")
                lines.append(f"started worker-{i} (a Ray actor, pid {info['pid']} on {info['node_ip']})")
            write_handle(handle)
            nodes = self.wait_registered(handle, dataclasses.replace(handle.spec, workers=workers), deadline,
                                         self.start_timeout, self.poll)
            write_scrape_targets(handle, nodes)
        elif busy is not None and workers < len(live):
            stopped: set[str] = set()
            for i in reversed(live):
                if len(live) - len(stopped) <= max(workers, 1):
                    break
                actor = self._handles.get(actor_name(b["cluster"], "worker", i))
                if actor is None:
                    with contextlib.suppress(ValueError):
                        actor = ray.get_actor(actor_name(b["cluster"], "worker", i), namespace=b.get("namespace"))
                info = None
                if actor is not None:
                    with contextlib.suppress(Exception):
                        info = ray.get(actor.info.remote(), timeout=5.0)
                if info is not None and info["address"] in busy:
                    continue  # serving a job
                if actor is not None:
                    with contextlib.suppress(Exception):
                        ray.get(actor.stop.remote(), timeout=30.0)
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                self._handles.pop(actor_name(b["cluster"], "worker", i), None)
                removed.add(i)
                stopped.add(info["address"] if info is not None else f"worker-{i}")
                lines.append(f"stopped worker-{i} (idle)")
            b["removed_workers"] = sorted(removed)
            write_handle(handle)
            if stopped:  # the master lists them alive until their heartbeats time out
                write_scrape_targets(handle, [n for n in self._master_nodes(handle) if n["node_id"] not in stopped])
        return lines

    def _master_nodes(self, handle: ClusterHandle) -> list[dict]:
        from pstrain.transport.master_client import MasterClient

        client = MasterClient(handle.master_address, timeout=5.0, connect_timeout=5.0,
                              credentials=handle.user_credentials())
        try:
            return client.nodes()
        finally:
            client.close()

    def _group(self, handle: ClusterHandle):
        """The cluster's placement group, or None (gone, or never made)."""
        from ray.util.placement_group import get_placement_group

        try:
            return get_placement_group(handle.backend["placement_group"])
        except (KeyError, ValueError):
            return None

    def _loopback(self, handle: ClusterHandle) -> bool:
        # A private head is this machine alone: serve on loopback, as the local launcher
        # does. On a cluster the services bind the node's address, for the other nodes.
        return bool(handle.backend.get("head_pid"))

    def _info(self, ray, handle: ClusterHandle, actor, deadline: float, label: str) -> dict:
        try:
            info = ray.get(actor.info.remote(), timeout=max(0.5, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - Ray wraps the constructor's error; say which actor and why
            raise ClusterError(f"the cluster did not start: {label} failed: {_ray_error(exc)}") from None
        handle.pids[info["role"]][info["index"]] = info["pid"]
        return info

    # -- stop / status ------------------------------------------------------------------------------------------
    def _actors(self, ray, handle: ClusterHandle):
        """(role, index, actor or None) of every process in the handle (not the workers
        ``psctl scale`` stopped)."""
        removed = set(handle.backend.get("removed_workers", []))
        for role in ("master", "ps", "worker"):
            for i in range(len(handle.pids.get(role, []))):
                if role == "worker" and i in removed:
                    continue
                try:
                    actor = ray.get_actor(actor_name(handle.backend["cluster"], role, i),
                                          namespace=handle.backend.get("namespace", DEFAULT_NAMESPACE))
                except ValueError:
                    actor = None
                yield role, i, actor

    def stop(self, handle: ClusterHandle, timeout: float = 10.0) -> None:
        """Stop each role in turn (workers, shards, master) through the actors, then kill
        them (no restarts), remove the placement group and the pinned ports, and stop a
        private head."""
        b = handle.backend
        stuck = []
        if b.get("ray_address"):
            try:
                ray = connect_to(handle)
            except ClusterError as exc:
                if not b.get("head_pid"):
                    raise
                log.warning("%s; stopping its head", exc)
                ray = None
            if ray is not None:
                actors = list(self._actors(ray, handle))
                for role in STOP_ORDER:
                    mine = [(i, a) for r, i, a in actors if r == role and a is not None]
                    refs = {a.stop.remote(): i for i, a in mine}
                    _, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
                    stuck += [f"{role}-{refs[r]}" for r in late]
                    for i, a in mine:
                        with contextlib.suppress(Exception):
                            ray.kill(a, no_restart=True)
                        self._handles.pop(actor_name(b["cluster"], role, i), None)
                self._forget(ray, handle)
                ray.shutdown()
        if b.get("head_pid"):
            stop_head(int(b["head_pid"]))
            shutil.rmtree(b.get("head_temp_dir") or "/nonexistent", ignore_errors=True)
            if b.get("ray_auth_token_path"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(b["ray_auth_token_path"])
        remove_shared_memory(handle.pids.get("worker", []))
        remove_handle(handle)
        if stuck:
            log.warning("did not stop within %.0fs (killed): %s", timeout, ", ".join(stuck))

    def _forget(self, ray, handle: ClusterHandle) -> None:
        from ray.experimental import internal_kv
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            internal_kv._internal_kv_del(f"pstrain/{handle.backend['cluster']}/".encode(), del_by_prefix=True,
                                         namespace=KV_NAMESPACE)
        pg = self._group(handle)
        if pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)

    def status(self, handle: ClusterHandle) -> list[ProcessStatus]:
        """Each actor: alive unless Ray has it dead (gone, or out of restarts); one Ray is
        restarting counts as alive, as the cluster will have it back."""
        b = handle.backend
        dead = [ProcessStatus(r, i, pid, False, log_path) for r, i, pid, log_path in handle.processes()]
        if b.get("head_pid") and not pid_alive(int(b["head_pid"])):
            return dead
        try:
            ray = connect_to(handle)
        except (ClusterError, KeyError):
            return dead
        from ray.exceptions import ActorDiedError

        before = {(p.role, p.index): p for p in dead}
        out = []
        for role, i, actor in self._actors(ray, handle):
            alive, pid = actor is not None, before[(role, i)].pid
            if alive:
                try:
                    pid = ray.get(actor.info.remote(), timeout=2.0)["pid"]
                except ActorDiedError:
                    alive = False
                except Exception:  # noqa: BLE001 - restarting, or busy: Ray still holds it
                    pass
            out.append(ProcessStatus(role, i, pid, alive, before[(role, i)].log))
        return out

    def describe(self, handle: ClusterHandle) -> list[dict]:
        """Every live actor's :meth:`ServiceHost.info` (node, pid, addresses, CUDA devices)."""
        ray = connect_to(handle)
        out = []
        for _, _, actor in self._actors(ray, handle):
            if actor is not None:
                with contextlib.suppress(Exception):
                    out.append(ray.get(actor.info.remote(), timeout=5.0))
        return out


def _ray_error(exc: BaseException) -> str:
    """The first line that says what went wrong in a Ray error (its cause, if it has one)."""
    text = str(getattr(exc, "cause", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower() or "Error" in line]
    return (errors[-1] if errors else (lines[-1] if lines else type(exc).__name__))[:2000]
