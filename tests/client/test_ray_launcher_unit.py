"""The Ray launcher's pure parts, without a Ray cluster: options and flags, the
placement bundles, the message for bundles no node can hold, port pinning in argv, and
the file_sd targets file (the real-Ray tests are in tests/ray/)."""
from __future__ import annotations

import json

import pytest

from client.cli.parser import build_parser
from client.launchers import ClusterHandle, ClusterSpec, RayLauncher, launcher_class, write_scrape_targets
from client.launchers.ray_cluster import _argv_set, _ray_error, actor_name


def test_ray_is_a_registered_launcher_whose_flags_reach_its_options(tmp_path):
    args = build_parser().parse_args(["up", "--launcher", "ray", "--ray-address", "auto", "--ray-spread",
                                      "--ray-worker-cpus", "0.5", "--ray-worker-gpus", "2", "--ray-max-restarts", "-1",
                                      "--detach", "--ray-namespace", "team-a"])
    cls = launcher_class(args.launcher)
    assert cls is RayLauncher and not cls.restartable and cls.elastic
    options = cls.options_from_args(args)
    assert options["ray_address"] == "auto" and options["spread"] and options["detached"]
    assert options["cpus"] == {"master": 0.5, "ps": 0.5, "worker": 0.5} and options["worker_gpus"] == 2.0
    launcher = cls(**options)
    assert (launcher.namespace, launcher.max_restarts) == ("team-a", -1)
    train = build_parser().parse_args(["train", "job.py", "--launcher", "ray"])
    assert cls.options_from_args(train)["detached"] is False and cls.options_from_args(train)["ray_address"] is None


@pytest.mark.parametrize("kw, words", [
    ({"cpus": {"worker": -1}}, "--ray-worker-cpus=-1 is out of range"),
    ({"worker_gpus": 100}, "--ray-worker-gpus=100 is out of range"),
    ({"max_restarts": -2}, "--ray-max-restarts=-2"),
])
def test_bad_options_are_refused_naming_the_flag(kw, words):
    with pytest.raises(ValueError, match=words):
        RayLauncher(**kw)


def test_bundles_follow_roles_and_devices(tmp_path):
    launcher = RayLauncher(cpus={"master": 0.1, "ps": 0.2, "worker": 0.5})
    cpu = launcher.bundles(ClusterSpec(workers=2, ps=1, state_dir=str(tmp_path)))
    assert cpu == [("master-0", {"CPU": 0.1}), ("ps-0", {"CPU": 0.2}), ("worker-0", {"CPU": 0.5}),
                   ("worker-1", {"CPU": 0.5})]
    cuda = dict(launcher.bundles(ClusterSpec(workers=1, ps=1, device="cuda", state_dir=str(tmp_path))))
    assert cuda["worker-0"] == {"CPU": 0.5, "GPU": 1.0} and cuda["ps-0"] == {"CPU": 0.2}
    none = dict(RayLauncher(worker_gpus=0).bundles(ClusterSpec(workers=1, ps=1, device="cuda", state_dir=str(tmp_path))))
    assert none["worker-0"] == {"CPU": 1.0}


class _FakeRay:
    def __init__(self, nodes):
        self._nodes = nodes

    def nodes(self):
        return [{"Alive": True, "Resources": r} for r in self._nodes]


def test_the_unplaceable_message_names_the_bundles_no_node_can_hold(tmp_path):
    launcher = RayLauncher(worker_gpus=4, start_timeout=8)
    bundles = launcher.bundles(ClusterSpec(workers=2, ps=1, state_dir=str(tmp_path)))
    text = launcher._unplaceable(_FakeRay([{"CPU": 2.0, "GPU": 1.0, "memory": 1e9}]), bundles)
    assert text.startswith("Ray could not place the cluster within 8s: no Ray node can hold bundles worker-0")
    assert "worker-1 {'CPU': 1.0, 'GPU': 4}" in text and "the nodes have: CPU 2, GPU 1" in text, text
    # Each fits a node, but not all at once (the rest is taken): say so rather than name one.
    fits = RayLauncher().bundles(ClusterSpec(workers=2, ps=2, state_dir=str(tmp_path)))
    text = RayLauncher()._unplaceable(_FakeRay([{"CPU": 1.0}]), fits)
    assert "the bundles together (CPU 3.5) do not fit" in text, text


def test_argv_pinning_and_names():
    assert _argv_set(["--port", "0", "--db", "x"], "--port", "4100") == ["--port", "4100", "--db", "x"]
    assert _argv_set(["--db", "x"], "--host", "10.0.0.2") == ["--db", "x", "--host", "10.0.0.2"]
    assert actor_name("ab12cd34", "ps", 3) == "pstrain-ab12cd34-ps-3"

    class Wrapped(Exception):
        cause = RuntimeError("Traceback...\n  File x\nprotos.settings.ServiceStartError: worker: error: no GPU")

    assert _ray_error(Wrapped()) == "protos.settings.ServiceStartError: worker: error: no GPU"


def test_scrape_targets_list_every_live_role_with_stable_labels(tmp_path):
    handle = ClusterHandle(master_address="10.0.0.1:50051", state_dir=str(tmp_path), metrics_address="10.0.0.1:9464")
    path = write_scrape_targets(handle, [
        {"role": "worker", "index": 1, "name": "worker-1", "alive": True, "metrics_address": "10.0.0.3:9100"},
        {"role": "ps", "index": 0, "name": "", "alive": True, "metrics_address": "10.0.0.2:9200"},
        {"role": "worker", "index": 0, "name": "worker-0", "alive": False, "metrics_address": "10.0.0.4:9100"},
        {"role": "worker", "index": 2, "name": "worker-2", "alive": True, "metrics_address": ""},
    ])
    with open(path) as f:
        groups = json.load(f)
    assert groups == [
        {"targets": ["10.0.0.1:9464"], "labels": {"role": "master", "node": "master"}},
        {"targets": ["10.0.0.2:9200"], "labels": {"role": "ps", "node": "ps-0"}},
        {"targets": ["10.0.0.3:9100"], "labels": {"role": "worker", "node": "worker-1"}},
    ]
