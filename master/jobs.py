"""Job lifecycle and the master's durable job store.

A job moves through an explicit state machine::

    PENDING ──► RUNNING ──► SUCCEEDED
       │           │
       ├──► FAILED ◄┤
       └──► CANCELLED ◄┘

``TRANSITIONS`` is the single source of truth for which moves are legal;
:func:`check_transition` enforces it and :class:`JobStore` calls it inside the same
transaction that writes the new state, so two racing callers cannot both move a job.

:class:`JobStore` keeps every job, its progress history, events and worker table in
SQLite (stdlib ``sqlite3``), so jobs survive a master restart. It imports neither grpc
nor numba; the master's servicer calls it from its thread pool.

Usage::

    store = JobStore("/var/lib/pstrain/jobs.db")
    job = store.create("mnist-mlp", spec=job_spec.SerializeToString(), plan={"shards": 2})
    store.transition(job.id, JobState.RUNNING)
    store.record_progress(job.id, step=10, epoch=0, loss=0.71, metrics={"accuracy": 0.8},
                          history_entry={"step": 10, "epoch": 0, "loss": 0.71})
    store.transition(job.id, JobState.SUCCEEDED)
    print(store.get(job.id).to_dict())
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: jobs.owner
ID_PREFIX = "job-"
ID_DIGITS = 6  # ids stay lexically sortable up to job-999999; the store itself orders by number


# ---- lifecycle --------------------------------------------------------------------------------
class JobState(str, Enum):
    """Where a job is in its lifecycle. Values are the names in the ``--json`` contract."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """True once the job can never change state again."""
        return not TRANSITIONS[self]

    @classmethod
    def parse(cls, value: JobState | str) -> JobState:
        """``JobState`` from an enum member or its name, with an error listing the valid names."""
        if isinstance(value, JobState):
            return value
        try:
            return cls(str(value).upper())
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown job state {value!r}; expected one of {allowed}") from None


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

ACTIVE_STATES: tuple[JobState, ...] = tuple(s for s in JobState if not s.terminal)


class InvalidTransition(ValueError):
    """A state change the lifecycle does not allow (e.g. SUCCEEDED -> RUNNING)."""

    def __init__(self, job: str | None, old: JobState, new: JobState) -> None:
        self.job, self.old, self.new = job, old, new
        who = f"job {job!r}" if job is not None else "a job"
        if old.terminal:
            why = f"{old} is terminal"
        else:
            why = "allowed from {}: {}".format(old, ", ".join(s.value for s in JobState if s in TRANSITIONS[old]))
        super().__init__(f"{who} cannot go from {old} to {new} ({why})")


def check_transition(old: JobState | str, new: JobState | str, job: str | None = None) -> None:
    """Raise :class:`InvalidTransition` unless ``old -> new`` is in ``TRANSITIONS``.

    >>> check_transition(JobState.PENDING, JobState.RUNNING)  # fine
    """
    old, new = JobState.parse(old), JobState.parse(new)
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(job, old, new)


class JobNotFound(KeyError):
    """No job with that id. ``str()`` is the plain message (``KeyError`` would quote it)."""

    def __init__(self, job: str, known: list[str]) -> None:
        self.job = job
        shown = known[-10:]
        listing = ", ".join(shown) if shown else "none"
        if len(known) > len(shown):
            listing = f"... {listing} ({len(known)} jobs)"
        self.message = f"no job {job!r}; known: {listing}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class JobFinished(ValueError):
    """Progress reported for a job that has already reached a terminal state."""


# ---- records ----------------------------------------------------------------------------------
@dataclass
class JobRecord:
    """A snapshot of one job as stored; mutating it does not change the store."""

    id: str
    name: str
    state: JobState
    spec: bytes  # the serialized JobSpec; opaque to the store
    step: int = 0
    epoch: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    created: float = 0.0
    updated: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # loaded only on request, see JobStore.get
    history_len: int = 0  # entries stored; the last one has seq == history_len
    events: list[dict[str, Any]] = field(default_factory=list)  # {"time", "text"}, oldest first
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> {"address", "state", ...}
    plan: dict[str, Any] = field(default_factory=dict)
    owner: str = ""  # the user who submitted it

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` view: contract fields plus bookkeeping, JSON-ready (no spec bytes).

        Worker indices become string keys, as JSON would make them anyway, so
        ``json.loads(json.dumps(r.to_dict())) == r.to_dict()``.
        """
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "metrics": dict(self.metrics),
            "error": self.error,
            "created": self.created,
            "updated": self.updated,
            "owner": self.owner,
            "events": [dict(e) for e in self.events],
            "workers": {str(i): dict(w) for i, w in sorted(self.workers.items())},
        }


# ---- store ------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: numbers are never reused
    id          TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    spec        BLOB NOT NULL,
    step        INTEGER NOT NULL DEFAULT 0,
    epoch       INTEGER NOT NULL DEFAULT 0,
    loss        TEXT,            -- JSON, so a diverged NaN loss survives (a REAL column turns it into NULL)
    metrics     TEXT NOT NULL DEFAULT '{}',
    error       TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    plan        TEXT NOT NULL DEFAULT '{}',
    history_len INTEGER NOT NULL DEFAULT 0,  -- next history seq without scanning the history table
    owner       TEXT NOT NULL DEFAULT ''     -- the user who submitted it ('' before version 2: admins only)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS job_history (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq    INTEGER NOT NULL,
    entry  TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_events (
    seq    INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    time   REAL NOT NULL,
    text   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS job_workers (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx    INTEGER NOT NULL,
    fields TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""

_JOB_COLUMNS = "id, name, state, spec, step, epoch, loss, metrics, error, created, updated, plan, history_len, owner"

INTERRUPTED_ERROR = "master restarted while the job was running: {reason}"


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serializable (str/int/float/bool/None, lists, dicts): {exc}") from None


class JobStore:
    """Durable, thread-safe job table backed by SQLite.

    ``path`` is a file (created if missing; WAL mode) or ``":memory:"`` for tests. One
    connection is shared by all threads behind a lock, which is simpler than a pool and
    plenty for a master's write rate; every method is one short transaction.

    Usage::

        with JobStore("jobs.db") as store:
            job = store.create("demo", spec=b"...", plan={})
            store.transition(job.id, "RUNNING")
    """

    def __init__(self, path: str | Path = ":memory:", *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Job specs are the users' models and data paths: the owner's only. SQLite gives
            # its -wal and -shm files the database file's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(self.path + suffix, 0o600)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so each read-check-write
        # holds the write lock from its first read (also against another process on the file).
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL under WAL: a commit survives a crash of the master process (what a
            # restart needs); only an OS crash/power loss may drop the last commits.
            self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    # -- lifecycle of the store itself
    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _init_schema(self) -> None:
        # executescript manages its own transaction, so it runs outside _tx.
        with self._lock:
            version = None
            if self._conn.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'").fetchone():
                row = self._conn.execute("SELECT version FROM schema_version").fetchone()
                version = row["version"] if row else None
            if version == 1:  # version 1 -> 2: who submitted each job (older jobs: nobody, so admins only)
                self._conn.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
                self._conn.execute("UPDATE schema_version SET version = 2")
            self._conn.executescript(_SCHEMA)
        with self._tx() as db:
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row["version"] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"job database {self.path} has schema version {row['version']}, but this pstrain "
                    f"understands up to {SCHEMA_VERSION}; upgrade pstrain or point the master at a new database"
                )
            # Version 1 was migrated above, before the schema script (its jobs table lacks owner).

    # -- helpers (call with the lock held, inside _tx)
    def _state_of(self, db: sqlite3.Connection, job_id: str) -> JobState:
        row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            known = [r["id"] for r in db.execute("SELECT id FROM jobs ORDER BY seq")]
            raise JobNotFound(job_id, known)
        return JobState(row["state"])

    def _load(self, db: sqlite3.Connection, row: sqlite3.Row, include_history: bool) -> JobRecord:
        job_id = row["id"]
        events = [
            {"time": e["time"], "text": e["text"]}
            for e in db.execute("SELECT time, text FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,))
        ]
        workers = {
            w["idx"]: json.loads(w["fields"])
            for w in db.execute("SELECT idx, fields FROM job_workers WHERE job_id = ? ORDER BY idx", (job_id,))
        }
        history = self._history(db, job_id, 0) if include_history else []
        return JobRecord(
            id=job_id,
            name=row["name"],
            state=JobState(row["state"]),
            spec=bytes(row["spec"]),
            step=row["step"],
            epoch=row["epoch"],
            loss=json.loads(row["loss"]) if row["loss"] is not None else None,
            metrics=json.loads(row["metrics"]),
            error=row["error"],
            created=row["created"],
            updated=row["updated"],
            history=history,
            history_len=row["history_len"],
            owner=row["owner"],
            events=events,
            workers=workers,
            plan=json.loads(row["plan"]),
        )

    def _get(self, db: sqlite3.Connection, job_id: str, include_history: bool) -> JobRecord:
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            self._state_of(db, job_id)  # raises JobNotFound with the known ids
        return self._load(db, row, include_history)

    @staticmethod
    def _history(db: sqlite3.Connection, job_id: str, since_seq: int) -> list[dict[str, Any]]:
        rows = db.execute(
            "SELECT entry FROM job_history WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, since_seq)
        )
        return [json.loads(r["entry"]) for r in rows]

    # -- public API
    def create(self, name: str, spec: bytes, plan: dict[str, Any] | None = None, owner: str = "") -> JobRecord:
        """Store a new PENDING job and return it; ids are ``job-000001``, ``job-000002``, ...

        Numbers are never reused, even across restarts of the master.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"job name must be a non-empty string, got {name!r}")
        if not isinstance(spec, (bytes, bytearray, memoryview)):
            raise TypeError(f"job spec must be bytes (a serialized JobSpec), got {type(spec).__name__}")
        plan_json = _dumps(plan or {}, "the job plan")
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
            seq = (row["seq"] if row else 0) + 1
            job_id = f"{ID_PREFIX}{seq:0{ID_DIGITS}d}"
            db.execute(
                "INSERT INTO jobs (seq, id, name, state, spec, created, updated, plan, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, job_id, name, JobState.PENDING.value, bytes(spec), now, now, plan_json, str(owner)),
            )
            record = self._get(db, job_id, include_history=False)
        logger.info("created %s (%s)", job_id, name)
        return record

    def get(self, job_id: str, *, include_history: bool = False) -> JobRecord:
        """The job with this id; raises :class:`JobNotFound` (a ``KeyError``) naming the known ids.

        The progress history (one entry per report, so it grows with the run) is only
        loaded with ``include_history=True``: the master reads jobs on every report and
        every watch poll, and that must not cost O(history). ``history_len`` is always
        set, and :meth:`history` streams the entries in pieces.
        """
        with self._lock:
            return self._get(self._conn, job_id, include_history)

    def list(
        self, states: Iterable[JobState | str] | None = None, *, include_history: bool = False
    ) -> list[JobRecord]:
        """All jobs (or those in ``states``), oldest first. History is not loaded unless asked."""
        with self._lock:
            if states is None:
                rows = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq").fetchall()
            else:
                wanted = sorted({JobState.parse(s).value for s in states})
                marks = ", ".join("?" * len(wanted))
                rows = self._conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq", wanted
                ).fetchall()
            return [self._load(self._conn, r, include_history) for r in rows]

    def transition(self, job_id: str, new_state: JobState | str, error: str | None = None) -> JobRecord:
        """Move the job to ``new_state`` if the lifecycle allows it, atomically.

        Raises :class:`InvalidTransition` otherwise (e.g. cancelling a finished job), and
        :class:`JobNotFound` for an unknown id. ``error`` is stored with the new state; a
        FAILED job always gets one, so users never see FAILED with no reason.
        """
        new = JobState.parse(new_state)
        if new is JobState.FAILED and not error:
            error = "the job failed without a reported reason"
        with self._tx() as db:
            old = self._state_of(db, job_id)
            check_transition(old, new, job=job_id)
            db.execute(
                "UPDATE jobs SET state = ?, error = COALESCE(?, error), updated = ? WHERE id = ?",
                (new.value, error, self._clock(), job_id),
            )
            record = self._get(db, job_id, include_history=False)
        logger.info("%s: %s -> %s%s", job_id, old, new, f" ({error})" if error else "")
        return record

    def record_progress(
        self,
        job_id: str,
        step: int,
        epoch: int,
        loss: float | None,
        metrics: dict[str, float] | None = None,
        history_entry: dict[str, Any] | None = None,
    ) -> int:
        """Set the job's latest step/epoch/loss, merge ``metrics`` into its metrics, and
        append ``history_entry`` (if given) to its history.

        Metrics merge rather than replace so that, e.g., ``val_accuracy`` from the last
        epoch end stays visible while per-step ``accuracy`` keeps moving. A history entry
        gets ``step``, ``epoch``, ``loss`` and ``time`` filled in where it lacks them.
        Returns the job's history length (the new entry's seq). Raises
        :class:`JobFinished` for a job already in a terminal state: a late report from a
        worker must not rewrite a finished job.
        """
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        loss_json = None if loss is None else json.dumps(float(loss))
        now = self._clock()
        entry_json = None
        if history_entry is not None:
            entry = {"step": step, "epoch": epoch, "loss": loss, "time": now, **history_entry}
            entry_json = _dumps(entry, "a history entry")
        with self._tx() as db:
            state = self._state_of(db, job_id)
            if state.terminal:
                raise JobFinished(f"job {job_id!r} is {state}; progress at step {step} was not recorded")
            row = db.execute("SELECT metrics, history_len FROM jobs WHERE id = ?", (job_id,)).fetchone()
            merged = {**json.loads(row["metrics"]), **metrics}
            seq = row["history_len"]
            if entry_json is not None:
                seq += 1
                db.execute("INSERT INTO job_history (job_id, seq, entry) VALUES (?, ?, ?)", (job_id, seq, entry_json))
            db.execute(
                "UPDATE jobs SET step = ?, epoch = ?, loss = ?, metrics = ?, history_len = ?, updated = ? "
                "WHERE id = ?",
                (int(step), int(epoch), loss_json, json.dumps(merged, sort_keys=True), seq, now, job_id),
            )
        return seq

    def history(self, job_id: str, since_seq: int = 0) -> list[dict[str, Any]]:
        """History entries after ``since_seq``, oldest first.

        Seqs are 1, 2, 3, ... per job with no gaps, so a streaming reader that has seen
        ``n`` entries asks for ``since_seq=n`` next.
        """
        with self._lock:
            self._state_of(self._conn, job_id)
            return self._history(self._conn, job_id, since_seq)

    def set_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        """Replace the job's plan record (e.g. where its shards and workers run, so a
        restarted master can find them again)."""
        plan_json = _dumps(plan, "the job plan")
        with self._tx() as db:
            self._state_of(db, job_id)
            db.execute("UPDATE jobs SET plan = ?, updated = ? WHERE id = ?", (plan_json, self._clock(), job_id))

    def add_event(self, job_id: str, text: str) -> None:
        """Append a human-readable event, e.g. ``"worker 1 lost at step 120"`` (any state)."""
        now = self._clock()
        with self._tx() as db:
            self._state_of(db, job_id)
            db.execute("INSERT INTO job_events (job_id, time, text) VALUES (?, ?, ?)", (job_id, now, str(text)))
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (now, job_id))

    def update_worker(self, job_id: str, index: int, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` (``address``, ``state``, ``step``, ``step_time``, ...) into
        worker ``index``'s entry, creating it if needed; returns the merged entry."""
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"worker index must be a non-negative int, got {index!r}")
        now = self._clock()
        with self._tx() as db:
            self._state_of(db, job_id)
            row = db.execute("SELECT fields FROM job_workers WHERE job_id = ? AND idx = ?", (job_id, index)).fetchone()
            merged = {**(json.loads(row["fields"]) if row else {}), **fields}
            db.execute(
                "INSERT INTO job_workers (job_id, idx, fields) VALUES (?, ?, ?) "
                "ON CONFLICT (job_id, idx) DO UPDATE SET fields = excluded.fields",
                (job_id, index, _dumps(merged, f"worker {index} fields")),
            )
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (now, job_id))
        return merged

    # -- restart recovery
    def recover_after_restart(self) -> list[JobRecord]:
        """Jobs a previous master process left PENDING or RUNNING, oldest first.

        Read-only: the master decides whether to resume each one or to give up on it
        with :meth:`fail_interrupted`.
        """
        return self.list(ACTIVE_STATES)

    def fail_interrupted(self, reason: str, ids: Iterable[str] | None = None) -> list[JobRecord]:
        """Mark interrupted jobs FAILED with ``"master restarted while the job was running: <reason>"``.

        ``ids`` limits it to the jobs the master could not resume (default: every job
        still PENDING or RUNNING). Jobs that finished meanwhile are skipped. Returns the
        jobs it failed.
        """
        targets = list(ids) if ids is not None else [r.id for r in self.recover_after_restart()]
        error = INTERRUPTED_ERROR.format(reason=reason)
        failed = []
        for job_id in targets:
            try:
                self.transition(job_id, JobState.FAILED, error=error)
            except InvalidTransition:
                continue
            self.add_event(job_id, error)
            failed.append(self.get(job_id))
        if failed:
            logger.warning("failed %d interrupted job(s): %s", len(failed), reason)
        return failed
