"""Tests for client/progress.py: rendering to plain streams and to a fake terminal, and a
cluster job's progress (WatchView, follow) from its progress records."""
import io

import numpy as np
import pytest

from client.progress import ProgressBar, WatchView, epoch_header, follow, format_metrics, write_epoch_header


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    """A clock the test advances by hand, so timings and throttling are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_bar(stream, clock, total=10, width=10, **kwargs) -> ProgressBar:
    return ProgressBar(total, stream=stream, clock=clock, width=width, **kwargs)


def test_format_metrics_uses_four_decimals_and_keeps_order():
    text = format_metrics({"loss": 0.23123, "accuracy": np.float32(0.93125), "step": 3})
    assert text == "loss: 0.2312 - accuracy: 0.9312 - step: 3"


def test_format_metrics_tiny_values_in_scientific_notation():
    assert format_metrics({"loss": 1.5e-5}) == "loss: 1.5000e-05"
    assert format_metrics({}) == ""


def test_epoch_header():
    assert epoch_header(3, 10) == "Epoch 3/10"
    out = io.StringIO()
    write_epoch_header(1, 2, verbose=1, stream=out)
    write_epoch_header(2, 2, verbose=0, stream=out)
    assert out.getvalue() == "Epoch 1/2\n"


def test_non_tty_prints_only_the_final_line():
    out, clock = io.StringIO(), FakeClock()
    bar = make_bar(out, clock, total=1875, width=30)
    for step in range(1, 1876):
        clock.now += 0.0016
        bar.update(step, loss=0.2312, accuracy=0.9312)
    assert out.getvalue() == ""
    bar.finish()
    assert out.getvalue() == ("1875/1875 [==============================] - 3s 2ms/step"
                              " - loss: 0.2312 - accuracy: 0.9312\n")


def test_finish_appends_validation_metrics():
    out, clock = io.StringIO(), FakeClock()
    bar = make_bar(out, clock)
    bar.update(10, loss=0.5)
    bar.finish(val_loss=0.25, val_accuracy=0.75)
    assert out.getvalue().endswith("- loss: 0.5000 - val_loss: 0.2500 - val_accuracy: 0.7500\n")
    bar.finish(val_loss=1.0)  # a second finish is a no-op
    assert out.getvalue().count("\n") == 1


def test_tty_redraws_in_place_with_bar_and_eta():
    out, clock = FakeTTY(), FakeClock()
    bar = make_bar(out, clock)
    clock.now += 2.0
    bar.update(4, loss=1.0)
    assert out.getvalue() == "\r 4/10 [===>......] - ETA: 3s - loss: 1.0000"
    clock.now += 1.0
    bar.update(5, loss=0.9)
    assert out.getvalue().endswith("\r 5/10 [====>.....] - ETA: 3s - loss: 0.9000")
    assert "\n" not in out.getvalue()


def test_tty_finish_ends_the_line_and_blanks_leftovers():
    out, clock = FakeTTY(), FakeClock()
    bar = make_bar(out, clock)
    bar.update(1, loss=1e12)
    first = out.getvalue()[1:]
    clock.now += 20.0
    bar.update(10, loss=0.1)
    bar.finish()
    final = "10/10 [==========] - 20s 2s/step - loss: 0.1000"
    assert len(final) < len(first)
    assert out.getvalue().split("\r")[-1] == final.ljust(len(first)) + "\n"


def test_tty_throttles_redraws_but_never_drops_the_last_step():
    out, clock = FakeTTY(), FakeClock()
    bar = make_bar(out, clock, total=1000, interval=0.1)
    for step in range(1, 1001):
        clock.now += 0.001  # 1000 steps in 1 s: at most ~10 redraws
        bar.update(step, loss=2.0 / step)
    frames = out.getvalue().split("\r")[1:]
    assert 2 <= len(frames) <= 12
    assert frames[0].startswith("   1/1000 ")
    assert frames[-1].startswith("1000/1000 [==========] - 1s 1ms/step - loss: 0.0020")


def test_verbose_2_prints_one_line_per_epoch_without_bar():
    for stream in (io.StringIO(), FakeTTY()):
        clock = FakeClock()
        bar = make_bar(stream, clock, total=100, verbose=2)
        for step in range(1, 101):
            clock.now += 0.05
            bar.update(step, loss=0.5)
        assert stream.getvalue() == ""
        bar.finish(val_loss=0.4)
        assert stream.getvalue() == "100/100 - 5s - 50ms/step - loss: 0.5000 - val_loss: 0.4000\n"


@pytest.mark.parametrize("stream_type", [io.StringIO, FakeTTY])
def test_verbose_0_prints_nothing(stream_type):
    out = stream_type()
    bar = make_bar(out, FakeClock(), verbose=0)
    for step in range(1, 11):
        bar.update(step, loss=1.0)
    bar.finish(val_loss=1.0)
    assert out.getvalue() == ""


def test_finish_without_updates_reports_a_complete_epoch():
    out = io.StringIO()
    make_bar(out, FakeClock(), total=3).finish()
    assert out.getvalue() == "3/3 [==========] - 0s 0us/step\n"


def test_defaults_to_stdout_at_construction(capsys):
    bar = ProgressBar(2)
    bar.update(2, loss=0.1)
    bar.finish()
    assert capsys.readouterr().out.startswith("2/2 [==============================]")


@pytest.mark.parametrize("kwargs, match", [
    ({"verbose": 3}, "verbose"),
    ({"total_steps": -1}, "total_steps"),
    ({"width": 0}, "width"),
    ({"interval": -1.0}, "interval"),
])
def test_rejects_bad_arguments(kwargs, match):
    args = {"total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        ProgressBar(**args)


# ---- WatchView and follow: a job's progress from the master's records ----------------------------------------
def _status(state="RUNNING", step=0, epoch=0, **metrics):
    return {"id": "job-000001", "state": state, "step": step, "epoch": epoch, "loss": None, "metrics": metrics,
            "updated": 100.0}


def test_watch_view_draws_epochs_with_their_validation_metrics():
    out = io.StringIO()
    view = WatchView(epochs=2, steps_per_epoch=10, stream=out)
    view.update(_status("PENDING"))
    rec = lambda w, step, epoch, t, **m: {"time": t, "worker": w, "step": step, "epoch": epoch, **m}  # noqa: E731
    view.update(_status(step=5), [rec(0, 5, 0, 101.0, loss=1.0, accuracy=0.5), rec(1, 5, 0, 101.0, loss=3.0, accuracy=0.7)])
    # worker 1 ends epoch 0 first; the validating worker 0 follows with val_ metrics
    view.update(_status(step=10, epoch=1), [rec(1, 10, 1, 102.0, loss=0.5, accuracy=0.8)])
    assert "val_accuracy" not in out.getvalue()
    view.update(_status(step=10, epoch=1), [rec(0, 10, 1, 102.0, loss=0.7, accuracy=0.6, val_loss=0.4, val_accuracy=0.9)])
    # epoch 1 runs and ends in one burst, then the "done" reports and the final evaluation
    view.close(_status("SUCCEEDED", step=20, epoch=2, val_accuracy=0.95),
               [rec(0, 20, 2, 104.0, loss=0.2, accuracy=0.9, val_loss=0.2, val_accuracy=0.95), rec(1, 20, 2, 104.0, loss=0.3, accuracy=0.9),
                rec(0, 20, 2, 104.5, loss=0.0), {"time": 105.0, "worker": 0, "step": 20, "epoch": 2, "loss": 0.2, "final": True,
                                                 "val_loss": 0.2, "val_accuracy": 0.95}])
    lines = out.getvalue().splitlines()
    assert lines[0] == "job-000001 is PENDING (waiting for workers and shards)"
    assert lines[1] == "Epoch 1/2"
    assert lines[2].startswith("10/10 [==============================] - 2s 200ms/step")
    assert "loss: 0.6000 - accuracy: 0.7000 - val_loss: 0.4000 - val_accuracy: 0.9000" in lines[2]
    assert lines[3] == "Epoch 2/2"
    assert lines[4].startswith("10/10 [==============================] - 2s 200ms/step")
    assert "loss: 0.2500 - accuracy: 0.9000 - val_loss: 0.2000 - val_accuracy: 0.9500" in lines[4]
    assert len(lines) == 5


def test_watch_view_finishes_a_failed_epoch_where_it_stopped():
    out = io.StringIO()
    view = WatchView(epochs=3, steps_per_epoch=10, stream=out)
    view.update(_status(step=4), [{"time": 1.0, "worker": 0, "step": 4, "epoch": 0, "loss": 1.0}])
    view.close(_status("FAILED", step=4))
    lines = out.getvalue().splitlines()
    assert lines == ["Epoch 1/3", lines[1]] and lines[1].startswith(" 4/10 [===========>")


def test_watch_view_learns_steps_per_epoch_from_the_records():
    out = io.StringIO()
    view = WatchView(epochs=1, steps_per_epoch=None, stream=out)
    view.close(_status("SUCCEEDED", step=7, epoch=1), [{"time": 1.0, "worker": 0, "step": 7, "epoch": 1, "loss": 0.5}])
    assert "7/7 [" in out.getvalue()


class FakeMaster:
    """A master that streams the given watch events, then ends each stream early (as a
    restarting master does) until its statuses run out; records the calls it gets."""

    def __init__(self, streams, statuses):
        self.streams = list(streams)  # one list of (status, records) per watch call
        self.statuses = list(statuses)  # what get() answers, in turn
        self.calls = []

    def watch(self, job_id, since=0):
        self.calls.append(("watch", job_id, since))
        yield from self.streams.pop(0) if self.streams else []

    def get(self, job_id):
        self.calls.append(("get", job_id))
        return self.statuses.pop(0)


def test_follow_watches_again_after_an_early_end_and_closes_the_view(monkeypatch):
    monkeypatch.setattr("client.progress.time.sleep", lambda s: None)
    rec = {"time": 1.0, "worker": 0, "step": 5, "epoch": 1, "loss": 0.5}
    master = FakeMaster(streams=[[(_status(step=2), [dict(rec, step=2, epoch=0)])], [(_status(step=5), [rec])]],
                        statuses=[_status(step=2), _status("SUCCEEDED", step=5, epoch=1)])
    out = io.StringIO()
    final = follow(master, "job-000001", WatchView(epochs=1, steps_per_epoch=5, stream=out))
    assert final["state"] == "SUCCEEDED"
    # the second watch resumes after the one record already seen
    assert master.calls == [("watch", "job-000001", 0), ("get", "job-000001"),
                            ("watch", "job-000001", 1), ("get", "job-000001")]
    lines = out.getvalue().splitlines()
    assert lines[0] == "Epoch 1/1" and lines[1].startswith("5/5 [==============================]")


def test_follow_without_a_view_returns_the_final_status():
    master = FakeMaster(streams=[[(_status("FAILED", step=1), [])]], statuses=[])
    assert follow(master, "job-000001")["state"] == "FAILED"
    assert master.calls == [("watch", "job-000001", 0)]
