"""Tests for client/plot.py and ``psctl plot``: curves from history records, the PNG they
draw, and the command against a real local cluster."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from client.plot import history_curves, plot_history

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPE = 10  # steps per epoch in the synthetic history


def _records(epochs: int = 3, workers: int = 2) -> list[dict]:
    """What the master records for a 2-worker job: a mid-epoch report and an epoch-end report
    per worker and epoch (worker 0 adds val_ metrics at the end), then the final evaluation."""
    recs = []
    for e in range(epochs):
        for step in (e * SPE + SPE // 2, (e + 1) * SPE):
            ends = step == (e + 1) * SPE
            for w in range(workers):
                rec = {"time": 1000.0 + step, "worker": w, "step": step, "epoch": e + 1 if ends else e,
                       "loss": 2.0 - 0.1 * step + 0.1 * w, "accuracy": 0.02 * step + 0.01 * w}
                if ends and w == 0:
                    rec.update(val_loss=1.5 - 0.3 * e, val_accuracy=0.5 + 0.1 * e)
                recs.append(rec)
    recs.append({"time": 2000.0, "worker": 0, "step": epochs * SPE, "epoch": epochs, "final": True,
                 "val_loss": 0.1, "val_accuracy": 0.99})
    return recs


def _read_png(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))  # (height, width, channels) floats in [0, 1]


def _check_png(path, min_width: int = 800, validation: bool = True) -> None:
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = _read_png(path)
    height, width = img.shape[:2]
    assert width >= min_width and height >= 300, img.shape
    rgb = img[..., :3]
    assert rgb.std() > 0.05, "the image is (nearly) one colour"
    dark = rgb.min(axis=2) < 0.9  # not white
    assert dark[:, : width // 2].sum() > 1000, "nothing drawn in the left (loss) panel"
    assert dark[:, width // 2 :].sum() > 1000, "nothing drawn in the right (accuracy) panel"
    # Both curve colours appear: train (blue) and validation (red) lines.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert ((b > 0.5) & (r < 0.3)).sum() > 100, "no train curve"
    if validation:
        assert ((r > 0.6) & (g < 0.3) & (b < 0.3)).sum() > 50, "no validation curve"


# ---- history_curves ----------------------------------------------------------------------------------
def test_history_curves_averages_workers_per_step_and_takes_val_at_epoch_ends():
    recs = _records()
    c = history_curves(reversed(recs))  # order of the records does not matter
    steps = [5, 10, 15, 20, 25, 30]
    assert c["loss"]["step"] == steps and c["accuracy"]["step"] == steps
    np.testing.assert_allclose(c["loss"]["value"], [2.0 - 0.1 * s + 0.05 for s in steps])
    np.testing.assert_allclose(c["accuracy"]["value"], [0.02 * s + 0.005 for s in steps])
    # One validation point per epoch, at the step that ends it; the final evaluation is not one.
    assert c["val_loss"]["epoch"] == [1, 2, 3] and c["val_loss"]["step"] == [10, 20, 30]
    np.testing.assert_allclose(c["val_loss"]["value"], [1.5, 1.2, 0.9])
    assert c["val_accuracy"]["epoch"] == [1, 2, 3]
    np.testing.assert_allclose(c["val_accuracy"]["value"], [0.5, 0.6, 0.7])


def test_history_curves_skips_missing_and_non_finite_values():
    recs = [
        {"worker": 0, "step": 1, "epoch": 0, "loss": 1.0},  # no accuracy (e.g. a regression job)
        {"worker": 1, "step": 1, "epoch": 0, "loss": float("nan")},
        {"worker": 0, "step": 2, "epoch": 0, "loss": "oops", "accuracy": 0.5},
        {"worker": 0, "epoch": 0, "loss": 9.0},  # no step
        {"worker": 0, "step": 3, "epoch": 1, "final": True, "loss": 7.0, "accuracy": 1.0},
    ]
    c = history_curves(recs)
    assert c["loss"] == {"step": [1], "value": [1.0]}
    assert c["accuracy"] == {"step": [2], "value": [0.5]}
    assert c["val_loss"] == {"epoch": [], "step": [], "value": []}


def test_history_curves_of_nothing_is_empty():
    c = history_curves([])
    assert set(c) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert not any(curve["step"] for curve in c.values())


# ---- plot_history ------------------------------------------------------------------------------------
def test_plot_history_writes_a_readable_two_panel_png(tmp_path):
    path = tmp_path / "curves.png"
    curves = plot_history(_records(), str(path), title="synthetic (job-1)")
    assert curves["val_loss"]["epoch"] == [1, 2, 3]
    _check_png(path)
    assert _read_png(path).shape[:2] == (500, 1200)


def test_plot_history_draws_a_job_without_accuracy(tmp_path):
    recs = [{k: v for k, v in r.items() if "accuracy" not in k} for r in _records()]
    path = tmp_path / "loss_only.png"
    plot_history(recs, str(path))
    img = _read_png(path)[..., :3]
    assert img.shape[1] >= 800 and img.std() > 0.05


@pytest.mark.parametrize("records", [[], [{"worker": 0, "step": 3, "epoch": 1, "final": True, "val_loss": 0.2}],
                                     [{"worker": 0, "step": 0, "epoch": 0}]])
def test_plot_history_with_nothing_to_plot_says_so(tmp_path, records):
    path = tmp_path / "empty.png"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_history(records, str(path))
    assert not path.exists()


# ---- psctl plot on a real cluster -------------------------------------------------------------------
def _psctl(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    from client.launchers import ClusterSpec, local_cluster

    # The cluster's processes inherit the environment: no CUDA simulator there.
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    with local_cluster(ClusterSpec(workers=1, ps=1, port=0, state_dir=str(tmp_path / "cluster"))) as handle:
        yield handle.master_address


def _submit_digits(client, epochs: int) -> str:
    from client.job import job_to_spec, load_job_file

    job = load_job_file(os.path.join(ROOT, "examples", "digits_mlp.py"), epochs=epochs)
    return client.submit(job_to_spec(job, "digits_mlp"))["id"]


def _wait_for(client, job_id, done, what: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while not done(status := client.get(job_id)):
        assert status["state"] not in ("FAILED", "CANCELLED"), status
        assert time.monotonic() < deadline, f"{job_id} not {what} after {timeout} s: {status}"
        time.sleep(0.2)
    return status


@pytest.mark.slow
def test_psctl_plot_draws_a_finished_job_and_a_running_one(tmp_path, cluster):
    from pstrain.transport.master_client import MasterClient

    client = MasterClient(cluster)
    try:
        job_id = _submit_digits(client, epochs=3)
        _wait_for(client, job_id, lambda s: s["state"] == "SUCCEEDED", "SUCCEEDED")
        png = tmp_path / "curves.png"
        result = _psctl("--master", cluster, "plot", job_id, "-o", str(png))
        assert result.returncode == 0, result.stderr
        assert str(png) in result.stdout
        _check_png(png)

        # A running job: what it has recorded so far, without waiting for its end.
        long_id = _submit_digits(client, epochs=1000)
        _wait_for(client, long_id, lambda s: s["state"] == "RUNNING" and s["epoch"] >= 2, "two epochs in")
        running = tmp_path / "running.png"
        result = _psctl("--master", cluster, "plot", long_id, "-o", str(running), timeout=60)
        assert result.returncode == 0, result.stderr
        assert client.get(long_id)["state"] == "RUNNING"
        _check_png(running)
        client.cancel(long_id)
    finally:
        client.close()

    missing = _psctl("--master", cluster, "plot", "no-such-job", "-o", str(tmp_path / "x.png"))
    assert missing.returncode != 0
    assert missing.stderr.startswith("psctl: error:") and "no-such-job" in missing.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_psctl_train_writes_the_plot(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    png = tmp_path / "train.png"
    result = _psctl("train", os.path.join(ROOT, "examples", "digits_mlp.py"), "--epochs", "2", "--workers", "1",
                    "--ps", "1", "--plot", str(png), timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"wrote {png}" in result.stdout
    _check_png(png)


def test_psctl_train_in_process_writes_the_plot(tmp_path):
    png = tmp_path / "in_process.png"
    result = _psctl("train", os.path.join(ROOT, "examples", "digits_mlp.py"), "--epochs", "2", "--in-process",
                    "--plot", str(png))
    assert result.returncode == 0, result.stderr
    _check_png(png)
