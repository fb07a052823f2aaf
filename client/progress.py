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

A job on a cluster is drawn the same way, from the master's progress records, by
:class:`WatchView`; :func:`follow` feeds it until the job ends::

    status = follow(MasterClient("127.0.0.1:50051"), "job-000001", WatchView(epochs=5, steps_per_epoch=None))
"""
from __future__ import annotations

import math
import numbers
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TextIO

if TYPE_CHECKING:  # only for type hints: a model's fit() must not load gRPC
    from pstrain.transport.master_client import MasterClient

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")  # job states after which nothing changes


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


# ---- a job on a cluster ------------------------------------------------------------------
class WatchView:
    """Draws a job's progress as Keras-style epochs and progress bars, from the progress
    records of WatchJob (every worker report, in order) plus the job's state.

    A record's ``step`` is global (``epoch * steps_per_epoch + i``) and its ``epoch``
    counts completed epochs: the report that ends epoch ``e`` has ``epoch = e + 1`` and
    ``step = (e + 1) * steps_per_epoch``, and the validating worker adds ``val_`` metrics
    to it. An epoch's bar is finished once its ``val_`` metrics arrive (or a later epoch
    completes, or the job ends). Running metrics are averaged over workers, and times
    come from the records, so a bar drawn late (a fast epoch) still shows real step times.

    Usage (what :func:`follow` does)::

        view = WatchView(epochs=5, steps_per_epoch=469)
        for status, records in client.watch(job_id):
            view.update(status, records)
        view.close(client.get(job_id))
    """

    META = ("time", "worker", "step", "epoch", "final", "steps_per_epoch")

    def __init__(self, epochs: int, steps_per_epoch: int | None, verbose: int = 1, stream: TextIO | None = None):
        self.epochs = int(epochs)
        self.spe = steps_per_epoch
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self._shown = -1  # last epoch whose bar is finished
        self._bar: ProgressBar | None = None
        self._completed = 0  # epochs some worker has finished
        self._steps: dict[int, int] = {}  # epoch -> furthest step into it
        self._running: dict[int, dict] = {}  # epoch -> worker -> running metrics
        self._val: dict[int, dict] = {}  # epoch -> val_ metrics
        self._first: dict[int, float] = {}  # epoch -> time of its first record
        self._last: dict[int, float] = {}  # epoch -> time of its latest record
        self._now = 0.0  # what the open bar's clock reads
        self._started: float | None = None  # the job's last change when first seen (~ its start)
        self._said_pending = False

    def update(self, status: Mapping[str, Any], history: Iterable[Mapping] = ()) -> None:
        for rec in history:
            self._ingest(rec)
        if not self.verbose:
            return
        if status["state"] == "PENDING" and not self._said_pending:
            print(f"{status['id']} is PENDING (waiting for workers and shards)", file=self.stream, flush=True)
            self._said_pending = True
        if status["state"] in ("PENDING", "RUNNING") and self._started is None:
            self._started = float(status.get("updated") or 0.0) or None
        self._draw(ended=status["state"] in TERMINAL)

    def close(self, status: Mapping[str, Any], history: Iterable[Mapping] = ()) -> None:
        """The job ended: finish the open bar."""
        self.update(status, history)
        if self.verbose:
            self._draw(ended=True)

    def _ingest(self, rec: Mapping[str, Any]) -> None:
        metrics = {k: v for k, v in rec.items() if k not in self.META}
        if rec.get("final") or (set(metrics) <= {"loss"} and not metrics.get("loss")):
            return  # the final evaluation, or a worker's "done" report: not epoch progress
        if isinstance(rec.get("steps_per_epoch"), int) and rec["steps_per_epoch"] > 0:
            self.spe = rec["steps_per_epoch"]
        epoch, step = int(rec.get("epoch", 0)), int(rec.get("step", 0))
        if self.spe is None and epoch == 1:
            self.spe = step  # the first record of epoch 1 ends epoch 0, at step 1 * steps_per_epoch
            if self._bar is not None:
                self._bar.total_steps = step
        ends_epoch = self.spe is not None and epoch >= 1 and step == epoch * self.spe
        k = epoch - 1 if ends_epoch else epoch
        in_epoch = step - k * self.spe if self.spe else step
        if self.spe:
            in_epoch = min(max(in_epoch, 0), self.spe)
        self._steps[k] = max(self._steps.get(k, 0), in_epoch)
        t = float(rec.get("time") or time.time())
        self._first.setdefault(k, t)
        self._last[k] = max(self._last.get(k, t), t)
        running = {n: v for n, v in metrics.items() if not n.startswith(("val_", "test_"))}
        if running:
            self._running.setdefault(k, {})[rec.get("worker", 0)] = running
        val = {n: v for n, v in metrics.items() if n.startswith("val_")}
        if val and ends_epoch:
            self._val[k] = val
        self._completed = max(self._completed, epoch)

    def _metrics(self, k: int) -> dict:
        per_worker = list(self._running.get(k, {}).values())
        names = list(dict.fromkeys(n for m in per_worker for n in m))
        return {n: sum(m[n] for m in per_worker if n in m) / sum(1 for m in per_worker if n in m) for n in names}

    def _draw(self, ended: bool) -> None:
        while self._shown + 1 < self.epochs:
            k = self._shown + 1
            if self._bar is None:
                if k not in self._steps and self._completed <= k:
                    return  # nothing to show for epoch k yet
                write_epoch_header(k + 1, self.epochs, self.verbose, self.stream)
                # Epoch k starts when epoch k - 1 ends (epoch 0: at its first report).
                self._now = self._last.get(k - 1) or self._first.get(k) or time.time()
                if k == 0 and self._started is not None:
                    self._now = min(self._now, self._started)
                self._bar = ProgressBar(self.spe or 0, verbose=self.verbose, stream=self.stream,
                                        clock=lambda: self._now)
            done = self._completed > k
            step = self.spe if done and self.spe else self._steps.get(k, 0)
            self._now = max(self._now, self._last.get(k, self._now))
            self._bar.update(step, **self._metrics(k))
            if not (ended or (done and (k in self._val or self._completed > k + 1))):
                return  # epoch k is still running, or its validation metrics are on the way
            self._bar.finish(**self._val.get(k, {}))
            self._bar, self._shown = None, k
            if ended and not done:
                return  # the job stopped in the middle of epoch k


def follow(client: MasterClient, job_id: str, view: WatchView | None = None) -> dict:
    """Watch ``job_id`` until it ends, drawing its progress on ``view`` if given;
    returns its final status (a dict with ``id``, ``state``, ``loss``, ``metrics``, ...).

    >>> follow(MasterClient("127.0.0.1:50051"), "job-000001")["state"]  # doctest: +SKIP
    'SUCCEEDED'
    """
    seen, status = 0, None
    while True:
        for status, history in client.watch(job_id, since=seen):
            seen += len(history)
            if view is not None:
                view.update(status, history)
        if status is None or status["state"] not in TERMINAL:
            # The stream ended early (e.g. the master restarted): look again.
            status = client.get(job_id)
        if status["state"] in TERMINAL:
            if view is not None:
                view.close(status)
            return status
        time.sleep(0.5)


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
