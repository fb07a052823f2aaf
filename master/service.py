"""The master gRPC service: job submission and tracking, node registry, scheduling,
and the failure detector.

The servicer stays thin: planning is ``master.planner``, the job lifecycle and its
durable record are ``master.jobs``, and node/job bookkeeping lives in
``Coordinator`` below, which the servicer methods call.

Usage (normally through ``python -m master``)::

    server, port, coordinator = serve(MasterConfig(port=0, db=":memory:"))
    coordinator.metrics.serve("127.0.0.1", 0)   # /metrics (python -m master does this)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np

from master import limits
from master.config import MasterConfig
from master.jobs import InvalidTransition, JobFinished, JobRecord, JobState, JobStore
from master.metrics import MasterMetrics
from master.planner import JobPlan, plan_job
from protos import codec, jobcodec, master_pb2, master_pb2_grpc
from pstrain.runtime.modelfile import read_model, write_model
from pstrain.runtime.modes import Mode
from pstrain.runtime.placement import assemble
from pstrain.runtime.spec import FinishedJob, HeartbeatReply, JobSpec, Progress, SliceSpec, SlotRef, TaskSpec
from pstrain.transport import rpc
from pstrain.transport.ps_client import ParameterServerClient
from pstrain.transport.security import (
    Authenticator,
    Credentials,
    UserTokens,
    admin_token_from_env,
    current_caller,
    methods_of,
    service_credentials,
)

log = logging.getLogger(__name__)

rpc.register_error(InvalidTransition, grpc.StatusCode.FAILED_PRECONDITION)


class NotReady(RuntimeError):
    """The request is valid but cannot be served in the job's current state."""


rpc.register_error(NotReady, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass
class NodeInfo:
    node_id: str
    role: str
    address: str
    name: str
    index: int
    metrics_address: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    alive: bool = True
    job: str | None = None  # a worker's current job (it may run several of its slots)
    tasks: list[TaskSpec] = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    finished: list[FinishedJob] = field(default_factory=list)
    release: list[SlotRef] = field(default_factory=list)  # slots to stop after their current step
    restarts: int = 0  # earlier records of this node (same worker name or shard address)


@dataclass
class Recovery:
    """A job that was RUNNING when the master stopped, waiting for its nodes to register
    again: its shards by address (they keep the job's parameters) and its workers, which
    re-register saying which worker slots (job, index, owner epoch) they still run."""

    spec: JobSpec
    shards: list[str]  # by shard index
    workers: dict[int, dict]  # the stored worker table: index -> node, state, step, ...
    deadline: float  # time.monotonic() after which it resumes with what came back, or fails
    back: dict[int, str] = field(default_factory=dict)  # worker index -> its new node id
    epochs: dict[int, int] = field(default_factory=dict)  # worker index -> owner epoch of the process back
    incarnation: str = ""


@dataclass
class JobRuntime:
    """A running job. Its worker slots are fixed (slot k trains part k of every global
    batch); which process runs each one changes: ``workers`` maps a slot to its node,
    ``owners`` to its ownership epoch (bumped at every hand-over, fencing off the old
    process), ``orphans`` holds lost slots waiting for a process, ``moving`` slots
    asked back from their process to go to another (scaling, a new process joining)."""

    id: str
    spec: JobSpec
    plan: JobPlan
    workers: dict[int, str]  # worker slot -> node id
    shards: list[str]  # shard index -> address
    processes: int = 0  # how many worker processes should serve the job (psctl scale)
    owners: dict[int, int] = field(default_factory=dict)  # worker slot -> ownership epoch
    orphans: dict[int, float] = field(default_factory=dict)  # lost slot -> deadline to find it a process
    moving: dict[int, tuple[str, float]] = field(default_factory=dict)  # slot -> (target node, release deadline)
    handing: dict[int, str] = field(default_factory=dict)  # slot -> target node, while handed over (one at a time)
    done: set[int] = field(default_factory=set)
    steps: dict[int, int] = field(default_factory=dict)
    evaluator: int | None = None
    told_finished: set[str] = field(default_factory=set)  # nodes told which slot evaluates
    fenced: set[tuple[int, int]] = field(default_factory=set)  # (slot, epoch) of fenced-off processes that reported
    incarnation: str = ""  # this run of the job: the shards' checkpoints carry it
    lost_shards: dict[int, float] = field(default_factory=dict)  # shard -> deadline to be back by

    @property
    def slots(self) -> list[int]:
        return sorted(self.workers)

    @property
    def placed(self) -> int:
        """Slots that have a process now (the live-workers gauge)."""
        return len(self.workers) - len(self.orphans)

    def reserves(self, node_id: str) -> bool:
        """Whether ``node_id`` runs a slot of this job or is the target of a move or hand-over."""
        return (node_id in self.workers.values() or node_id in self.handing.values()
                or any(t == node_id for t, _ in self.moving.values()))

    def slots_of(self, node_id: str) -> list[int]:
        return sorted(k for k, nid in self.workers.items() if nid == node_id and k not in self.orphans)


class Coordinator:
    """Nodes, running jobs and their transitions. Thread-safe (one lock)."""

    def __init__(self, config: MasterConfig, metrics: MasterMetrics | None = None,
                 credentials: Credentials | None = None):
        self.config = config
        self.credentials = credentials  # what the master presents to its shards (None: the process's)
        self.metrics = metrics or MasterMetrics()
        self.store = JobStore(config.db)
        self.nodes: dict[str, NodeInfo] = {}
        self.runtimes: dict[str, JobRuntime] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._ps_clients: dict[str, object] = {}
        self._starting: set[str] = set()
        self._waiting: dict[str, tuple[float, str]] = {}  # PENDING job -> (since, what it waits for), monitor thread only
        self._next_index: dict[str, int] = {}  # role -> index of the next node to register
        self._stalled = threading.Event()  # set by the ticker when this process did not run for a while
        self._last_tick = time.monotonic()
        self._stall = max(1.0, config.heartbeat_timeout / 2)  # a gap this long means this process stalled
        self._stop = threading.Event()
        # Finished jobs' weights: the master serves them only to their submitter or an admin
        # (ExportModel), so the files are its own (0600, in a directory created 0700). Without
        # a database file they go to a private temporary directory, removed on close.
        self._temp_exports = self.config.db == ":memory:" and not self.config.export_dir
        self.export_dir = (tempfile.mkdtemp(prefix="pstrain-exports-") if self._temp_exports
                           else self.config.export_dir or os.path.join(os.path.dirname(os.path.abspath(self.config.db)),
                                                                       "exports"))
        os.makedirs(self.export_dir, mode=0o700, exist_ok=True)
        self.recovering: dict[str, Recovery] = {}
        self._recover_after_restart()
        # Every job's state, kept beside the store so a scrape never reads the whole table.
        self._job_states: dict[str, JobState] = {rec.id: rec.state for rec in self.store.list()}
        self.metrics.watch(self._count_jobs, self._count_live_nodes)
        self._monitor = threading.Thread(target=self._monitor_loop, name="master-monitor", daemon=True)
        self._monitor.start()
        threading.Thread(target=self._tick_loop, name="master-ticker", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._monitor.join(timeout=2)
        for c in self._ps_clients.values():
            c.close()
        self.store.close()
        if self._temp_exports:
            shutil.rmtree(self.export_dir, ignore_errors=True)

    # ---- nodes ------------------------------------------------------------------------
    def register(self, role: str, address: str, name: str, metrics_address: str,
                 running: tuple[SlotRef, ...] = ()) -> NodeInfo:
        """Add a node. ``running``: the worker slots a worker registering again still runs
        (after a master restart, or after it was declared lost while paused); it is
        re-attached to each slot it still owns (same ownership epoch, no other process
        took it over meanwhile)."""
        if role not in ("worker", "ps"):
            raise ValueError(f"role must be 'worker' or 'ps', got {role!r}")
        if role == "ps" and not address:
            raise ValueError("a parameter server must register the address it serves on")
        with self.lock:
            # The same node again (a shard from its address, a worker by its name): restarted by
            # its supervisor, or back after it was declared lost. Counted; a shard's old record
            # still alive is that same server's (one process per address): retired rather than
            # counted twice. A live worker of the same name is another process (names are the
            # user's): left alone.
            same = [n for n in self.nodes.values() if n.role == role
                    and ((role == "ps" and n.address == address)
                         or (role == "worker" and name and n.name == name and not n.alive))]
            restarts = max((n.restarts + 1 for n in same), default=0)
            for old in same:
                if old.alive:
                    old.alive = False
                    log.warning("%s %s registered again (%s); retiring the old record", role, old.node_id,
                                address or name)
                    if role == "ps":
                        self._shard_lost(address, "restarted")
            if same:
                self.metrics.restarted(role)
            index = self._next_index.get(role, 0)  # never reused, even once dead records are pruned
            self._next_index[role] = index + 1
            node = NodeInfo(f"{role}-{uuid.uuid4().hex[:8]}", role, address, name, index, metrics_address,
                            restarts=restarts)
            self.nodes[node.node_id] = node
            log.info("registered %s %s (%s) as index %d", role, node.node_id, address or name, index)
            back = []
            for slot in running if role == "worker" else ():
                rec, rt = self.recovering.get(slot.job), self.runtimes.get(slot.job)
                if rec is not None and slot.worker in rec.workers:
                    # The newest owner wins: the stored epoch, or one handed over just before the
                    # old master stopped (not recorded yet); an older process is left fenced off.
                    stored = int(rec.workers[slot.worker].get("owner_epoch", 0))
                    if slot.owner_epoch >= max(stored, rec.epochs.get(slot.worker, -1)):
                        rec.back[slot.worker] = node.node_id
                        rec.epochs[slot.worker] = slot.owner_epoch
                        node.job = slot.job
                        log.info("job %s: worker %d is back as %s", slot.job, slot.worker, node.node_id)
                elif (rt is not None and slot.worker in rt.orphans
                      and rt.owners.get(slot.worker, 0) == slot.owner_epoch and node.job in (None, slot.job)):
                    # Declared lost (paused past the heartbeat timeout), but no process took the
                    # slot over yet: it carries on where it is.
                    rt.orphans.pop(slot.worker)
                    rt.workers[slot.worker] = node.node_id
                    node.job = slot.job
                    back.append((rt, slot.worker))
            self.changed.notify_all()
        for rt, k in back:
            self.store.update_worker(rt.id, k, node=node.node_id, state="running",
                                     note=f"came back as {node.name or node.node_id} before another process took it over")
            self.store.add_event(rt.id, f"worker {k} came back ({node.name or node.node_id}) before its slot moved; "
                                        "it carries on")
            self.metrics.live(rt.id, rt.placed)
        return node

    def heartbeat(self, node_id: str) -> HeartbeatReply:
        with self.lock:
            node = self.nodes.get(node_id)
            if node is None or not node.alive:
                return HeartbeatReply(known=False)
            node.last_seen = time.monotonic()
            reply = HeartbeatReply(True, tuple(node.tasks), tuple(node.cancelled), tuple(node.finished),
                                   tuple(node.release))
            node.tasks, node.cancelled, node.finished, node.release = [], [], [], []
            return reply

    def list_nodes(self) -> list[NodeInfo]:
        with self.lock:
            return list(self.nodes.values())

    def _count_live_nodes(self, role: str) -> int:
        with self.lock:
            return sum(1 for n in self.nodes.values() if n.role == role and n.alive)

    def _ps(self, address: str) -> ParameterServerClient:
        client = self._ps_clients.get(address)
        if client is None:
            client = self._ps_clients[address] = ParameterServerClient(address, timeout=60, credentials=self.credentials)
        return client

    # ---- jobs ---------------------------------------------------------------------------
    def plan(self, spec: JobSpec) -> JobPlan:
        return self._plan(limits.check_job(spec, self.config))

    def _plan(self, spec: JobSpec) -> JobPlan:
        with self.lock:
            alive_ps = sum(1 for n in self.nodes.values() if n.role == "ps" and n.alive)
        return plan_job(spec, spec.train.num_shards or max(alive_ps, 1))

    def submit(self, spec: JobSpec, owner: str = "") -> JobRecord:
        spec = limits.check_job(spec, self.config)  # before any work: over a limit is INVALID_ARGUMENT
        plan = self._plan(spec)  # validate before recording anything: bad specs fail INVALID_ARGUMENT
        rec = self.store.create(spec.name or "job", jobcodec.job_spec_to_bytes(spec), {}, owner=owner)
        with self.lock:
            self._job_states[rec.id] = rec.state
        self.store.add_event(rec.id, "submitted")
        self._try_start(rec.id, spec, plan)
        return self.store.get(rec.id)

    def _try_start(self, job_id: str, spec: JobSpec, plan: JobPlan | None = None) -> bool:
        """Start a PENDING job if enough nodes are free; ``plan`` is reused when it was
        made for the number of shards the job gets."""
        with self.lock:
            # SubmitJob and the scheduler may both try: only one starts the job.
            if job_id in self.runtimes or job_id in self._starting:
                return True
            if self.store.get(job_id).state != JobState.PENDING:
                return True
            shards = sorted((n for n in self.nodes.values() if n.role == "ps" and n.alive), key=lambda n: n.index)
            idle = sorted(
                (n for n in self.nodes.values() if n.role == "worker" and n.alive and n.job is None), key=lambda n: n.index
            )
            want_shards = spec.train.num_shards or len(shards)
            want_workers = spec.train.num_workers or len(idle)
            if want_shards < 1 or want_workers < 1 or len(shards) < want_shards or len(idle) < want_workers:
                return False
            shards, workers = shards[:want_shards], idle[:want_workers]
            for w in workers:
                w.job = job_id  # reserve
            self._starting.add(job_id)
        try:
            if plan is None or plan.placement.num_shards != want_shards:
                plan = None
            return self._start(job_id, spec, shards, workers, want_shards, want_workers, plan)
        finally:
            with self.lock:
                self._starting.discard(job_id)

    def _start(self, job_id, spec, shards, workers, want_shards, want_workers, plan=None) -> bool:
        node = None
        try:
            plan = plan or plan_job(spec, want_shards)
            indices = list(range(want_workers))
            incarnation = uuid.uuid4().hex
            for s, node in enumerate(shards):
                self._init_shard(job_id, spec, plan, s, node.address, indices, incarnation)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or node is None:
                return self._start_failed(job_id, shards, workers, exc)
            # A shard that died before its heartbeats stopped (or is restarting): the job
            # waits for live shards instead of failing.
            with self.lock:
                node.alive = False
                for w in workers:
                    w.job = None
            self._end_on_shards_addresses(job_id, [n.address for n in shards if n is not node])
            log.warning("job %s: shard at %s is unreachable (%s); the job waits for live shards", job_id,
                        node.address, rpc.describe(exc))
            self.store.add_event(job_id, f"the shard at {node.address} was unreachable ({rpc.one_line(exc)}); "
                                         "waiting for live shards")
            return False
        except Exception as exc:  # noqa: BLE001 - recorded on the job
            return self._start_failed(job_id, shards, workers, exc)
        return self._started(job_id, spec, plan, shards, workers, indices, incarnation)

    def _start_failed(self, job_id, shards, workers, exc: BaseException) -> bool:
        with self.lock:
            for w in workers:
                w.job = None
        log.error("job %s failed to start: %s", job_id, rpc.one_line(exc))
        self._transition(job_id, JobState.FAILED, error=f"could not start the job: {rpc.one_line(exc)}")
        self._end_on_shards_addresses(job_id, [n.address for n in shards])
        return True

    def _started(self, job_id, spec, plan, shards, workers, indices, incarnation) -> bool:
        rt = JobRuntime(job_id, spec, plan, {i: w.node_id for i, w in zip(indices, workers)},
                        [n.address for n in shards], processes=len(workers), incarnation=incarnation)
        with self.lock:
            self.runtimes[job_id] = rt
            for i, w in zip(indices, workers):
                w.tasks.append(self._task(rt, i))
                self.store.update_worker(job_id, i, node=w.node_id, state="running", step=0, step_time=0.0,
                                         owner_epoch=0)
            # Where it runs, so that a restarted master finds the job's shards again.
            self.store.set_plan(job_id, {"shards": rt.shards, "workers": indices, "incarnation": incarnation})
            self._transition(job_id, JobState.RUNNING)
            self.metrics.live(job_id, len(workers))
            self.metrics.slots(job_id, indices)
            self.store.add_event(
                job_id, f"running on {len(workers)} workers and {len(shards)} shards "
                f"(shard bytes {list(plan.placement.shard_bytes)})"
            )
            self.changed.notify_all()
        return True

    def _task(self, rt: JobRuntime, index: int, start_step: int = 0) -> TaskSpec:
        train = rt.plan.train
        return TaskSpec(
            job=rt.id, worker_index=index, workers=tuple(rt.workers), graph=train.graph, features=train.features,
            labels=train.labels, loss=train.loss, prediction=train.prediction, grads=train.grads,
            state_variables=train.state_variables,
            slices=tuple(SliceSpec(s.variable, s.key, s.shard, s.start, s.stop) for s in rt.plan.placement.slices),
            shard_addresses=tuple(rt.shards), train=rt.spec.train, dataset=rt.spec.dataset,
            owner_epoch=rt.owners.get(index, 0), start_step=start_step,
        )

    def progress(self, r: Progress) -> bool:
        """Record a worker's report; returns True if the worker is to stop: the job was
        cancelled, or another process took its slot over (it is fenced off)."""
        rec = self.store.get(r.job)
        if rec.state == JobState.CANCELLED:
            return True
        if rec.state.terminal:
            return False
        if self._fenced(r):
            return True
        metrics = dict(r.metrics)
        if r.error:
            self._fail(r.job, f"worker {r.worker} failed: {r.error}")
            return False
        if r.released:
            self._released(r)
            return False
        with self.lock:
            rt = self.runtimes.get(r.job)
            if rt is None:
                if r.done and r.job in self.recovering:  # kept for when the job resumes: this worker is done
                    self.store.update_worker(r.job, r.worker, step=r.step, state="done")
                return False
            rt.steps[r.worker] = max(rt.steps.get(r.worker, 0), r.step)
            step = max(rt.steps.values())
        if r.done or r.final:
            self.store.update_worker(r.job, r.worker, step=r.step, state="done")
        else:
            self.store.update_worker(r.job, r.worker, step=r.step, step_time=r.step_time, state="running")
        if not r.done:  # a done report only marks the end; its loss field is unused
            entry = {"time": time.time(), "worker": r.worker, "step": r.step, "epoch": r.epoch, **metrics}
            if r.final:
                entry["final"] = True
            else:
                entry["loss"] = r.loss
            try:
                self.store.record_progress(
                    r.job, step, max(r.epoch, rec.epoch), rec.loss if r.final else r.loss, metrics, entry
                )
            except JobFinished:  # cancelled or failed meanwhile: a late report
                return rec.state == JobState.CANCELLED
            self.metrics.progress(r.job, r.worker, step, max(r.epoch, rec.epoch), None if r.final else r.loss,
                                  metrics, 0.0 if r.final else r.step_time)
        if r.final:
            self._succeed(r.job)
        elif r.done:
            with self.lock:
                rt.done.add(r.worker)
                # A slot asked to move that finished first stays where it is (its target is freed).
                rt.moving.pop(r.worker, None)
                self._maybe_finished(rt)
        with self.lock:
            self.changed.notify_all()
        return False

    def _fenced(self, r: Progress) -> bool:
        """A report from a process that no longer owns its slot (paused past the heartbeat
        timeout, then resumed, after another process took the slot over): the job went on
        without it, so its reports, and the error its refused pushes cause, must change
        nothing. Recorded once per (slot, epoch)."""
        with self.lock:
            rt = self.runtimes.get(r.job)
            if rt is None or r.worker not in rt.workers or r.owner_epoch >= rt.owners.get(r.worker, 0):
                return False
            first = (r.worker, r.owner_epoch) not in rt.fenced
            rt.fenced.add((r.worker, r.owner_epoch))
        if first:
            what = f"its error ({r.error})" if r.error else f"its report (step {r.step})"
            log.warning("job %s: worker %d (owner epoch %d) was fenced off; %s was ignored and it was told to stop",
                        r.job, r.worker, r.owner_epoch, what)
            self.store.add_event(r.job, f"worker {r.worker}'s previous process (owner epoch {r.owner_epoch}) came "
                                        f"back after its slot moved; {what} was ignored and it was told to stop")
            self.store.update_worker(r.job, r.worker, note=f"a previous process (owner epoch {r.owner_epoch}) came "
                                                          "back and was fenced off")
        return True

    def _maybe_finished(self, rt: JobRuntime) -> None:
        """Caller holds the lock. Every slot is done and has a process: one slot evaluates
        the final model, and every process of the job is told which (again after a slot moved)."""
        if not rt.workers or rt.orphans or rt.moving or not set(rt.workers) <= rt.done:
            return
        if rt.evaluator is None:
            rt.evaluator = min(rt.workers)
            self.store.add_event(rt.id, f"all workers done; worker {rt.evaluator} evaluates the final model")
        for nid in sorted(set(rt.workers.values()) - rt.told_finished):
            node = self.nodes.get(nid)
            if node is not None and node.alive:
                node.finished.append(FinishedJob(rt.id, rt.evaluator))
                rt.told_finished.add(nid)

    def _succeed(self, job_id: str) -> None:
        with self.lock:
            rt = self.runtimes.get(job_id)
        if rt is None:
            return
        try:
            versions = [int(self._ps(a).status(job_id)["version"]) for a in rt.shards]
            config, names, weights = self._pull_weights(rt)
            write_model(self._export_path(job_id), config, weights, mode=0o600)
            self._transition(job_id, JobState.SUCCEEDED)
            # The shards' versions count the updates applied (async: the pushes applied,
            # each once): what an exactly-once check compares with the steps run.
            self.store.add_event(job_id, f"succeeded; final weights saved for export (shard versions {versions})")
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: could not save the final weights", job_id)
            self._fail(job_id, f"could not save the final weights: {exc}")
            return
        self._release(job_id)

    def _fail(self, job_id: str, error: str) -> None:
        try:
            self._transition(job_id, JobState.FAILED, error=error)
        except InvalidTransition:
            return
        self.store.add_event(job_id, f"failed: {error}")
        self._release(job_id, cancel_workers=True)

    def cancel(self, job_id: str) -> JobRecord:
        rec = self._transition(job_id, JobState.CANCELLED)
        self.store.add_event(job_id, "cancelled by the user")
        self._release(job_id, cancel_workers=True)
        return rec

    def _transition(self, job_id: str, state: JobState, error: str | None = None) -> JobRecord:
        rec = self.store.transition(job_id, state, error=error)
        with self.lock:
            self._job_states[job_id] = rec.state
        if rec.state.terminal:
            self.metrics.end_job(job_id)
        return rec

    def _count_jobs(self) -> dict[str, int]:
        with self.lock:
            counts: dict[str, int] = {}
            for state in self._job_states.values():
                counts[state.value] = counts.get(state.value, 0) + 1
            return counts

    def _release(self, job_id: str, cancel_workers: bool = False) -> None:
        with self.lock:
            rt = self.runtimes.pop(job_id, None)
            if rt is None:
                return
            self.metrics.live(job_id, 0)
            for node_id in rt.workers.values():
                node = self.nodes.get(node_id)
                if node is not None and node.job == job_id:
                    node.job = None
                    if cancel_workers:
                        node.cancelled.append(job_id)
            self._free_reservations()  # e.g. the target of a move that will not happen now
            self.changed.notify_all()
        self._end_on_shards_addresses(job_id, rt.shards)

    def _end_on_shards_addresses(self, job_id: str, addresses: list[str]) -> None:
        for address in addresses:
            try:
                self._ps(address).end_job(job_id)
            except grpc.RpcError as exc:
                log.warning("job %s: could not end the job on shard %s: %s", job_id, address, rpc.describe(exc))

    # ---- export ---------------------------------------------------------------------------
    def _export_path(self, job_id: str) -> str:
        return os.path.join(self.export_dir, f"{job_id}.npz")

    def _pull_weights(self, rt: JobRuntime) -> tuple[dict, list[str], list[np.ndarray]]:
        plan = rt.plan
        parts: dict[str, np.ndarray] = {}
        for address in rt.shards:
            _, params = self._ps(address).pull(rt.id, worker=-1, step=0, min_version=0, timeout=30.0)
            parts.update(params)
        weights = []
        names = list(plan.weight_order) or plan.variables()
        for var in names:
            slices = plan.placement.slices_of(var)
            node = plan.graph.nodes[var]
            out = np.empty(node.shape, node.dtype)
            assemble(slices, [parts[s.key] for s in slices], out)
            weights.append(out)
        return dict(rt.spec.model.model_config), names, weights

    def export(self, job_id: str) -> tuple[dict, list[str], list[np.ndarray]]:
        rec = self.store.get(job_id)
        path = self._export_path(job_id)
        if os.path.exists(path):
            config, weights = read_model(path, check_format=False)
            return config, list(jobcodec.job_spec_from_bytes(rec.spec).model.weight_order), weights
        with self.lock:
            rt = self.runtimes.get(job_id)
        if rt is None:
            raise NotReady(f"job {job_id} is {rec.state.value} and has no saved weights to export")
        return self._pull_weights(rt)

    # ---- failure detection and scheduling -----------------------------------------------
    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.monitor_interval):
            try:
                self._check_nodes()
                self._recover_shards()
                self._resume_recovering()
                self._schedule_pending()
                for rt in list(self.runtimes.values()):
                    if rt.orphans:
                        self._place_orphans(rt)
                self._rebalance()
            except Exception:  # noqa: BLE001 - keep the monitor alive
                log.exception("master monitor iteration failed")

    def _tick_loop(self) -> None:
        """Notice when this process did not run (SIGSTOP, swapped out): a thread that only
        looks at the clock sees a gap no busy monitor iteration would cause."""
        while not self._stop.wait(0.1):
            now = time.monotonic()
            if now - self._last_tick > self._stall:
                log.warning("the master did not run for %.1fs", now - self._last_tick)
                self._stalled.set()
            self._last_tick = now

    def _check_nodes(self) -> None:
        now = time.monotonic()
        lost: list[NodeInfo] = []
        with self.lock:
            # Stalled: the ticker saw it, or has not run since (it may wake after this thread).
            if self._stalled.is_set() or now - self._last_tick > self._stall:
                # The nodes' heartbeats could not reach a stalled master, which says nothing
                # about them: count their silence from now on.
                self._stalled.clear()
                log.warning("giving every node a fresh heartbeat timeout after the master's stall")
                for node in self.nodes.values():
                    node.last_seen = max(node.last_seen, now)
                return
            self._prune_dead(now)
            for node in self.nodes.values():
                if node.alive and now - node.last_seen > self.config.heartbeat_timeout:
                    node.alive = False
                    lost.append(node)
        for node in lost:
            log.warning("%s %s lost: no heartbeat for %.1fs", node.role, node.node_id, now - node.last_seen)
            if node.role == "ps":  # every job using it waits for its restart
                with self.lock:
                    self._shard_lost(node.address, f"lost (no heartbeat for {self.config.heartbeat_timeout:.1f}s)")
                continue
            for rt in list(self.runtimes.values()):
                if node.node_id in rt.workers.values():
                    self._lose_worker(rt, node)

    def _prune_dead(self, now: float) -> None:
        """Forget nodes dead for ``dead_node_ttl`` that no job refers to (``ListNodes`` shows
        the rest). Caller holds the lock."""
        held = {nid for rt in self.runtimes.values() for nid in rt.workers.values()}
        held |= {nid for rec in self.recovering.values() for nid in rec.back.values()}
        for nid, node in list(self.nodes.items()):
            if not node.alive and nid not in held and now - node.last_seen > self.config.dead_node_ttl:
                del self.nodes[nid]

    def _lose_worker(self, rt: JobRuntime, node: NodeInfo) -> None:
        """A worker process of the job is lost: each slot it ran waits for another process
        (``_place_orphans``), which computes it from where it stopped; the other slots
        wait for it at their next barrier (sync) or go on (async)."""
        how = f"no heartbeat for {self.config.heartbeat_timeout:.1f}s"
        deadline = time.monotonic() + self.config.recovery_timeout
        with self.lock:
            slots = rt.slots_of(node.node_id)
            for k in slots:
                rt.orphans[k] = deadline
                rt.moving.pop(k, None)
                if rt.evaluator == k:  # the evaluator died: pick again once the slot has a process
                    rt.evaluator = None
            rt.told_finished.discard(node.node_id)
            live = rt.placed
        self.metrics.live(rt.id, live)
        for k in slots:
            step = rt.steps.get(k, 0)
            self.store.add_event(rt.id, f"worker {k} lost at step {step} ({node.name or node.node_id}: {how}); "
                                        "its slot goes to another worker process")
            self.store.update_worker(rt.id, k, state="lost",
                                     note=f"{node.name or node.node_id} lost at step {step} ({how})")
        self._place_orphans(rt)

    def _pick_node(self, rt: JobRuntime, exclude: str = "") -> NodeInfo | None:
        """Where a slot of ``rt`` goes: an idle live worker first, else the job's live
        process with the fewest slots. Caller holds the lock."""
        idle = self._idle_workers(rt)
        if idle:
            return min(idle, key=lambda n: n.index)
        mine = [self.nodes[nid] for nid in set(rt.workers.values()) if nid in self.nodes and nid != exclude]
        mine = [n for n in mine if n.alive and n.job == rt.id and rt.slots_of(n.node_id)]
        return min(mine, key=lambda n: (len(rt.slots_of(n.node_id)), n.index)) if mine else None

    def _idle_workers(self, rt: JobRuntime) -> list[NodeInfo]:
        """Live workers free to take a slot of ``rt``: running no job, or reserved for ``rt``
        without a slot of it yet. Caller holds the lock."""
        return [n for n in self.nodes.values() if n.role == "worker" and n.alive
                and (n.job is None or (n.job == rt.id and n.node_id not in rt.workers.values()))]

    def _place_orphans(self, rt: JobRuntime) -> None:
        """Give every lost slot of ``rt`` to a live worker process; fail the job when a slot
        found none within ``recovery_timeout``."""
        now = time.monotonic()
        with self.lock:
            todo = [(k, d, self._pick_node(rt)) for k, d in sorted(rt.orphans.items())]
        for k, deadline, target in todo:
            if self.runtimes.get(rt.id) is not rt:
                return
            try:
                if target is None:
                    raise RuntimeError("no live worker process to take it over")
                self._hand_over(rt, k, target, f"lost; continues on {target.name or target.node_id}")
            except Exception as exc:  # noqa: BLE001 - tried again until the deadline, then recorded
                if now < deadline:
                    log.info("job %s: worker slot %d not placed yet: %s", rt.id, k, rpc.one_line(exc))
                    continue
                self._fail(rt.id, f"worker {k} was lost and no worker process took it over within "
                                  f"{self.config.recovery_timeout:.0f}s: {rpc.one_line(exc)}")
                return

    def _hand_over(self, rt: JobRuntime, k: int, target: NodeInfo, how: str) -> None:
        """Move slot ``k`` of ``rt`` to ``target``: a new ownership epoch fences the old
        process off at every shard, whose answers say where the slot stands; the new
        process computes it from there. In sync mode, if the old process's last push
        reached only some shards, every shard rolls back to a checkpoint they all hold
        first (the step cannot be computed again once a shard applied it)."""
        with self.lock:
            if k in rt.handing:  # another thread is handing it over already
                return
            rt.handing[k] = target.node_id  # reserved meanwhile (see _free_reservations)
            epoch = rt.owners.get(k, 0) + 1
            rt.owners[k] = epoch
            reserved = target.job is None
            target.job = rt.id
        try:
            fenced = [self._ps(a).fence(rt.id, k, epoch) for a in rt.shards]
            next_steps = sorted({n for _, n in fenced})
            start, text = next_steps[0], ""
            if rt.spec.train.mode is Mode.SYNC and len(next_steps) > 1:
                start = self._roll_back(rt)
                text = (f"; its last push reached only some shards (they hold steps up to {next_steps}), so every "
                        f"shard rolled back to version {start}")
        except Exception:
            with self.lock:
                rt.handing.pop(k, None)
                if reserved and not rt.slots_of(target.node_id):
                    target.job = None
            raise
        with self.lock:
            rt.handing.pop(k, None)
            if self.runtimes.get(rt.id) is not rt:
                return
            old = rt.workers.get(k)
            rt.workers[k] = target.node_id
            rt.orphans.pop(k, None)
            rt.moving.pop(k, None)
            target.tasks.append(self._task(rt, k, start))
            if old != target.node_id:
                rt.told_finished.discard(target.node_id)
            live = rt.placed
            self._maybe_finished(rt)
            self.changed.notify_all()
        self.metrics.live(rt.id, live)
        self.metrics.slot_moved(rt.id, k)
        who = target.name or target.node_id
        self.store.update_worker(rt.id, k, node=target.node_id, state="running", owner_epoch=epoch,
                                 note=f"{how} from step {start} (owner epoch {epoch}){text}")
        self.store.add_event(rt.id, f"worker {k} {how} from step {start}{text}")
        log.warning("job %s: worker slot %d now runs on %s from step %d (owner epoch %d)%s", rt.id, k, who, start,
                    epoch, text)

    def _released(self, r: Progress) -> None:
        """A process stopped slot ``r.worker`` as asked (``_move``): hand it to its target,
        or, when the target is gone, to whichever process ``_place_orphans`` finds."""
        with self.lock:
            rt = self.runtimes.get(r.job)
            if rt is None or r.worker not in rt.workers:
                return
            rt.steps[r.worker] = max(rt.steps.get(r.worker, 0), r.step)
            move = rt.moving.get(r.worker)
            target = self.nodes.get(move[0]) if move is not None else None
            if target is None or not target.alive:
                rt.moving.pop(r.worker, None)
                rt.orphans[r.worker] = time.monotonic() + self.config.recovery_timeout
                target = None
        if target is None:
            self._place_orphans(rt)
            return
        self._hand_over(rt, r.worker, target, f"moved to {target.name or target.node_id}")

    def _move(self, rt: JobRuntime, k: int, target: NodeInfo, why: str) -> None:
        """Ask slot ``k``'s process to stop it after its current step; its report
        (``released``) hands the slot to ``target``. Caller holds the lock."""
        source = self.nodes[rt.workers[k]]
        rt.moving[k] = (target.node_id, time.monotonic() + self.config.recovery_timeout)
        target.job = rt.id
        source.release.append(SlotRef(rt.id, k, rt.owners.get(k, 0)))
        log.info("job %s: moving worker slot %d from %s to %s (%s)", rt.id, k, source.node_id, target.node_id, why)

    def _rebalance(self) -> None:
        """Spread each running job's slots over the number of processes it should have:
        a process that joined (or a scale-up) takes a slot from the busiest; a scale-down
        empties the least busy. One move per job at a time; a move not released in time
        (the process hangs) hands the slot over anyway."""
        now = time.monotonic()
        late = []
        with self.lock:
            self._free_reservations()
            for rt in self.runtimes.values():
                late += [(rt, k, t) for k, (t, deadline) in rt.moving.items() if now > deadline]
                if rt.moving or rt.orphans or rt.lost_shards or set(rt.workers) <= rt.done:
                    continue
                load = {}
                for k in rt.slots:
                    if k not in rt.done:
                        load.setdefault(rt.workers[k], []).append(k)
                want = min(rt.processes or len(rt.workers), len(rt.workers))
                if len(load) < want:
                    idle = self._idle_workers(rt)
                    busiest = max(load.items(), key=lambda kv: (len(kv[1]), kv[0]), default=(None, []))
                    if idle and len(busiest[1]) > 1:
                        target = min(idle, key=lambda n: n.index)
                        self._move(rt, max(busiest[1]), target, f"{len(load)} of {want} worker processes")
                elif len(load) > want:
                    # The least busy gives its slots away; of equals, the one that joined last.
                    quietest = min(load.items(), key=lambda kv: (len(kv[1]), -self.nodes[kv[0]].index))
                    others = [self.nodes[nid] for nid in load if nid != quietest[0]]
                    target = min(others, key=lambda n: (len(load[n.node_id]), n.index))
                    self._move(rt, max(quietest[1]), target, f"{len(load)} worker processes, {want} wanted")
        for rt, k, target_id in late:
            target = self.nodes.get(target_id)
            try:
                if target is None or not target.alive:
                    raise RuntimeError(f"its target process {target_id} is gone")
                self._hand_over(rt, k, target, f"moved to {target.name or target.node_id} (not released in time)")
            except Exception as exc:  # noqa: BLE001 - becomes a lost slot: placed again by the monitor
                log.warning("job %s: moving worker slot %d failed: %s", rt.id, k, rpc.one_line(exc))
                with self.lock:
                    if rt.moving.pop(k, None) is not None:
                        rt.orphans[k] = time.monotonic() + self.config.recovery_timeout

    def _free_reservations(self) -> None:
        """Free workers reserved for a job they no longer serve: a move that fell through,
        or a job that ended. Caller holds the lock."""
        for n in self.nodes.values():
            if n.role != "worker" or not n.job or n.job in self._starting or n.job in self.recovering:
                continue
            rt = self.runtimes.get(n.job)
            if rt is None or not rt.reserves(n.node_id):
                n.job = None

    def scale(self, job_id: str, workers: int) -> JobRecord:
        """Serve running job ``job_id`` with ``workers`` worker processes. Its slots (and so
        its data split and, in sync mode, its results) stay the same; they move between
        processes after their current step."""
        with self.lock:
            rt = self.runtimes.get(job_id)
            if rt is None:
                state = self.store.get(job_id).state.value
                raise NotReady(f"job {job_id} is {state}: only a running job can be scaled")
            slots = len(rt.workers)
            if isinstance(workers, bool) or not 1 <= int(workers) <= slots:
                raise ValueError(f"workers={workers!r}: job {job_id} has {slots} worker slots, so it can use 1 to "
                                 f"{slots} worker processes")
            rt.processes = int(workers)
        self.store.add_event(job_id, f"scaled to {workers} worker processes")
        self._rebalance()
        return self.store.get(job_id)

    # ---- shard restart -----------------------------------------------------------------------
    def _init_shard(self, job_id: str, spec: JobSpec, plan: JobPlan, s: int, address: str, workers: list[int],
                    incarnation: str):
        """InitShard shard ``s`` of a job (the same request at the start and after the
        shard restarted: it then continues from its latest checkpoint)."""
        tensors = plan.shard_tensors(s)
        return self._ps(address).init_shard(
            job_id, s, tensors, plan.trainable_keys() & set(tensors), json.dumps(plan.optimizer),
            spec.train.mode.value, spec.train.staleness, workers, checkpoint_every=self.config.checkpoint_every,
            checkpoint_seconds=self.config.checkpoint_seconds, incarnation=incarnation,
        )

    def _shard_lost(self, address: str, how: str) -> None:
        """A running job's shard at ``address`` died or restarted: its job waits (up to
        ``recovery_timeout``) for it to register again, then ``_recover_shards``. Caller holds the lock."""
        deadline = time.monotonic() + self.config.recovery_timeout
        for rt in self.runtimes.values():
            if address in rt.shards:
                s = rt.shards.index(address)
                if s not in rt.lost_shards:
                    rt.lost_shards[s] = deadline
                    log.warning("job %s: shard %d (%s) %s; waiting for it to come back", rt.id, s, address, how)
                    self.store.add_event(rt.id, f"shard {s} ({address}) {how}; waiting for it to restart")

    def _recover_shards(self) -> None:
        """Bring back each lost shard that registered again: initialise it (it restores its
        latest checkpoint), then, in sync mode, roll every shard of the job back to the
        newest checkpoint version they all hold, so the workers compute the steps since
        again and the job ends as if nothing happened. A shard not back in time fails the job."""
        now = time.monotonic()
        with self.lock:
            live_ps = self._live_ps_addresses()
            todo = [(rt, s, deadline) for rt in self.runtimes.values() for s, deadline in list(rt.lost_shards.items())]
        for rt, s, deadline in todo:
            address = rt.shards[s]
            try:
                if address not in live_ps:
                    raise TimeoutError(f"shard {s} ({address}) did not come back within "
                                       f"{self.config.recovery_timeout:.0f}s")
                resp = self._init_shard(rt.id, rt.spec, rt.plan, s, address, rt.slots, rt.incarnation)
                for k, epoch in sorted(rt.owners.items()):  # fencing since its checkpoint holds again
                    if epoch:
                        self._ps(address).fence(rt.id, k, epoch)
                text = (f"shard {s} restarted from its checkpoint at version {resp.version}" if resp.restored
                        else f"shard {s} restarted with no checkpoint: from the initial values")
                if rt.spec.train.mode is Mode.SYNC:
                    version = self._roll_back(rt)
                    text += f"; every shard rolled back to version {version}, the workers compute again from step {version}"
                with self.lock:
                    rt.lost_shards.pop(s, None)
                self.store.add_event(rt.id, text)
                log.warning("job %s: %s", rt.id, text)
            except Exception as exc:  # noqa: BLE001 - retried until the deadline, then recorded on the job
                if now < deadline:
                    log.info("job %s: shard %d not recovered yet: %s", rt.id, s, rpc.one_line(exc))
                    continue
                with self.lock:
                    rt.lost_shards.pop(s, None)
                self._fail(rt.id, f"parameter-server shard {s} ({address}) lost and not recovered: {rpc.one_line(exc)}")

    def _live_ps_addresses(self) -> set[str]:
        """Where live shards serve. Caller holds the lock."""
        return {n.address for n in self.nodes.values() if n.role == "ps" and n.alive}

    def _roll_back(self, rt: JobRuntime) -> int:
        held = [set(self._ps(a).status(rt.id).get("checkpoint_versions", [])) for a in rt.shards]
        common = set.intersection(*held) if held else set()
        if not common:
            raise RuntimeError(f"the shards hold no checkpoint version in common ({[sorted(h) for h in held]})")
        version = max(common)
        for address in rt.shards:
            self._ps(address).restore(rt.id, version)
        return version

    # ---- master restart ---------------------------------------------------------------------
    def _recover_after_restart(self) -> None:
        """Jobs a previous master left behind: PENDING ones stay (the scheduler starts
        them); RUNNING ones wait for their nodes to register again (``_resume_recovering``).
        A RUNNING job without a record of where it ran (an older database) fails."""
        unrecoverable = []
        for rec in self.store.recover_after_restart():
            if rec.state != JobState.RUNNING:
                continue
            shards = rec.plan.get("shards") if isinstance(rec.plan, dict) else None
            if not shards:
                unrecoverable.append(rec.id)
                continue
            self.recovering[rec.id] = Recovery(
                jobcodec.job_spec_from_bytes(rec.spec), list(shards), {int(i): dict(w) for i, w in rec.workers.items()},
                time.monotonic() + self.config.recovery_timeout, incarnation=str(rec.plan.get("incarnation", "")),
            )
            log.warning("job %s was RUNNING when the master stopped; waiting for its nodes to register again", rec.id)
            self.store.add_event(rec.id, "master restarted; waiting for the job's shards and workers to register again")
        if unrecoverable:
            self.store.fail_interrupted("the job's shard placement was not recorded; resubmit the job", unrecoverable)

    def _resume_recovering(self) -> None:
        """Resume each recovering job once its shards and workers are back, or at its deadline
        with the workers that came back; fail it if a shard is missing then."""
        now = time.monotonic()
        for job_id, rec in list(self.recovering.items()):
            with self.lock:
                live_ps = self._live_ps_addresses()
                missing_shards = [i for i, a in enumerate(rec.shards) if a not in live_ps]
                expected = {i for i, w in rec.workers.items() if w.get("state") != "lost"}
                back = {i: nid for i, nid in rec.back.items() if nid in self.nodes and self.nodes[nid].alive}
                if (missing_shards or not expected <= set(back)) and now < rec.deadline:
                    continue
            try:
                if missing_shards:
                    raise RuntimeError("shard(s) " + ", ".join(f"{i} ({rec.shards[i]})" for i in missing_shards)
                                       + " did not register again")
                if not back:
                    raise RuntimeError("no worker of the job registered again")
                self._resume(job_id, rec, back, expected)
            except Exception as exc:  # noqa: BLE001 - recorded on the job
                with self.lock:
                    self.recovering.pop(job_id, None)
                    for nid in back.values():
                        if self.nodes[nid].job == job_id:
                            self.nodes[nid].job = None
                self._fail(job_id, f"could not resume the job after a master restart: {rpc.one_line(exc)}")
                self._end_on_shards_addresses(job_id, rec.shards)

    def _resume(self, job_id: str, rec: Recovery, back: dict[int, str], expected: set[int]) -> None:
        plan = plan_job(rec.spec, len(rec.shards))  # deterministic: the placement the shards hold
        for address in rec.shards:
            self._ps(address).status(job_id)  # NOT_FOUND if that shard lost the job (it restarted too)
        slots = sorted(rec.workers)
        lost = [i for i in slots if i not in back]
        deadline = time.monotonic() + self.config.recovery_timeout
        rt = JobRuntime(job_id, rec.spec, plan, {i: back.get(i, "") for i in slots}, list(rec.shards),
                        processes=len(set(back.values())) + len(lost), incarnation=rec.incarnation,
                        # A slot not back may have been handed over once more than recorded: its next
                        # owner must fence that process off too.
                        owners={i: rec.epochs[i] if i in back else int(rec.workers[i].get("owner_epoch", 0)) + 1
                                for i in slots},
                        orphans={i: deadline for i in lost})
        for i, nid in back.items():
            self.store.update_worker(job_id, i, node=nid, owner_epoch=rec.epochs.get(i, 0))
        for i in lost:
            self.store.update_worker(job_id, i, state="lost", note="its process did not come back after the master "
                                                                   "restarted")
        with self.lock:
            # Under the lock a report either came before (its "done" is in the table) or
            # finds the runtime (and adds itself): none falls between the two.
            table = self.store.get(job_id).workers
            rt.done = {i for i in back if table.get(i, {}).get("state") == "done"}
            rt.steps = {i: int(table.get(i, {}).get("step", 0)) for i in slots}
            self.runtimes[job_id] = rt
            self.recovering.pop(job_id, None)
            self.metrics.live(job_id, len(back))
            self.metrics.slots(job_id, slots)
            self._maybe_finished(rt)
            self.changed.notify_all()
        self.store.add_event(job_id, f"resumed after the master restart with workers {sorted(back)}"
                                     + (f"; workers {lost} did not come back: their slots go to other processes"
                                        if lost else ""))
        log.info("job %s resumed after the master restart (workers %s)", job_id, sorted(back))
        if lost:
            self._place_orphans(rt)

    def _schedule_pending(self) -> None:
        pending = self.store.list(states=[JobState.PENDING])
        for rec in pending:
            spec = jobcodec.job_spec_from_bytes(rec.spec)
            if not self._try_start(rec.id, spec):
                self._wait_or_fail(rec.id, spec)
        self._waiting = {r.id: self._waiting[r.id] for r in pending if r.id in self._waiting}

    def _wait_or_fail(self, job_id: str, spec: JobSpec) -> None:
        """A PENDING job short of registered workers or shards: say so once per change, and
        fail it once it has waited ``pending_timeout`` (queueing for busy ones is not timed)."""
        with self.lock:
            if job_id in self._starting or job_id in self.runtimes:
                return
            alive = [n.role for n in self.nodes.values() if n.alive]
        what = limits.waiting_for(spec.train.num_workers, spec.train.num_shards, alive.count("worker"), alive.count("ps"))
        if not what:
            self._waiting.pop(job_id, None)
            return
        now = time.monotonic()
        since, before = self._waiting.get(job_id, (now, ""))
        self._waiting[job_id] = (since, what)
        if what != before:
            self.store.add_event(job_id, f"waiting for {what}")
        timeout = self.config.pending_timeout
        if timeout and now - since >= timeout:
            self._waiting.pop(job_id, None)
            self._fail(job_id, f"not started: it waited {timeout:g}s for {what}; start more nodes, ask for fewer "
                               "(train num_workers / num_shards), or raise --pending-timeout / PSTRAIN_PENDING_TIMEOUT")


def _status(rec: JobRecord) -> master_pb2.JobStatus:
    s = master_pb2.JobStatus(
        id=rec.id, name=rec.name, state=rec.state.value, step=rec.step, epoch=rec.epoch,
        error=rec.error or "", created=rec.created, updated=rec.updated, owner=rec.owner,
    )
    if rec.loss is not None:
        s.has_loss, s.loss = True, rec.loss
    s.metrics.update({k: float(v) for k, v in rec.metrics.items() if isinstance(v, (int, float))})
    s.events.extend(e["text"] if isinstance(e, dict) else str(e) for e in rec.events)
    jobcodec.workers_to_proto(rec.workers, s.workers)
    return s


class TooManyWatchers(RuntimeError):
    """Every WatchJob slot is taken."""


rpc.register_error(TooManyWatchers, grpc.StatusCode.RESOURCE_EXHAUSTED)


class NotOwner(PermissionError):
    """A user acting on another user's job."""


rpc.register_error(NotOwner, grpc.StatusCode.PERMISSION_DENIED)


class MasterServicer(master_pb2_grpc.MasterServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self._watch_slots = threading.BoundedSemaphore(coordinator.config.watcher_limit)
        coordinator.metrics.track(self)  # RPCs in progress: pstrain_request_queue_depth

    @rpc.guarded
    def SubmitJob(self, request, context):
        caller = current_caller()
        limits.check_request(request.ByteSize(), len(request.spec.model.graph.nodes), self.c.config)  # before decoding
        return _status(self.c.submit(jobcodec.job_spec_from_proto(request.spec), owner=caller.name if caller else ""))

    def _own(self, job_id: str, what: str) -> None:
        """Only a job's submitter or an admin may ``what`` it (cancel, export, scale)."""
        caller = current_caller()
        if caller is None or caller.admin:
            return
        owner = self.c.store.get(job_id).owner
        if caller.name != owner:
            raise NotOwner(f"user '{caller.name}' may not {what} {job_id}: only its submitter"
                           f"{f' ({owner})' if owner else ''} or an admin may")

    @rpc.guarded
    def GetJob(self, request, context):
        return _status(self.c.store.get(request.id))

    @rpc.guarded
    def ListJobs(self, request, context):
        return master_pb2.ListJobsResponse(jobs=[_status(r) for r in self.c.store.list()])

    @rpc.guarded
    def CancelJob(self, request, context):
        self._own(request.id, "cancel")
        return _status(self.c.cancel(request.id))

    def WatchJob(self, request, context):
        try:
            self.c.store.get(request.id)
        except KeyError as exc:
            rpc.abort(context, exc)
        if not self._watch_slots.acquire(blocking=False):
            limit = self.c.config.watcher_limit
            rpc.abort(context, TooManyWatchers(
                f"the master already serves {limit} WatchJob streams (max_watchers); close one, poll GetJob "
                "instead, or raise --max-watchers / PSTRAIN_MAX_WATCHERS"))
        try:
            yield from self._watch(request, context)
        finally:
            self._watch_slots.release()

    def _watch(self, request, context):
        seq = request.since
        while context.is_active():
            rec = self.c.store.get(request.id)
            history = self.c.store.history(request.id, since_seq=seq)
            seq += len(history)
            yield master_pb2.JobEvent(job=_status(rec), history=[jobcodec.history_entry_to_proto(h) for h in history],
                                      seq=seq)
            if rec.state.terminal:
                return
            with self.c.changed:
                self.c.changed.wait(timeout=0.5)

    @rpc.guarded
    def GetPlan(self, request, context):
        limits.check_request(request.ByteSize(), len(request.spec.model.graph.nodes), self.c.config)  # before decoding
        plan = self.c.plan(jobcodec.job_spec_from_proto(request.spec))
        resp = master_pb2.GetPlanResponse(text=plan.text, plan_json=json.dumps(plan.to_dict()))
        resp.graph.CopyFrom(codec.graph_to_proto(plan.graph))
        return resp

    @rpc.guarded
    def ExportModel(self, request, context):
        self._own(request.id, "export")
        config, names, weights = self.c.export(request.id)
        resp = master_pb2.ExportModelResponse(model_config_json=json.dumps(config), names=names)
        for w in weights:
            resp.weights.append(codec.tensor_to_proto(w))
        return resp

    @rpc.guarded
    def RegisterNode(self, request, context):
        node = self.c.register(request.role, request.address, request.name, request.metrics_address,
                               tuple(SlotRef(t.job, t.worker_index, t.owner_epoch) for t in request.running))
        return master_pb2.RegisterNodeResponse(
            node_id=node.node_id, index=node.index, heartbeat_interval=self.c.config.heartbeat_interval
        )

    @rpc.guarded
    def Heartbeat(self, request, context):
        return jobcodec.heartbeat_reply_to_proto(self.c.heartbeat(request.node_id))

    @rpc.guarded
    def ReportProgress(self, request, context):
        return master_pb2.ProgressAck(cancelled=self.c.progress(jobcodec.progress_from_proto(request)))

    @rpc.guarded
    def ScaleJob(self, request, context):
        self._own(request.id, "scale")
        return _status(self.c.scale(request.id, request.workers))

    @rpc.guarded
    def ListNodes(self, request, context):
        now = time.monotonic()
        return master_pb2.ListNodesResponse(nodes=[
            master_pb2.NodeStatus(node_id=n.node_id, role=n.role, address=n.address, index=n.index, alive=n.alive,
                                  last_seen=now - n.last_seen, name=n.name, metrics_address=n.metrics_address,
                                  restarts=n.restarts)
            for n in self.c.list_nodes()
        ])


# Who may call what: nodes register, heartbeat and report; users do the rest.
NODE_CALLS = ("RegisterNode", "Heartbeat", "ReportProgress")


def authenticator(config: MasterConfig, node_token: str) -> Authenticator:
    """The master's check: node calls need the cluster's node credentials, user calls a
    user token (its token file, or the admin token ``PSTRAIN_ADMIN_TOKEN`` / ``_FILE``)."""
    service = master_pb2.DESCRIPTOR.services_by_name["Master"]
    methods = methods_of(service, {name: "node" for name in NODE_CALLS}, default="user")
    return Authenticator(methods, node_token=node_token, users=UserTokens(tokens_path(config), admin_token_from_env()))


def tokens_path(config: MasterConfig) -> str:
    """The users' token file: ``tokens_file``, else tokens.json beside the database."""
    if config.tokens_file:
        return config.tokens_file
    if config.db == ":memory:":
        return ""
    return os.path.join(os.path.dirname(os.path.abspath(config.db)), "tokens.json")


def serve(config: MasterConfig, credentials: Credentials | None = None) -> tuple[grpc.Server, int, Coordinator]:
    """Start a master; returns (server, bound port, coordinator). ``credentials``: the
    cluster's (default: from the environment, see ``service_credentials``)."""
    creds = credentials or service_credentials("master", config.tls_dir)
    auth = authenticator(config, creds.node_token)
    coordinator = Coordinator(config, credentials=creds)
    server = rpc.make_server(max_workers=config.max_workers, authenticator=auth)
    master_pb2_grpc.add_MasterServicer_to_server(MasterServicer(coordinator), server)
    try:
        port = rpc.bind(server, config.host, config.port, tls=creds.tls, insecure=config.insecure)
    except BaseException:
        coordinator.close()
        raise
    server.start()
    log.info("master listening on %s:%d (%s)", config.host, port, "mutual TLS" if creds.tls else "plaintext")
    return server, port, coordinator
