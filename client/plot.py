"""Loss and accuracy curves from a job's recorded history (``psctl plot``, ``psctl train --plot``).

A job's history is the master's list of progress records, one per worker report::

    {"time": 1.7e9, "worker": 0, "step": 28, "epoch": 1, "loss": 0.41, "accuracy": 0.88,
     "val_loss": 0.35, "val_accuracy": 0.90}

``step`` is global and ``epoch`` counts completed epochs; the report that ends an epoch
carries the validation metrics (from one worker), and the last record (``final: true``)
holds the final model's evaluation. Usage::

    curves = history_curves(records)          # pure: lists of numbers
    plot_history(records, "curves.png", title="digits_mlp (job-1)")
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

TRAIN_METRICS = ("loss", "accuracy")
VAL_METRICS = ("val_loss", "val_accuracy")
# 12 x 5 inches at 100 dpi: 1200 x 500 px, two panels side by side.
FIGSIZE, DPI = (12.0, 5.0), 100


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def history_curves(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """The curves to draw from a job's history records.

    Returns ``{"loss": c, "accuracy": c, "val_loss": v, "val_accuracy": v}``: each ``c``
    is ``{"step": [...], "value": [...]}``, the training metric averaged over the workers
    that reported it at the same step, sorted by step; each ``v`` also has ``"epoch"``:
    one point per completed epoch that carries the validation metric (the ``final``
    evaluation is left out), sorted by epoch. A curve with no points has empty lists.
    Values that are missing, non-numeric or not finite are skipped.

    >>> history_curves([{"worker": 0, "step": 5, "epoch": 1, "loss": 1.0, "val_loss": 0.9},
    ...                 {"worker": 1, "step": 5, "epoch": 1, "loss": 3.0}])["loss"]
    {'step': [5], 'value': [2.0]}
    """
    train: dict[str, dict[int, list[float]]] = {name: {} for name in TRAIN_METRICS}
    val: dict[str, dict[int, tuple[int, float]]] = {name: {} for name in VAL_METRICS}
    for rec in records:
        if rec.get("final"):
            continue  # the final model's evaluation: not a point on the training curves
        step = _number(rec.get("step"))
        if step is None:
            continue
        for name in TRAIN_METRICS:
            value = _number(rec.get(name))
            if value is not None:
                train[name].setdefault(int(step), []).append(value)
        epoch = _number(rec.get("epoch"))
        for name in VAL_METRICS:
            value = _number(rec.get(name))
            if value is not None and epoch is not None:
                val[name][int(epoch)] = (int(step), value)  # a repeated epoch: its latest report wins
    curves: dict[str, dict[str, list]] = {}
    for name, by_step in train.items():
        steps = sorted(by_step)
        curves[name] = {"step": steps, "value": [sum(by_step[s]) / len(by_step[s]) for s in steps]}
    for name, by_epoch in val.items():
        epochs = sorted(by_epoch)
        curves[name] = {"epoch": epochs, "step": [by_epoch[e][0] for e in epochs],
                        "value": [by_epoch[e][1] for e in epochs]}
    return curves


def _panel(ax, curves: Mapping[str, Mapping[str, list]], metric: str, label: str) -> bool:
    train, val = curves[metric], curves[f"val_{metric}"]
    drawn = False
    if train["step"]:
        ax.plot(train["step"], train["value"], color="#1f77b4", linewidth=1.5, label=f"train {metric}")
        drawn = True
    if val["step"]:
        ax.plot(val["step"], val["value"], color="#d62728", linewidth=1.5, marker="o", markersize=5,
                label=f"validation {metric} (epoch end)")
        drawn = True
    ax.set_title(label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, f"no {metric} recorded", transform=ax.transAxes, ha="center", va="center", color="#666666")
    return drawn


def plot_history(records: Iterable[Mapping[str, Any]], path: str, title: str | None = None) -> dict:
    """Draw the loss (left) and accuracy (right) curves of ``records`` to the PNG ``path``
    (1200 x 500 px): training metrics against step, validation metrics at epoch ends.
    Returns the curves (see :func:`history_curves`). Raises ``ValueError`` when the
    records hold no loss or accuracy at all.

    >>> plot_history(client_records, "curves.png", title="digits_mlp (job-1)")  # doctest: +SKIP
    """
    curves = history_curves(records)
    if not any(c["step"] for c in curves.values()):
        raise ValueError("nothing to plot: the history has no loss or accuracy records (a job reports them "
                         "as it trains; wait until it has run a few steps)")
    # The object-oriented API with an explicit Agg canvas: no pyplot, no display, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    _panel(loss_ax, curves, "loss", "Loss")
    _panel(acc_ax, curves, "accuracy", "Accuracy")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=DPI)
    return curves
