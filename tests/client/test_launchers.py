"""Tests for the launcher registry (client/launchers/__init__.py) and how psctl uses it.

A backend registered in the test (``FakeLauncher``: a real in-process launcher that
starts nothing and records its calls) is what ``psctl up|train --launcher fake`` and
``psctl down`` use, with no change to the CLI.
"""
import json
import os
import shutil

import pytest

from client import cli
from client.cli.parser import build_parser
from client.launchers import (
    DEFAULT_LAUNCHER,
    LAUNCHERS,
    STATE_FILE,
    ClusterError,
    ClusterHandle,
    ClusterSpec,
    Launcher,
    LocalProcessLauncher,
    get_launcher,
    launcher_class,
    load_handle,
    register_launcher,
    remove_handle,
    write_handle,
)


class FakeLauncher(Launcher):
    """Starts no process: records each call (on the class, since psctl up and psctl down
    each build their own launcher) and keeps the state file as a real backend does."""

    name = "fake"
    calls: list = []
    fail_start: str | None = None  # a ClusterError message start() raises instead

    def __init__(self, start_timeout: float = 120.0, zone: str | None = None):
        self.calls.append(("init", {"start_timeout": start_timeout, "zone": zone}))

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--fake-zone", help="where the fake cluster runs")

    @classmethod
    def options_from_args(cls, args):
        return {**super().options_from_args(args), "zone": args.fake_zone}

    def start(self, spec):
        self.calls.append(("start", spec))
        if self.fail_start:
            raise ClusterError(self.fail_start)
        handle = ClusterHandle("fake-host:1234", spec.state_dir, spec=spec, launcher=self.name)
        os.makedirs(spec.state_dir, exist_ok=True)
        write_handle(handle)
        return handle

    def stop(self, handle, timeout=10.0):
        self.calls.append(("stop", handle.master_address, timeout))
        remove_handle(handle)

    def status(self, handle):
        self.calls.append(("status", handle.master_address))
        return []


@pytest.fixture
def fake():
    FakeLauncher.calls = []
    FakeLauncher.fail_start = None
    register_launcher(FakeLauncher)
    yield FakeLauncher
    LAUNCHERS.pop(FakeLauncher.name, None)


# ---- the registry ----------------------------------------------------------------------------------------
def test_local_is_registered_and_the_default():
    assert DEFAULT_LAUNCHER == "local" and LAUNCHERS["local"] is LocalProcessLauncher
    assert isinstance(get_launcher(), LocalProcessLauncher)
    launcher = get_launcher("local", start_timeout=7.0)
    assert isinstance(launcher, LocalProcessLauncher) and launcher.start_timeout == 7.0
    assert build_parser().parse_args(["up"]).launcher == "local"
    assert build_parser().parse_args(["train", "j.py"]).launcher == "local"


def test_an_unknown_name_lists_the_known_ones(fake):
    with pytest.raises(ValueError, match=r"unknown launcher 'rya'; known launchers: fake, local"):
        get_launcher("rya")
    with pytest.raises(ValueError, match="unknown launcher"):
        launcher_class("rya")


@pytest.mark.parametrize("command", [["up"], ["train", "j.py"]])
def test_psctl_rejects_an_unknown_launcher_before_doing_anything(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--launcher", "rya"])
    assert e.value.code == 2
    assert "argument --launcher: unknown launcher 'rya'; known launchers: local" in capsys.readouterr().err


def test_register_launcher_checks_what_it_is_given(fake):
    with pytest.raises(TypeError, match="subclass of client.launchers.Launcher"):
        register_launcher(object)

    class Nameless(FakeLauncher):
        name = ""

    with pytest.raises(ValueError, match=r"Nameless.name='' must be a non-empty name"):
        register_launcher(Nameless)

    class Impostor(FakeLauncher):
        pass  # inherits name = "fake"

    with pytest.raises(ValueError, match=r"a launcher named 'fake' is already registered .*give .*Impostor another name"):
        register_launcher(Impostor)
    assert register_launcher(FakeLauncher) is FakeLauncher  # registering the same class again is harmless
    assert LAUNCHERS["fake"] is FakeLauncher


def test_a_registered_launcher_and_its_flags_appear_in_psctl(fake, capsys):
    args = build_parser().parse_args(["up", "--launcher", "fake", "--fake-zone", "eu", "--start-timeout", "3"])
    assert (args.launcher, args.fake_zone, args.start_timeout) == ("fake", "eu", 3.0)
    for command in ("up", "train"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal
        assert "fake | local | ray (default local)" in help_text and "--fake-zone" in help_text


# ---- psctl up / down / train with the fake backend -------------------------------------------------------
def test_psctl_up_and_down_use_the_registered_launcher(fake, tmp_path, capsys):
    state_dir = tmp_path / "cluster"
    code = cli.main(["up", "--launcher", "fake", "--fake-zone", "eu", "--workers", "3", "--ps", "1", "--port", "0",
                     "--start-timeout", "7", "--detach", "--state-dir", str(state_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "pstrain cluster up: master at fake-host:1234 (1 ps shards, 3 workers, device cpu)" in out
    assert "export PSTRAIN_MASTER=fake-host:1234" in out
    (init, options), (start, spec) = fake.calls
    assert (init, options, start) == ("init", {"start_timeout": 7.0, "zone": "eu"}, "start")
    assert (spec.workers, spec.ps, spec.port, spec.state_dir) == (3, 1, 0, str(state_dir))
    assert json.loads((state_dir / STATE_FILE).read_text())["launcher"] == "fake"

    fake.calls.clear()
    assert cli.main(["down", "--state-dir", str(state_dir), "--timeout", "4"]) == 0
    assert "stopped the cluster at fake-host:1234" in capsys.readouterr().out
    assert fake.calls == [("init", {"start_timeout": 120.0, "zone": None}), ("stop", "fake-host:1234", 4.0)]
    assert load_handle(str(state_dir)) is None


def test_psctl_down_of_a_cluster_whose_launcher_is_unknown_says_which(tmp_path, capsys):
    write_handle(ClusterHandle("h:1", str(tmp_path), spec=ClusterSpec(state_dir=str(tmp_path)), launcher="gone"))
    assert cli.main(["down", "--state-dir", str(tmp_path)]) == 2
    assert "psctl: error: unknown launcher 'gone'; known launchers: local" in capsys.readouterr().err
    assert load_handle(str(tmp_path)) is not None  # nothing was stopped, so the state stays


def test_psctl_train_starts_its_cluster_with_the_registered_launcher(fake, tmp_path, capsys):
    jobfile = tmp_path / "job.py"
    jobfile.write_text(
        "from client import nn\nfrom client.job import Job\n"
        "def job():\n"
        "    m = nn.Sequential([nn.Dense(4, activation='relu', input_dim=64), nn.Dense(10, activation='softmax')], seed=1)\n"
        "    m.compile('sgd', 'sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        "    return Job(m, dataset='digits', batch_size=16, epochs=1)\n"
    )
    fake.fail_start = "the fake cluster is out of nodes"
    code = cli.main(["train", str(jobfile), "--launcher", "fake", "--workers", "3", "--ps", "1", "--start-timeout", "9"])
    assert code == 1
    assert "psctl: error: the fake cluster is out of nodes" in capsys.readouterr().err
    (init, options), (start, spec) = fake.calls
    try:
        assert (init, options, start) == ("init", {"start_timeout": 9.0, "zone": None}, "start")
        assert (spec.workers, spec.ps, spec.port) == (3, 1, 0)
        assert os.path.basename(spec.state_dir).startswith("pstrain-train-")
    finally:
        shutil.rmtree(spec.state_dir, ignore_errors=True)
