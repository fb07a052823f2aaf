"""The worker node's handling of heartbeat replies, without a master: a slot asked back
(``release``) before its task even started is released as soon as it starts (bug: the
release was dropped, the slot never moved and ``psctl scale`` waited forever)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

from pstrain.runtime.spec import SlotRef
from worker.config import WorkerConfig
from worker.node import WorkerNode


def _node(monkeypatch) -> tuple[WorkerNode, list]:
    node = WorkerNode(WorkerConfig(master="127.0.0.1:1", metrics_port=-1))
    started = []

    def fake_run(task, slot, released):  # the task thread: record what it was started with
        started.append((slot, released.is_set()))

    monkeypatch.setattr(node, "_run_task", fake_run)
    return node, started


def _task(owner_epoch: int):
    return SimpleNamespace(job="job-1", worker_index=1, owner_epoch=owner_epoch, start_step=40, workers=(0, 1))


def test_a_release_before_the_task_starts_releases_it_on_start(monkeypatch):
    node, started = _node(monkeypatch)
    node._on_heartbeat(SimpleNamespace(tasks=[], cancelled_jobs=[], finished=[],
                                       release=[SlotRef("job-1", 1, 2)]))
    node._start_task(_task(owner_epoch=2))
    node._running[("job-1", 1)][2].join(5)
    assert started == [(SlotRef("job-1", 1, 2), True)]


def test_an_early_release_of_another_assignment_does_not_release_a_newer_one(monkeypatch):
    node, started = _node(monkeypatch)
    node._on_heartbeat(SimpleNamespace(tasks=[], cancelled_jobs=[], finished=[],
                                       release=[SlotRef("job-1", 1, 1)]))
    node._start_task(_task(owner_epoch=2))  # a later hand-over of the same slot
    node._running[("job-1", 1)][2].join(5)
    assert started == [(SlotRef("job-1", 1, 2), False)]


def test_a_release_of_a_running_slot_sets_its_event(monkeypatch):
    node, _ = _node(monkeypatch)
    gate = threading.Event()
    monkeypatch.setattr(node, "_run_task", lambda task, slot, released: gate.wait(5))
    node._start_task(_task(owner_epoch=3))
    node._on_heartbeat(SimpleNamespace(tasks=[], cancelled_jobs=[], finished=[], release=[SlotRef("job-1", 1, 3)]))
    assert node._running[("job-1", 1)][1].is_set()
    gate.set()
