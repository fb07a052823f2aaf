"""A dependency-free, Keras-style progress bar for ``model.fit`` and friends.

Usage::

    from client.progress import ProgressBar, write_epoch_header
    for epoch in range(epochs):
        write_epoch_header(epoch + 1, epochs, verbose=1)      # "Epoch 1/10"
        bar = ProgressBar(total_steps=1875, verbose=1)
        for step in range(1, 1876):
            ...
            bar.update(step, loss=loss, accuracy=acc)
        bar.finish(val_loss=val_loss, val_accuracy=val_acc)

which ends each epoch with a line like::

    1875/1875 [==============================] - 3s 2ms/step - loss: 0.2312 - accuracy: 0.9312

``verbose=1`` redraws a live bar in place on a terminal (at most ``1 / interval`` times a
second) and, when the stream is not a terminal (a log file, CI output), prints only the
final line, so logs stay readable. ``verbose=2`` prints one line per epoch without the
bar; ``verbose=0`` prints nothing.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
from typing import Any, Callable, Mapping, TextIO


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``{"loss": 0.23123, "accuracy": 0.9312}`` -> ``"loss: 0.2312 - accuracy: 0.9312"``.

    Reals get four decimals (scientific notation when tiny, as Keras does), integers are
    printed whole, anything else with ``str``.
    """
    return " - ".join(f"{name}: {_format_value(value)}" for name, value in metrics.items())


def epoch_header(epoch: int, epochs: int) -> str:
    """``epoch_header(3, 10)`` -> ``"Epoch 3/10"`` (``epoch`` counts from 1)."""
    return f"Epoch {epoch}/{epochs}"


def write_epoch_header(epoch: int, epochs: int, verbose: int = 1,
                       stream: TextIO | None = None) -> None:
    """Print :func:`epoch_header` on its own line unless ``verbose`` is 0."""
    if verbose:
        _write(stream or sys.stdout, epoch_header(epoch, epochs) + "\n")


class ProgressBar:
    """One epoch's progress: call :meth:`update` after each step and :meth:`finish` once.

    Args:
        total_steps: steps in the epoch (``ceil(examples / batch_size)``).
        verbose: 0 silent, 1 progress bar, 2 one line at :meth:`finish`.
        stream: where to write; defaults to ``sys.stdout`` as it is at construction.
        width: characters inside the bar's brackets.
        interval: minimum seconds between live redraws on a terminal.
        clock: monotonic time source in seconds (tests pass a fake one).
    """

    def __init__(self, total_steps: int, verbose: int = 1, stream: TextIO | None = None,
                 width: int = 30, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line "
                             f"per epoch), got {verbose!r}")
        if int(total_steps) != total_steps or total_steps < 0:
            raise ValueError(f"total_steps must be a whole number >= 0, got {total_steps!r}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width!r}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self.total_steps = int(total_steps)
        self.verbose = verbose
        self.stream: TextIO = stream if stream is not None else sys.stdout
        self.width = width
        self.interval = interval
        self._clock = clock
        self._start = clock()
        self._step = 0
        self._metrics: dict[str, Any] = {}
        self._last_draw = -math.inf
        self._drawn_width = 0  # longest line drawn so far, to blank leftovers on redraw
        self._finished = False
        self._dynamic = _is_tty(self.stream)

    def update(self, step: int, **metrics: Any) -> None:
        """Record that ``step`` steps are done and the latest running ``metrics``.

        Redraws the bar only on a terminal with ``verbose=1``, and at most once per
        ``interval`` seconds, except that the last step is always drawn.
        """
        if self._finished:
            return
        self._step = step
        self._metrics.update(metrics)
        if self.verbose != 1 or not self._dynamic:
            return
        now = self._clock()
        if step < self.total_steps and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self._redraw(self._bar_line(final=step >= self.total_steps, now=now), end="")

    def finish(self, **metrics: Any) -> None:
        """Print the epoch's final line, with extra ``metrics`` (e.g. ``val_loss``) appended.

        The line reports the last step given to :meth:`update` (``total_steps`` if none
        was). Calling it again does nothing.
        """
        if self._finished:
            return
        self._finished = True
        self._metrics.update(metrics)
        if not self._step:
            self._step = self.total_steps
        now = self._clock()
        if self.verbose == 1:
            line = self._bar_line(final=True, now=now)
            if self._dynamic:
                self._redraw(line, end="\n")
            else:
                _write(self.stream, line + "\n")
        elif self.verbose == 2:
            elapsed = now - self._start
            parts = [self._counter(), _format_seconds(elapsed), self._per_step(elapsed)]
            if self._metrics:
                parts.append(format_metrics(self._metrics))
            _write(self.stream, " - ".join(parts) + "\n")

    # -- rendering ------------------------------------------------------------------------

    def _bar_line(self, final: bool, now: float) -> str:
        elapsed = now - self._start
        head = f"{self._counter()} [{self._bar()}]"
        if final:
            parts = [f"{head} - {_format_seconds(elapsed)} {self._per_step(elapsed)}"]
        else:
            remaining = max(self.total_steps - self._step, 0)
            eta = elapsed / self._step * remaining if self._step > 0 else 0.0
            parts = [head, f"ETA: {_format_eta(eta)}"]
        if self._metrics:
            parts.append(format_metrics(self._metrics))
        return " - ".join(parts)

    def _counter(self) -> str:
        digits = len(str(self.total_steps))
        return f"{self._step:>{digits}}/{self.total_steps}"

    def _bar(self) -> str:
        done = 1.0 if self.total_steps == 0 else min(self._step / self.total_steps, 1.0)
        filled = int(self.width * done)
        if filled == 0:
            return "." * self.width
        tip = "=" if done >= 1.0 else ">"
        return "=" * (filled - 1) + tip + "." * (self.width - filled)

    def _per_step(self, elapsed: float) -> str:
        per_step = elapsed / self._step if self._step > 0 else 0.0
        if per_step >= 1:
            return f"{per_step:.0f}s/step"
        if per_step >= 1e-3:
            return f"{per_step * 1e3:.0f}ms/step"
        return f"{per_step * 1e6:.0f}us/step"

    def _redraw(self, line: str, end: str) -> None:
        padded = line.ljust(self._drawn_width)
        self._drawn_width = max(self._drawn_width, len(line))
        _write(self.stream, "\r" + padded + end)


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4f}" if abs(number) > 1e-3 else f"{number:.4e}"


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.0f}s"


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    if seconds >= 60:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds}s"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    flush = getattr(stream, "flush", None)
    if flush is not None:
        flush()
