"""The examples run as documented, and the MNIST example is a valid job file."""
import json
import os
import subprocess
import sys

import pytest

from client.job import Job, load_job_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_graph_api_example_fits_the_line():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "graph_api.py")], capture_output=True, text=True, check=True)
    assert "w = 3.000" in out.stdout and "b = -2.000" in out.stdout


def test_mnist_example_is_a_job_file():
    job = load_job_file(os.path.join(ROOT, "examples", "mnist_mlp.py"))
    assert isinstance(job, Job)
    assert job.dataset == "mnist" and job.epochs == 10 and job.batch_size == 128
    assert [l.name for l in job.model.layers] == ["dense", "dense_1", "dense_2"]


def test_psctl_train_runs_a_job_file_end_to_end(tmp_path):
    jobfile = tmp_path / "job.py"
    jobfile.write_text(
        "from client import nn\n"
        "from client.job import Job\n"
        "def job():\n"
        "    m = nn.Sequential([nn.Dense(16, activation='relu', input_dim=64), nn.Dense(10, activation='softmax')], seed=0)\n"
        "    m.compile(nn.optimizers.Adam(0.01), 'sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        "    return Job(m, dataset='digits', batch_size=32, epochs=3)\n"
    )
    model_path = tmp_path / "model.npz"
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "train", str(jobfile), "-o", str(model_path), "--json"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED" and result["metrics"]["test_accuracy"] > 0.85
    from client import datasets, nn

    d = datasets.load("digits")
    loaded = nn.load_model(model_path)
    assert loaded.evaluate(d.x_test, d.y_test, return_dict=True)["accuracy"] == pytest.approx(result["metrics"]["test_accuracy"])


def test_psctl_reports_a_missing_job_file_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "client.cli", "train", str(tmp_path / "nope.py")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_eager_regression_example_fits_eagerly_and_as_a_traced_step():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "eager_regression.py")],
                         capture_output=True, text=True, check=True)
    assert "pt.function step" in out.stdout and "b = 0.700 (want 0.7)" in out.stdout


def test_eager_regression_example_trains_on_a_local_cluster(tmp_path):
    """The example's documented psctl train: the same loss on 2 workers x 2 shards,
    exported by variable name, near the line the data was drawn from."""
    import numpy as np

    model_path = tmp_path / "reg.npz"
    env = dict(os.environ, PSTRAIN_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "train", os.path.join(ROOT, "examples", "eager_regression.py"),
         "--workers", "2", "--ps", "2", "-o", str(model_path), "--json"],
        capture_output=True, text=True, cwd=ROOT, env=env, check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["state"] == "SUCCEEDED"
    with np.load(model_path) as z:
        assert sorted(z.files) == ["b", "w"]
        np.testing.assert_allclose(z["w"].ravel(), [1.5, -2.0, 0.5, 3.0, -1.0], atol=5e-3)
        np.testing.assert_allclose(z["b"], [0.7], atol=5e-3)
