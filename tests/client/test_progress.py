"""Tests for client/progress.py: rendering to plain streams and to a fake terminal."""
import io

import numpy as np
import pytest

from client.progress import ProgressBar, epoch_header, format_metrics, write_epoch_header


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
