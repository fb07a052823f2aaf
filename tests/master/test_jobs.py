"""The job lifecycle and the durable job store: every transition the state machine allows
or forbids, ids that never repeat, state that survives reopening the database (a master
restart), and no lost writes under concurrent updates."""
from __future__ import annotations

import itertools
import json
import math
import threading

import pytest

from master.jobs import (
    ACTIVE_STATES,
    TRANSITIONS,
    InvalidTransition,
    JobFinished,
    JobNotFound,
    JobRecord,
    JobState,
    JobStore,
    check_transition,
)

S = JobState
ALLOWED = [
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.FAILED),
    (S.PENDING, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
]
FORBIDDEN = [pair for pair in itertools.product(JobState, JobState) if pair not in ALLOWED]
CONTRACT_FIELDS = {"id", "state", "step", "epoch", "loss", "metrics", "error"}

# Paths through the lifecycle that reach each state from PENDING.
PATH_TO = {
    S.PENDING: [],
    S.RUNNING: [S.RUNNING],
    S.SUCCEEDED: [S.RUNNING, S.SUCCEEDED],
    S.FAILED: [S.RUNNING, S.FAILED],
    S.CANCELLED: [S.CANCELLED],
}


class FakeClock:
    """Deterministic time: each call advances one second."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store():
    s = JobStore(":memory:", clock=FakeClock())
    yield s
    s.close()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "jobs.db"  # parent dir does not exist yet: the store creates it


def job_in(store: JobStore, state: JobState) -> str:
    job = store.create("demo", spec=b"\x00spec", plan={})
    for s in PATH_TO[state]:
        store.transition(job.id, s, error="boom" if s is S.FAILED else None)
    assert store.get(job.id).state is state
    return job.id


# ---- the state machine as a pure object -------------------------------------------------------
def test_table_covers_every_state_and_matches_allowed_list():
    assert set(TRANSITIONS) == set(JobState)
    assert {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts} == set(ALLOWED)


@pytest.mark.parametrize("state", list(JobState))
def test_terminal_means_no_way_out(state):
    assert state.terminal == (state in {S.SUCCEEDED, S.FAILED, S.CANCELLED})
    assert state.terminal == (not TRANSITIONS[state])
    assert (state in ACTIVE_STATES) == (not state.terminal)


@pytest.mark.parametrize("old,new", ALLOWED)
def test_check_transition_allows(old, new):
    check_transition(old, new, job="job-000001")
    check_transition(old.value, new.value.lower())  # names are accepted too


@pytest.mark.parametrize("old,new", FORBIDDEN)
def test_check_transition_forbids_naming_both_states_and_the_job(old, new):
    with pytest.raises(InvalidTransition) as info:
        check_transition(old, new, job="job-000042")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.job, err.old, err.new) == ("job-000042", old, new)
    msg = str(err)
    assert old.value in msg and new.value in msg and "job-000042" in msg


def test_unknown_state_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED"):
        JobState.parse("DONE")


# ---- transitions through the store ------------------------------------------------------------
@pytest.mark.parametrize("old,new", ALLOWED)
def test_store_applies_allowed_transition(store, old, new):
    job_id = job_in(store, old)
    rec = store.transition(job_id, new, error="boom" if new is S.FAILED else None)
    assert rec.state is new
    assert store.get(job_id).state is new


@pytest.mark.parametrize("old,new", FORBIDDEN)
def test_store_rejects_forbidden_transition_and_changes_nothing(store, old, new):
    job_id = job_in(store, old)
    before = store.get(job_id)
    with pytest.raises(InvalidTransition, match=job_id):
        store.transition(job_id, new, error="nope")
    after = store.get(job_id)
    assert after == before


def test_failed_keeps_the_error_and_always_has_one(store):
    a = job_in(store, S.RUNNING)
    assert store.transition(a, S.FAILED, error="worker 2 crashed: OOM").error == "worker 2 crashed: OOM"
    b = job_in(store, S.PENDING)
    assert store.transition(b, "FAILED").error  # never FAILED without a reason
    assert store.get(job_in(store, S.SUCCEEDED)).error is None


def test_transition_bumps_updated(store):
    job = store.create("demo", spec=b"", plan={})
    rec = store.transition(job.id, S.RUNNING)
    assert rec.updated > job.updated == job.created


# ---- create / get / list ----------------------------------------------------------------------
def test_create_returns_a_pending_record(store):
    rec = store.create("mnist-mlp", spec=b"\x01\x02", plan={"shards": 2, "workers": 3})
    assert rec == store.get(rec.id)
    assert rec.id == "job-000001"
    assert (rec.name, rec.state, rec.spec, rec.plan) == ("mnist-mlp", S.PENDING, b"\x01\x02", {"shards": 2, "workers": 3})
    assert (rec.step, rec.epoch, rec.loss, rec.metrics, rec.error) == (0, 0, None, {}, None)
    assert (rec.history, rec.events, rec.workers) == ([], [], {})


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"name": "", "spec": b""}, ValueError, "non-empty"),
        ({"name": "x", "spec": "not bytes"}, TypeError, "bytes"),
        ({"name": "x", "spec": b"", "plan": {"f": object()}}, TypeError, "JSON"),
    ],
)
def test_create_rejects_bad_input(store, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        store.create(**kwargs)
    assert store.list() == []


def test_get_unknown_job_names_the_known_ones(store):
    ids = [store.create(f"j{i}", spec=b"", plan={}).id for i in range(2)]
    with pytest.raises(KeyError) as info:
        store.get("job-999")
    assert isinstance(info.value, JobNotFound)
    assert str(info.value) == f"no job 'job-999'; known: {ids[0]}, {ids[1]}"


@pytest.mark.parametrize("op", ["transition", "record_progress", "add_event", "update_worker", "history"])
def test_every_operation_on_an_unknown_job_raises_not_found(store, op):
    call = {
        "transition": lambda: store.transition("job-7", S.RUNNING),
        "record_progress": lambda: store.record_progress("job-7", 1, 0, 0.5, {}),
        "add_event": lambda: store.add_event("job-7", "hi"),
        "update_worker": lambda: store.update_worker("job-7", 0, state="UP"),
        "history": lambda: store.history("job-7"),
    }[op]
    with pytest.raises(JobNotFound, match="no job 'job-7'; known: none"):
        call()


@pytest.mark.parametrize(
    "states,want",
    [
        (None, ["a", "b", "c", "d", "e"]),
        ([S.RUNNING], ["b"]),
        (["pending", "RUNNING"], ["a", "b"]),
        ([S.SUCCEEDED, S.FAILED, S.CANCELLED], ["c", "d", "e"]),
        ([], []),
    ],
)
def test_list_filters_by_state_in_id_order(store, states, want):
    for name, state in zip("abcde", [S.PENDING, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED]):
        rec = store.create(name, spec=b"", plan={})
        for s in PATH_TO[state]:
            store.transition(rec.id, s)
    got = store.list(states)
    assert [r.name for r in got] == want
    assert [r.id for r in got] == sorted(r.id for r in got)


# ---- ids ---------------------------------------------------------------------------------------
def test_ids_are_monotonic_unique_and_survive_reopen(db_path):
    with JobStore(db_path) as s:
        first = [s.create("a", spec=b"", plan={}).id for _ in range(3)]
    with JobStore(db_path) as s:
        second = [s.create("b", spec=b"", plan={}).id for _ in range(3)]
        assert [r.id for r in s.list()] == first + second
    ids = first + second
    assert ids == [f"job-{n:06d}" for n in range(1, 7)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


# ---- progress, history, events, workers --------------------------------------------------------
def test_record_progress_updates_latest_and_merges_metrics(store):
    job_id = job_in(store, S.RUNNING)
    store.record_progress(job_id, step=10, epoch=0, loss=0.9, metrics={"accuracy": 0.5})
    store.record_progress(job_id, step=20, epoch=1, loss=0.4, metrics={"val_accuracy": 0.7})
    store.record_progress(job_id, step=30, epoch=1, loss=0.3, metrics={"accuracy": 0.8})
    rec = store.get(job_id)
    assert (rec.step, rec.epoch, rec.loss) == (30, 1, 0.3)
    assert rec.metrics == {"accuracy": 0.8, "val_accuracy": 0.7}
    assert rec.history == [] and rec.history_len == 0  # no history entries were given


def test_history_appends_in_order_and_streams_from_a_seq(store):
    job_id = job_in(store, S.RUNNING)
    seqs = [
        store.record_progress(job_id, step, 0, 1.0 / step, {"accuracy": 0.1 * step}, {"accuracy": 0.1 * step})
        for step in range(1, 6)
    ]
    assert seqs == [1, 2, 3, 4, 5]
    full = store.history(job_id)
    assert [h["step"] for h in full] == [1, 2, 3, 4, 5]
    assert set(full[0]) >= {"step", "epoch", "loss", "accuracy", "time"}  # filled in from the report
    assert store.history(job_id, since_seq=3) == full[3:]
    assert store.history(job_id, since_seq=5) == []
    assert store.get(job_id, include_history=True).history == full
    assert store.get(job_id).history == []  # not loaded by default: it grows with the run
    assert store.get(job_id).history_len == 5
    assert store.list(include_history=True)[0].history == full


def test_history_entry_fields_win_over_defaults(store):
    job_id = job_in(store, S.RUNNING)
    store.record_progress(job_id, 7, 2, 0.5, {}, {"time": 123.0, "loss": 0.25, "val_loss": 0.6})
    assert store.history(job_id) == [{"step": 7, "epoch": 2, "loss": 0.25, "time": 123.0, "val_loss": 0.6}]


def test_nan_loss_survives_a_diverged_run(store):
    job_id = job_in(store, S.RUNNING)
    store.record_progress(job_id, 1, 0, float("nan"), {}, {})
    assert math.isnan(store.get(job_id).loss)
    assert math.isnan(store.history(job_id)[0]["loss"])


@pytest.mark.parametrize("state", [S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_progress_for_a_finished_job_is_rejected(store, state):
    job_id = job_in(store, state)
    before = store.get(job_id)
    with pytest.raises(JobFinished, match=f"{job_id}.*{state.value}"):
        store.record_progress(job_id, 99, 9, 0.1, {"accuracy": 1.0}, {"x": 1})
    assert store.get(job_id) == before


@pytest.mark.parametrize("state", list(JobState))
def test_events_and_workers_are_recorded_in_any_state(store, state):
    job_id = job_in(store, state)
    store.add_event(job_id, "worker 1 lost at step 120")
    store.update_worker(job_id, 1, state="LOST")
    rec = store.get(job_id)
    assert [e["text"] for e in rec.events] == ["worker 1 lost at step 120"]
    assert rec.workers == {1: {"state": "LOST"}}


def test_events_keep_order_and_time(store):
    job_id = job_in(store, S.RUNNING)
    for text in ["worker 0 joined", "worker 1 joined", "worker 1 lost at step 120"]:
        store.add_event(job_id, text)
    events = store.get(job_id).events
    assert [e["text"] for e in events] == ["worker 0 joined", "worker 1 joined", "worker 1 lost at step 120"]
    times = [e["time"] for e in events]
    assert times == sorted(times) and len(set(times)) == 3


def test_update_worker_merges_fields(store):
    job_id = job_in(store, S.RUNNING)
    store.update_worker(job_id, 0, address="10.0.0.5:7001", state="REGISTERED")
    merged = store.update_worker(job_id, 0, state="RUNNING", step=12, step_time=0.031)
    store.update_worker(job_id, 2, address="10.0.0.6:7001")
    want0 = {"address": "10.0.0.5:7001", "state": "RUNNING", "step": 12, "step_time": 0.031}
    assert merged == want0
    assert store.get(job_id).workers == {0: want0, 2: {"address": "10.0.0.6:7001"}}


@pytest.mark.parametrize("index", [-1, "0", 1.0, True])
def test_update_worker_rejects_bad_index(store, index):
    job_id = job_in(store, S.RUNNING)
    with pytest.raises(ValueError, match="worker index"):
        store.update_worker(job_id, index, state="UP")


def test_everything_survives_closing_and_reopening(db_path):
    with JobStore(db_path) as s:
        done = s.create("done", spec=b"\xffspec-a", plan={"shards": [["w", "b"], ["w2"]]})
        s.transition(done.id, S.RUNNING)
        s.record_progress(done.id, 5, 1, 0.25, {"accuracy": 0.9, "val_accuracy": 0.85}, {"accuracy": 0.9})
        s.add_event(done.id, "worker 1 lost at step 4")
        s.update_worker(done.id, 1, address="h:1", state="LOST", step=4, step_time=0.02)
        s.transition(done.id, S.FAILED, error="worker 1 lost")
        live = s.create("live", spec=b"spec-b", plan={})
        s.transition(live.id, S.RUNNING)
        s.record_progress(live.id, 3, 0, 0.5, {"accuracy": 0.6}, {"step": 3})
        before = {r.id: s.get(r.id, include_history=True) for r in s.list()}
    with JobStore(db_path) as s:
        after = {r.id: s.get(r.id, include_history=True) for r in s.list()}
        assert after == before
        # ... and the reopened store keeps appending where the old one stopped.
        assert s.record_progress(live.id, 4, 0, 0.4, {}, {"step": 4}) == 2
        assert [h["step"] for h in s.history(live.id)] == [3, 4]
    rec = before[done.id]
    assert (rec.state, rec.error, rec.step, rec.epoch, rec.loss) == (S.FAILED, "worker 1 lost", 5, 1, 0.25)
    assert rec.spec == b"\xffspec-a" and rec.plan == {"shards": [["w", "b"], ["w2"]]}
    assert len(rec.history) == 1 and len(rec.events) == 1 and rec.workers[1]["state"] == "LOST"


def test_newer_schema_is_refused_with_a_clear_error(db_path):
    with JobStore(db_path) as s:
        s._conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="schema version 99.*upgrade pstrain"):
        JobStore(db_path)


# ---- --json view --------------------------------------------------------------------------------
def test_to_dict_has_the_contract_fields_and_is_json_ready(store):
    job_id = job_in(store, S.RUNNING)
    store.record_progress(job_id, 8, 1, 0.3, {"accuracy": 0.9, "val_accuracy": 0.88}, {"step": 8})
    store.add_event(job_id, "worker 0 joined")
    store.update_worker(job_id, 0, address="h:1", state="RUNNING", step=8, step_time=0.01)
    d = store.get(job_id).to_dict()
    assert CONTRACT_FIELDS | {"name", "created", "updated", "events", "workers"} <= set(d)
    assert "spec" not in d
    assert d["state"] == "RUNNING" and d["step"] == 8 and d["epoch"] == 1 and d["loss"] == 0.3
    assert d["metrics"] == {"accuracy": 0.9, "val_accuracy": 0.88} and d["error"] is None
    assert d["workers"] == {"0": {"address": "h:1", "state": "RUNNING", "step": 8, "step_time": 0.01}}
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("state", list(JobState))
def test_to_dict_state_is_the_contract_name(state):
    rec = JobRecord(id="job-000001", name="x", state=state, spec=b"")
    d = rec.to_dict()
    assert d["state"] == state.name and CONTRACT_FIELDS <= set(d)


# ---- concurrency --------------------------------------------------------------------------------
THREADS = 8


def run_threads(fn) -> list:
    barrier = threading.Barrier(THREADS)
    results: list = [None] * THREADS
    errors: list = []

    def body(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # collected so a failure is reported, not swallowed by the thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_concurrent_updates_lose_no_writes(backend, db_path):
    store = JobStore(":memory:" if backend == "memory" else db_path)
    job_id = job_in(store, S.RUNNING)
    n = 25

    def worker(i):
        for k in range(n):
            store.record_progress(job_id, k, 0, 0.1, {f"acc_{i}": float(k)}, {"worker": i, "k": k})
            store.add_event(job_id, f"w{i} e{k}")
            store.update_worker(job_id, i, step=k)
            store.update_worker(job_id, 100, **{f"seen_{i}": k})  # all threads merge into one entry

    run_threads(worker)
    rec = store.get(job_id, include_history=True)
    assert rec.history_len == THREADS * n
    assert sorted((h["worker"], h["k"]) for h in rec.history) == [(i, k) for i in range(THREADS) for k in range(n)]
    for i in range(THREADS):  # each thread's own entries keep their order
        assert [h["k"] for h in rec.history if h["worker"] == i] == list(range(n))
    assert len(rec.events) == THREADS * n
    assert rec.metrics == {f"acc_{i}": float(n - 1) for i in range(THREADS)}
    assert rec.workers[100] == {f"seen_{i}": n - 1 for i in range(THREADS)}
    assert {i: rec.workers[i] for i in range(THREADS)} == {i: {"step": n - 1} for i in range(THREADS)}
    store.close()


def test_concurrent_creates_get_unique_ids(store):
    ids = run_threads(lambda i: [store.create(f"t{i}", spec=b"", plan={}).id for _ in range(10)])
    flat = [j for chunk in ids for j in chunk]
    assert sorted(flat) == [f"job-{n:06d}" for n in range(1, THREADS * 10 + 1)]


# Pairs where, once either move happens, neither is allowed any more.
@pytest.mark.parametrize("odd,even", [(S.RUNNING, S.RUNNING), (S.CANCELLED, S.FAILED), (S.FAILED, S.FAILED)])
def test_racing_transitions_exactly_one_wins(store, odd, even):
    job_id = job_in(store, S.PENDING)

    def attempt(i):
        try:
            store.transition(job_id, odd if i % 2 else even, error=f"thread {i}")
            return True
        except InvalidTransition:
            return False

    assert sum(run_threads(attempt)) == 1


def test_two_stores_on_one_file_serialize_transitions(db_path):
    # Read-check-write holds SQLite's write lock, so even two connections (say, an old and
    # a new master process) cannot both move the same job.
    a, b = JobStore(db_path), JobStore(db_path)
    job_id = a.create("x", spec=b"", plan={}).id
    stores = [a, b]

    def attempt(i):
        try:
            stores[i % 2].transition(job_id, S.RUNNING)
            return True
        except InvalidTransition:
            return False

    assert sum(run_threads(attempt)) == 1
    a.close()
    b.close()


# ---- restart recovery ----------------------------------------------------------------------------
def test_recover_after_restart_returns_unfinished_jobs(db_path):
    with JobStore(db_path) as s:
        ids = {state: job_in(s, state) for state in JobState}
    with JobStore(db_path) as s:
        recovered = s.recover_after_restart()
        assert [r.id for r in recovered] == [ids[S.PENDING], ids[S.RUNNING]]
        assert {r.state for r in recovered} == {S.PENDING, S.RUNNING}
        assert s.recover_after_restart() == recovered  # read-only: asking again changes nothing


def test_fail_interrupted_fails_all_unfinished_jobs(db_path):
    with JobStore(db_path) as s:
        ids = {state: job_in(s, state) for state in JobState}
    with JobStore(db_path) as s:
        failed = s.fail_interrupted("no checkpoint to resume from")
        want_error = "master restarted while the job was running: no checkpoint to resume from"
        assert [r.id for r in failed] == [ids[S.PENDING], ids[S.RUNNING]]
        for r in failed:
            assert (r.state, r.error) == (S.FAILED, want_error)
            assert r.events[-1]["text"] == want_error
        assert s.recover_after_restart() == []
        # finished jobs are untouched
        assert s.get(ids[S.SUCCEEDED]).state is S.SUCCEEDED and s.get(ids[S.SUCCEEDED]).error is None
        assert s.get(ids[S.CANCELLED]).state is S.CANCELLED
        assert s.get(ids[S.FAILED]).error == "boom"
    with JobStore(db_path) as s:  # and the failure is itself durable
        assert s.get(ids[S.RUNNING]).error == want_error


def test_fail_interrupted_only_the_given_ids_and_skips_finished(store):
    resumed, lost, done = job_in(store, S.RUNNING), job_in(store, S.RUNNING), job_in(store, S.SUCCEEDED)
    failed = store.fail_interrupted("shard 1 checkpoint missing", ids=[lost, done])
    assert [r.id for r in failed] == [lost]
    assert store.get(resumed).state is S.RUNNING
    assert store.get(done).state is S.SUCCEEDED
