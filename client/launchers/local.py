"""The ``local`` launcher: the master, S parameter-server shards and N workers as
processes of this machine (the default of ``psctl up`` and ``psctl train``).

Usage::

    from client.launchers import ClusterSpec, LocalProcessLauncher, load_handle

    launcher = LocalProcessLauncher()
    handle = launcher.start(ClusterSpec())          # writes <state_dir>/cluster.json
    ...
    launcher.stop(load_handle(ClusterSpec().state_dir))   # ``psctl down``

Each service gets its own session (process group), so a Ctrl-C in the terminal reaches
only psctl, which then stops the cluster in order: workers, shards, master.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import time

from client.launchers.base import (
    STOP_ORDER,
    ClusterError,
    ClusterHandle,
    ClusterSpec,
    Launcher,
    ProcessStatus,
    describe_exit,
    indented_tail,
    make_private_dirs,
    open_log,
    remove_handle,
    tail,
    write_handle,
    write_scrape_targets,
)

log = logging.getLogger(__name__)

READY_PREFIX = "PSTRAIN_READY"
_READY = re.compile(r"^PSTRAIN_READY\s+(master|ps|worker)\b[ \t]*(\S*)[ \t]*$", re.MULTILINE)
_METRICS = re.compile(r"^PSTRAIN_METRICS[ \t]+(master|ps|worker)[ \t]+(\S+)[ \t]*$", re.MULTILINE)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository root


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
    module = {"master": b"master", "ps": b"psserver", "worker": b"worker", "supervisor": b"client.launchers.supervisor"}[role]
    return any(a == b"-m" and b == module for a, b in zip(argv, argv[1:]))



def process_env() -> dict[str, str]:
    """The environment of a process the launcher starts: this one's, unbuffered output, and
    this checkout on PYTHONPATH (the services import its packages even when pstrain is
    not installed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


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

    name = "local"

    def __init__(self, start_timeout: float = 120.0, poll: float = 0.2, python: str | None = None):
        self.start_timeout = start_timeout
        self.poll = poll
        self.python = python or sys.executable
        self._children: dict[int, subprocess.Popen] = {}

    # -- start ------------------------------------------------------------------------------------------
    def start(self, spec: ClusterSpec) -> ClusterHandle:
        self.claim_state_dir(spec)
        make_private_dirs(spec)
        os.makedirs(spec.checkpoint_dir, exist_ok=True)
        address = f"{spec.host}:{spec.port}"
        handle = ClusterHandle(master_address=address, state_dir=spec.state_dir, spec=spec, launcher=self.name)
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
                # A stable name: the master tells a restarted worker from a new one by it.
                self._spawn(handle, "worker", i, ["-m", "worker", "--master", handle.master_address, "--name",
                                                  f"worker-{i}", "--device", spec.device, "--host", spec.host,
                                                  "--metrics-port", "0"])
            write_handle(handle)
            nodes = self.wait_registered(handle, spec, deadline, self.start_timeout, self.poll)
            self._pin_ports(handle)
            write_scrape_targets(handle, nodes)
            write_handle(handle)
        except BaseException:
            # Whatever went wrong (a dead service, a timeout, Ctrl-C), leave nothing running.
            self.stop(handle, timeout=5.0)
            raise
        log.info("cluster up: master at %s, %d ps, %d workers", handle.master_address, spec.ps, spec.workers)
        return handle

    def _spawn(self, handle: ClusterHandle, role: str, index: int, args: list[str]) -> None:
        log_path = os.path.join(handle.state_dir, "logs", f"{role}-{index}.log")
        env = process_env()
        env.update(thread_env(role, handle.spec.workers))
        env.update(handle.service_env(role))
        with open_log(log_path) as out:
            proc = subprocess.Popen(
                [self.python, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self._children[proc.pid] = proc
        pids, logs, argvs = (handle.pids.setdefault(role, []), handle.logs.setdefault(role, []),
                             handle.args.setdefault(role, []))
        if index < len(pids):  # a restart: the same slot
            pids[index], logs[index], argvs[index] = proc.pid, log_path, list(args)
        else:
            pids.append(proc.pid)
            logs.append(log_path)
            argvs.append(list(args))
        log.debug("started %s-%d (pid %d): %s", role, index, proc.pid, " ".join(args))

    def _pin_ports(self, handle: ClusterHandle) -> None:
        """Record the ports processes started on port 0 got, so a restart binds the same
        one: the master's address is in every node's config, a shard's in its jobs' plans."""
        for role, i, _, log_path in handle.processes():
            args = handle.args[role][i]
            if role == "worker" or "--port" not in args or args[args.index("--port") + 1] != "0":
                continue
            address = parse_ready_line(tail(log_path, 200), role)
            if address:
                args[args.index("--port") + 1] = address.rsplit(":", 1)[1]

    restartable = True

    def restart(self, handle: ClusterHandle, role: str, index: int) -> int:
        """Start ``role``-``index`` again with the arguments it was started with (on the
        same port, see ``_pin_ports``); returns its new pid."""
        argvs = handle.args.get(role, [])
        if index >= len(argvs):
            raise ClusterError(f"no record of how {role}-{index} was started (a state file from an older psctl)")
        args = list(argvs[index])
        if self._wait_gone([handle.pids[role][index]], 5.0):  # a killed process can take a moment to go
            raise ClusterError(f"{role}-{index} (pid {handle.pids[role][index]}) is still running")
        self._spawn(handle, role, index, args)
        counts = handle.restarts.setdefault(role, [])
        counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
        write_handle(handle)
        log.warning("restarted %s-%d as pid %d (restart %d)", role, index, handle.pids[role][index], counts[index])
        return handle.pids[role][index]

    def check_alive(self, handle: ClusterHandle) -> None:
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
            self.check_alive(handle)
            if time.monotonic() > deadline:
                text = indented_tail(log_path)
                raise ClusterError(
                    f"the master did not print '{READY_PREFIX} master HOST:PORT' within "
                    f"{self.start_timeout:.0f}s; last lines of {log_path}:\n{text}"
                )
            time.sleep(self.poll)

    # -- stop / status ------------------------------------------------------------------------------------------
    def stop(self, handle: ClusterHandle, timeout: float = 10.0) -> None:
        """SIGTERM each role in turn (workers, shards, master), waiting up to ``timeout``
        seconds per role before SIGKILL; then delete the state file. A detached cluster's
        supervisor goes first, so that it restarts nothing being stopped."""
        stuck = []
        sup = handle.supervisor_pid
        if sup and self._alive(sup) and _is_pstrain_process(sup, "supervisor"):
            _signal_group(sup, signal.SIGTERM)
            for pid in self._wait_gone([sup], timeout):
                _signal_group(pid, signal.SIGKILL)
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
        remove_shared_memory(handle.pids.get("worker", []))
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


def remove_shared_memory(worker_pids, directory: str = "/dev/shm") -> list[str]:
    """Remove the shared-memory segments the cluster's workers made (``pstrain-...-<pid>``):
    a worker removes its own when it ends, but not when it was killed, and a shard only
    those of the jobs it ended. Returns the names removed."""
    removed = []
    for pid in worker_pids:
        for path in glob.glob(os.path.join(directory, f"pstrain-*-{int(pid)}")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(os.path.basename(path))
    return removed


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
