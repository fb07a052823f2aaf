"""Unit tests for psctl (the client/cli package) and the job helpers it uses (client/job.py):
argument parsing, master address rules, errors without a master, job specs, exported
models, plan rendering and status formatting. None of these need the services."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from client import cli, nn
from client.cli.cluster import down_command, up_command
from client.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE, CommandError, connect_timeout, master_client
from client.cli.formatting import format_nodes, format_record, format_status, format_table
from client.cli.jobs import (
    cancel_command,
    export_command,
    list_command,
    logs_command,
    nodes_command,
    scale_command,
    status_command,
    submit_command,
)
from client.cli.parser import build_parser
from client.cli.plan import SHARD_COLORS, WORKER_COLOR, _q, plan_command, plan_to_dot, render_png
from client.cli.train import train_command
from client.job import Job, job_to_spec, load_job_file, model_from_export, save_export
from graph.core import Graph
from protos import codec, jobcodec
from pstrain.transport.ports import unused_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST_JOB = os.path.join(ROOT, "examples", "mnist_mlp.py")


def parse(*argv):
    return build_parser().parse_args(list(argv))


def _small_model(input_dim=8, seed=0) -> nn.Sequential:
    m = nn.Sequential([nn.Dense(5, activation="relu", input_dim=input_dim), nn.Dense(3, activation="softmax")], seed=seed)
    m.compile(nn.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


# ---- parsing ---------------------------------------------------------------------------------------------
def test_parse_up_and_down():
    a = parse("up", "--workers", "3", "--ps", "1", "--port", "0", "--device", "auto", "--detach", "--state-dir", "/tmp/x")
    assert (a.func, a.workers, a.ps, a.port, a.device, a.detach, a.state_dir) == (up_command, 3, 1, 0, "auto", True, "/tmp/x")
    a = parse("up")
    assert (a.workers, a.ps, a.port, a.device, a.detach, a.state_dir) == (2, 2, 50051, "cpu", False, None)
    a = parse("down", "--state-dir", "d")
    assert (a.func, a.state_dir) == (down_command, "d")


def test_parse_submit():
    a = parse("submit", "job.py", "--mode", "ssp", "--staleness", "3", "--epochs", "4", "--batch-size", "64",
              "--workers", "2", "--shards", "1", "--wait", "--json", "--name", "n")
    assert a.func is submit_command
    assert (a.jobfile, a.mode, a.staleness, a.epochs, a.batch_size, a.num_workers, a.num_shards, a.wait, a.json, a.name) \
        == ("job.py", "ssp", 3, 4, 64, 2, 1, True, True, "n")
    a = parse("submit", "job.py")
    assert (a.mode, a.staleness, a.epochs, a.batch_size, a.num_workers, a.wait, a.json) == (None,) * 5 + (False, False)


@pytest.mark.parametrize("argv", [
    ("submit", "job.py", "--mode", "hogwild"), ("submit", "job.py", "--batch-size", "0"),
    ("submit", "job.py", "--staleness", "-1"), ("up", "--workers", "0"), ("export", "job-1"), ("status",),
    ("train", "j.py", "--device", "tpu"),
])
def test_parse_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_parse_job_commands():
    for name, func in (("status", status_command), ("cancel", cancel_command)):
        a = parse(name, "job-000001", "--json")
        assert (a.func, a.job, a.json) == (func, "job-000001", True)
    assert parse("list", "--json").func is list_command
    a = parse("logs", "job-1", "-f")
    assert (a.func, a.job, a.follow) == (logs_command, "job-1", True)
    assert parse("logs", "job-1").follow is False
    a = parse("export", "job-1", "-o", "m.npz")
    assert (a.func, a.job, a.output) == (export_command, "job-1", "m.npz")
    assert parse("nodes", "--json").func is nodes_command
    a = parse("scale", "job-1", "--workers", "3")
    assert (a.func, a.job, a.workers, a.json) == (scale_command, "job-1", 3, False)


@pytest.mark.parametrize("argv", [["scale", "job-1"], ["scale", "job-1", "--workers", "0"]])
def test_scale_needs_a_positive_worker_count(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2


def test_parse_train_and_plan():
    a = parse("train", "j.py", "--workers", "3", "--ps", "1", "--mode", "async", "-o", "m.npz", "--json", "--epochs", "2")
    assert (a.func, a.workers, a.ps, a.mode, a.output, a.json, a.epochs, a.in_process) == \
        (train_command, 3, 1, "async", "m.npz", True, 2, False)
    a = parse("plan", "j.py", "--workers", "4", "--ps", "3", "--png", "p.png", "--dot", "p.dot", "--json")
    assert (a.func, a.num_workers, a.num_shards, a.png, a.dot, a.json) == (plan_command, 4, 3, "p.png", "p.dot", True)


def test_global_options_go_before_or_after_the_command():
    a = parse("--master", "h:1", "-v", "--connect-timeout", "2", "list")
    assert (a.master, a.verbose, a.connect_timeout) == ("h:1", True, 2.0)
    a = parse("list", "--master", "h:2", "-v")
    assert (a.master, a.verbose) == ("h:2", True)
    a = parse("list")
    assert (a.master, a.verbose, a.connect_timeout) == (None, None, None)


# ---- master address -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, env, expected", [
    ("flag:1", "env:2", "flag:1"), (None, "env:2", "env:2"), (None, None, "127.0.0.1:50051"),
])
def test_master_address_flag_then_env_then_default(flag, env, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("PSTRAIN_MASTER", raising=False)
    else:
        monkeypatch.setenv("PSTRAIN_MASTER", env)
    argv = (["--master", flag] if flag else []) + ["list"]
    client = master_client(parse(*argv))  # channels connect lazily: nothing is dialled here
    try:
        assert client.address == expected
    finally:
        client.close()


def test_connect_timeout_flag_then_env(monkeypatch):
    monkeypatch.setenv("PSTRAIN_CONNECT_TIMEOUT", "1.5")
    assert connect_timeout(parse("list")) == 1.5
    assert connect_timeout(parse("list", "--connect-timeout", "0.25")) == 0.25
    monkeypatch.setenv("PSTRAIN_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PSTRAIN_CONNECT_TIMEOUT"):
        connect_timeout(parse("list"))


# ---- errors --------------------------------------------------------------------------------------------------
def _write_job(tmp_path, body="Job(m, dataset='synthetic', batch_size=16, epochs=1)"):
    path = tmp_path / "job.py"
    path.write_text(
        "from client import nn\nfrom client.job import Job\n"
        "def job():\n"
        "    m = nn.Sequential([nn.Dense(4, activation='relu', input_dim=8), nn.Dense(2, activation='softmax')], seed=1)\n"
        "    m.compile('sgd', 'sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        f"    return {body}\n"
    )
    return path


def test_submit_to_a_master_that_is_down_fails_cleanly(tmp_path):
    env = dict(os.environ)
    env.pop("PSTRAIN_MASTER", None)
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "submit", str(_write_job(tmp_path)),
         "--master", f"127.0.0.1:{unused_port()}", "--connect-timeout", "0.5"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert out.returncode == EXIT_UNAVAILABLE
    assert "cannot reach the pstrain master" in out.stderr and out.stderr.startswith("psctl: error: ")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["status", "job-1"], "cannot reach the pstrain master"),
    (["submit", "/nonexistent/job.py"], "does not exist"),
])
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    code = cli.main(["--master", f"127.0.0.1:{unused_port()}", "--connect-timeout", "0.2"] + argv)
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err


def test_bad_job_overrides_name_the_field(tmp_path, capsys):
    assert cli.main(["submit", str(_write_job(tmp_path)), "--mode", "ssp", "--workers", "0", "--connect-timeout", "0.2",
                     "--master", f"127.0.0.1:{unused_port()}"]) == EXIT_UNAVAILABLE  # valid overrides reach the master
    code = cli.main(["plan", str(_write_job(tmp_path, "Job(m, dataset='synthetic', mode='sometimes')"))])
    assert code == EXIT_USAGE and "Job.mode='sometimes'" in capsys.readouterr().err


# ---- Job and JobSpec ------------------------------------------------------------------------------------------
def test_job_validates_new_fields():
    m = _small_model()
    for kwargs, text in (({"mode": "x"}, "Job.mode"), ({"staleness": -1}, "Job.staleness"),
                         ({"num_workers": -1}, "Job.num_workers"), ({"num_shards": -2}, "Job.num_shards")):
        with pytest.raises(ValueError, match=text):
            Job(m, **kwargs)
    job = Job(m, mode="ssp", staleness=2, num_workers=3, num_shards=1)
    assert (job.mode, job.staleness, job.num_workers, job.num_shards, job.seed) == ("ssp", 2, 3, 1, m.seed)


def test_job_to_spec_for_the_mnist_example():
    job = load_job_file(MNIST_JOB)
    spec = job_to_spec(job, "mnist_mlp")
    g = spec.model.graph
    m = spec.model
    assert spec.name == "mnist_mlp" and spec.dataset == "mnist"
    for name in (m.features, m.labels, m.loss, m.prediction):
        assert name in g.nodes
    assert g.nodes[m.features].op == g.nodes[m.labels].op == "placeholder"
    assert g.nodes[m.loss].shape == ()
    assert list(m.weight_order) == job.model._weight_names()
    assert all(g.nodes[w].op == "variable" for w in m.weight_order)
    assert [g.nodes[w].shape for w in m.weight_order] == [w.shape for w in job.model.get_weights()]
    assert m.model_config == job.model.get_config()
    t = spec.train
    assert (t.batch_size, t.epochs, t.mode, t.staleness, t.seed, t.shuffle, t.device) == (128, 10, "sync", 0, 0, True, "cpu")
    assert (t.loss_name, list(t.metrics), t.num_workers, t.num_shards) == ("sparse_categorical_crossentropy", ["accuracy"], 0, 0)
    assert t.optimizer["name"] == "sgd"
    # and through the wire: the message the master decodes says the same
    msg = jobcodec.job_spec_to_proto(spec)
    g2 = codec.graph_from_proto(msg.model.graph)
    assert json.loads(msg.model.model_config_json) == job.model.get_config()
    assert (msg.train.mode, msg.train.device, msg.data.dataset) == ("sync", "cpu", "mnist")
    assert json.loads(msg.train.optimizer_json)["name"] == "sgd"
    np.testing.assert_array_equal(g2.initial_values[m.weight_order[0]], job.model.get_weights()[0])
    np.testing.assert_array_equal(g.initial_values[m.weight_order[0]], job.model.get_weights()[0])


def test_job_to_spec_builds_from_the_dataset_and_carries_settings(tmp_path):
    m = nn.Sequential([nn.Dense(4, activation="relu"), nn.Dense(10, activation="softmax")], seed=7)
    m.compile(nn.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    assert not m.built
    job = Job(m, dataset="digits", batch_size=8, epochs=2, mode="ssp", staleness=3, num_workers=2, num_shards=1)
    spec = job_to_spec(job, "d", device="cuda")
    g = spec.model.graph
    assert g.nodes[spec.model.features].shape == (None, 64)  # digits: 8x8 images, flat
    t = spec.train
    assert (t.mode, t.staleness, t.seed, t.num_workers, t.num_shards, t.device) == ("ssp", 3, 7, 2, 1, "cuda")


def test_job_to_spec_sends_npz_paths_absolute(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((20, 8), np.float32), "y_train": rng.integers(0, 2, 20),
              "x_test": rng.random((5, 8), np.float32), "y_test": rng.integers(0, 2, 5)}
    np.savez(tmp_path / "data.npz", **arrays)
    monkeypatch.chdir(tmp_path)
    spec = job_to_spec(Job(_small_model(), dataset="data.npz"), "n")
    assert spec.dataset == str(tmp_path / "data.npz")


# ---- exported models ------------------------------------------------------------------------------------------
def test_save_export_round_trips_through_load_model(tmp_path):
    m = _small_model()
    m.fit(np.random.default_rng(0).random((32, 8)), np.arange(32) % 3, epochs=1, verbose=0)
    config, names, weights = m.get_config(), m._weight_names(), m.get_weights()
    save_export(tmp_path / "model.npz", config, names, weights)
    loaded = nn.load_model(tmp_path / "model.npz")
    for a, b in zip(loaded.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(1).random((4, 8)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x), m.predict(x), rtol=1e-6)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_model_from_export_orders_weights_by_name_and_checks_them():
    m = _small_model()
    names, weights = m._weight_names(), m.get_weights()
    rebuilt = model_from_export(m.get_config(), names[::-1], weights[::-1])
    for a, b in zip(rebuilt.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        model_from_export(m.get_config(), names[:-1] + ["other"], weights)
    with pytest.raises(ValueError, match="format"):
        save_export("unused.npz", {"format": "keras"}, names, weights)
    with pytest.raises(ValueError, match="3 arrays"):
        save_export("unused.npz", m.get_config(), names, weights[:3])


# ---- plan rendering ---------------------------------------------------------------------------------------------
def _plan_graph() -> Graph:
    g = Graph()
    x = g.placeholder((None, 3), "float32", name="x")
    w = g.variable(np.ones((3, 2), np.float32), name="w")
    b = g.variable(np.zeros((2,), np.float32), name="b")
    two = g.constant(2.0, name="two_folded")
    g.reduce_mean(g.square(g.add(x @ w, b)) * two, name="loss")
    return g


# JobPlan.to_dict()'s shape: where slices live and what the passes folded (a data structure,
# not a service).
PLAN = {
    "mode": "sync", "shard_bytes": [16, 16],
    "slices": [{"variable": "w", "key": "w[0:2]", "shard": 0, "start": 0, "stop": 2},
               {"variable": "w", "key": "w[2:3]", "shard": 1, "start": 2, "stop": 3},
               {"variable": "b", "key": "b", "shard": 1, "start": 0, "stop": 2}],
    "forward_passes": {"folded": ["two_folded"]}, "train_passes": {"folded": []},
}


def test_plan_to_dot_colors_by_placement_and_marks_folded_constants():
    dot = plan_to_dot(_plan_graph(), PLAN, grads={"w": "loss"}, num_workers=3)
    assert dot.startswith("digraph plan {") and dot.rstrip().endswith("}")
    assert "subgraph cluster_workers" in dot and "runs on each of 3 workers" in dot
    assert "subgraph cluster_ps0" in dot and "subgraph cluster_ps1" in dot
    ps0 = dot.split("subgraph cluster_ps0")[1].split("}")[0]
    ps1 = dot.split("subgraph cluster_ps1")[1].split("}")[0]
    assert "w[0:2]" in ps0 and "variable (2, 2)" in ps0 and "b\\nvariable (2)" not in ps0
    assert "w[2:3]" in ps1 and "variable (1, 2)" in ps1 and "b\\nvariable (2)" in ps1
    assert SHARD_COLORS[0] in ps0 and SHARD_COLORS[1] in ps1
    workers = dot.split("subgraph cluster_workers")[1].split("}")[0]
    assert "two_folded" in workers and "folded constant" in workers and "dashed" in workers
    assert WORKER_COLOR in workers and "loss" in workers
    ids = {line.split()[0]: line for line in dot.splitlines() if "[label=" in line}
    matmul = next(i for i, line in ids.items() if '"matmul\\nmatmul' in line)
    slices = [i for i, line in ids.items() if '"w[' in line]
    assert all(f"  {s} -> {matmul};" in dot for s in slices)  # each slice is pulled by the matmul
    assert dot.count('label="push"') == 2  # one push per slice of w


def test_dot_strings_are_quoted_and_escaped():
    assert _q('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def test_render_png_without_graphviz_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CommandError, match=r"install graphviz \(apt-get install graphviz\)"):
        render_png("digraph {}", str(tmp_path / "p.png"))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_render_png_writes_a_png(tmp_path):
    render_png(plan_to_dot(_plan_graph(), PLAN), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_without_a_master_plans_locally(tmp_path, capsys):
    pytest.importorskip("master.planner")
    dot = tmp_path / "plan.dot"
    code = cli.main(["plan", MNIST_JOB, "--ps", "3", "--master", f"127.0.0.1:{unused_port()}",
                     "--connect-timeout", "0.2", "--dot", str(dot), "--json"])
    out = capsys.readouterr()
    assert code == 0 and "planning locally for 3 ps shards" in out.err
    plan = json.loads(out.out)
    assert {s["shard"] for s in plan["slices"]} == {0, 1, 2}
    assert dot.read_text().count("subgraph cluster_ps") == 3


def test_plan_shows_a_loss_jobs_folded_constants_once(tmp_path, capsys):
    """2.0 * 3.0 written as graph constants in a loss function: the master folds them;
    the text lists the folded node once and marks it, the DOT draws it dashed."""
    pytest.importorskip("master.planner")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=x.sum(1), x_test=x[:8], y_test=x[:8].sum(1))
    jobfile = tmp_path / "fold.py"
    jobfile.write_text(
        "import numpy as np\nimport pstrain as pt\nfrom client import nn\nfrom client.job import Job\n"
        "w = pt.Variable(np.zeros((3, 1), np.float32), name='w')\n"
        "def loss(x, y):\n"
        "    return pt.reduce_mean(pt.square(pt.constant(2.0) * pt.constant(3.0) * x @ w - y))\n"
        f"def job():\n    return Job(loss, variables=[w], optimizer=nn.optimizers.SGD(0.01), dataset={str(tmp_path / 'd.npz')!r})\n"
    )
    dot = tmp_path / "plan.dot"
    code = cli.main(["plan", str(jobfile), "--master", f"127.0.0.1:{unused_port()}", "--connect-timeout", "0.2",
                     "--dot", str(dot)])
    text = capsys.readouterr().out
    assert code == 0
    assert "folded constants: mul\n" in text and text.count("folded constants") == 1
    assert re.search(r"\[folded\] mul +constant", text)
    node = next(line for line in dot.read_text().splitlines() if '"mul\\nconstant' in line)
    assert "folded constant" in node and "dashed" in node


# ---- formatting ----------------------------------------------------------------------------------------------
def _status(state="RUNNING", step=0, epoch=0, **metrics):
    return {"id": "job-000001", "state": state, "step": step, "epoch": epoch, "loss": None, "metrics": metrics,
            "updated": 100.0}


def test_formatting_helpers():
    line = format_record({"time": 0, "worker": 1, "step": 10, "epoch": 0, "loss": 0.5, "accuracy": 0.25})
    assert line.endswith("worker 1 epoch 0 step 10 - loss: 0.5000 - accuracy: 0.2500")
    table = format_table([{"id": "job-000001", "name": "n", "state": "RUNNING", "epoch": 1, "step": 5, "loss": 0.5,
                           "metrics": {"accuracy": 0.75}}])
    assert table.splitlines()[0].split() == ["ID", "NAME", "STATE", "EPOCH", "STEP", "LOSS", "ACCURACY"]
    assert table.splitlines()[1].split() == ["job-000001", "n", "RUNNING", "1", "5", "0.5000", "0.7500"]
    text = format_status({**_status(), "name": "n", "error": "boom", "created": 0, "workers": {}})
    assert "job-000001  n  RUNNING" in text and "error: boom" in text
    workers = {"1": {"node": "worker-b", "state": "running", "step": 40, "step_time": 0.0021, "owner_epoch": 1,
                     "note": "w1 lost at step 37; continues on w0 from step 37"},
               "0": {"node": "worker-a", "state": "done", "step": 40, "step_time": 0.0, "owner_epoch": 0, "note": ""}}
    lines = format_status({**_status(), "workers": workers}).splitlines()
    assert lines[-2:] == ["  worker 0: done on worker-a, step 40",
                          "  worker 1: running on worker-b, step 40, 2.1 ms/step; moved 1 time "
                          "(last: w1 lost at step 37; continues on w0 from step 37)"]


def test_format_nodes_lists_shards_first_with_restarts():
    nodes = [{"node_id": "worker-b", "role": "worker", "address": "", "index": 2, "alive": True, "last_seen": 0.21,
              "name": "worker-1", "metrics_address": "", "restarts": 1},
             {"node_id": "ps-a", "role": "ps", "address": "127.0.0.1:5001", "index": 0, "alive": False,
              "last_seen": 12.0, "name": "", "metrics_address": "", "restarts": 0}]
    lines = [line.split() for line in format_nodes(nodes).splitlines()]
    assert lines[0] == ["ROLE", "INDEX", "NAME", "ADDRESS", "STATE", "LAST", "SEEN", "RESTARTS"]
    assert lines[1] == ["ps", "0", "-", "127.0.0.1:5001", "lost", "12.0s", "ago", "0"]
    assert lines[2] == ["worker", "2", "worker-1", "-", "alive", "0.2s", "ago", "1"]


def test_every_command_help_ends_with_examples_that_parse():
    """Each psctl command's --help ends with one or two examples, and each example is
    a command line the parser takes."""
    from client.cli.parser import EXAMPLES

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help().rstrip()
        lines = text.splitlines()
        assert 1 <= len(EXAMPLES[name]) <= 2
        assert lines[-len(EXAMPLES[name]) - 1:] == ["examples:"] + [f"  {e}" for e in EXAMPLES[name]], name
        for example in EXAMPLES[name]:
            argv = example.split()[1:]
            assert argv[0] == name
            parser.parse_args(argv)
