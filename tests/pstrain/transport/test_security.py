"""Who may call what, with real servers on 127.0.0.1: every RPC of the master and of a
shard called without credentials, with a wrong token, and with the wrong kind of
credential is refused (UNAUTHENTICATED / PERMISSION_DENIED) and changes nothing; a
user may cancel, scale or export only their own jobs; mutual TLS with the cluster's
certificates, and a certificate of another CA refused in the handshake; plaintext
refused on addresses other machines reach; token files and certificates 0600."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory

from client import nn
from client.job import Job, job_to_spec
from master.config import MasterConfig
from master.service import serve as serve_master
from protos import master_pb2, ps_pb2
from protos.tensorwire import RAW_SERVICE
from psserver.config import PSConfig
from psserver.service import serve as serve_ps
from pstrain.transport import rpc
from pstrain.transport.master_client import MasterClient
from pstrain.transport.ps_client import ParameterServerClient
from pstrain.transport.security import (
    SERVICE_SECRETS,
    Authenticator,
    Caller,
    Credentials,
    SecurityError,
    TLSFiles,
    UserTokens,
    make_certificates,
    make_cluster_tokens,
    service_credentials,
)

ROOT = Path(__file__).resolve().parents[3]

NODE = Credentials(node_token="node-secret")
WRONG = Credentials(user_token="not-a-token", node_token="not-the-node-token")
NOBODY = Credentials()


@pytest.fixture(scope="module")
def spec():
    model = nn.Sequential([nn.Dense(4, activation="softmax", input_dim=64)], seed=0)
    model.compile(nn.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return job_to_spec(Job(model, dataset="digits", batch_size=16, epochs=1), name="tiny")


@pytest.fixture
def secured(tmp_path, monkeypatch):
    """A master and a shard with node token "node-secret"; users: the admin token
    "admin-secret", alice and bob from the token file."""
    monkeypatch.setenv("PSTRAIN_ADMIN_TOKEN", "admin-secret")
    tokens = str(tmp_path / "tokens.json")
    users = {"alice": UserTokens.add(tokens, "alice"), "bob": UserTokens.add(tokens, "bob")}
    master, mport, coordinator = serve_master(MasterConfig(port=0, db=str(tmp_path / "m.db"), tokens_file=tokens,
                                                           metrics_port=-1), NODE)
    ps, pport, servicer = serve_ps(PSConfig(port=0, metrics_port=-1), NODE)
    clients = []

    class Cluster:
        shard = servicer
        master_address, ps_address = f"127.0.0.1:{mport}", f"127.0.0.1:{pport}"
        admin = Credentials(user_token="admin-secret")
        alice, bob = Credentials(user_token=users["alice"]), Credentials(user_token=users["bob"])

        def master(self, creds):
            c = MasterClient(self.master_address, timeout=5, connect_timeout=5, credentials=creds)
            clients.append(c)
            return c

    yield Cluster()
    for c in clients:
        c.close()
    master.stop(grace=None).wait(5)
    coordinator.close()
    servicer.close()
    ps.stop(grace=None).wait(5)


def _calls(service, address: str, role: str, creds: Credentials):
    """(method name, a callable making that call with an empty request) for every method."""
    channel = rpc.make_channel(address, role, creds)
    for m in service.methods:
        request = message_factory.GetMessageClass(m.input_type)()
        path = f"/{service.full_name}/{m.name}"
        response = message_factory.GetMessageClass(m.output_type)
        if m.server_streaming:
            call = channel.unary_stream(path, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response.FromString)
            yield m.name, lambda call=call, request=request: list(call(request, timeout=5))
        else:
            call = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                       response_deserializer=response.FromString)
            yield m.name, lambda call=call, request=request: call(request, timeout=5)


def _raw_calls(address: str, creds: Credentials):
    channel = rpc.make_channel(address, "ps", creds)
    for name in ("Push", "Attach", "Echo"):
        yield f"raw {name}", lambda name=name: channel.unary_unary(f"/{RAW_SERVICE}/{name}")(b"", timeout=5)


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


MASTER = master_pb2.DESCRIPTOR.services_by_name["Master"]
PS = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
NODE_CALLS = {"RegisterNode", "Heartbeat", "ReportProgress"}


def _state(cluster):
    """Jobs, nodes, and the shard's jobs and segments."""
    admin = cluster.master(cluster.admin)
    return ([(j["id"], j["state"]) for j in admin.list()], [(n["node_id"], n["alive"]) for n in admin.nodes()],
            sorted(cluster.shard.shards), sorted(cluster.shard.segments))


def test_every_rpc_without_valid_credentials_is_refused_and_changes_nothing(secured, spec):
    admin = secured.master(secured.admin)
    job = admin.submit(spec)
    before = _state(secured)
    for creds, expect in ((NOBODY, grpc.StatusCode.UNAUTHENTICATED), (WRONG, grpc.StatusCode.UNAUTHENTICATED)):
        for name, call in _calls(MASTER, secured.master_address, "master", creds):
            assert _refused(call) == expect, f"master {name} with {creds}"
        for name, call in list(_calls(PS, secured.ps_address, "ps", creds)) + list(_raw_calls(secured.ps_address, creds)):
            assert _refused(call) == expect, f"ps {name} with {creds}"
    # The wrong kind: a user token on node calls, the node token on user calls.
    for name, call in _calls(MASTER, secured.master_address, "master", secured.alice):
        if name in NODE_CALLS:
            assert _refused(call) == grpc.StatusCode.PERMISSION_DENIED, name
    # A shard knows no users (only the cluster's node credentials): a user token is no credential there.
    for name, call in list(_calls(PS, secured.ps_address, "ps", secured.alice)) + list(_raw_calls(secured.ps_address, secured.admin)):
        assert _refused(call) == grpc.StatusCode.UNAUTHENTICATED, name
    for name, call in _calls(MASTER, secured.master_address, "master", NODE):
        if name not in NODE_CALLS:
            assert _refused(call) == grpc.StatusCode.PERMISSION_DENIED, name
    assert _state(secured) == before
    assert admin.get(job["id"])["state"] == "PENDING"


def test_refusals_say_what_was_missing(secured):
    with pytest.raises(grpc.RpcError) as info:
        secured.master(NOBODY).list()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "ListJobs needs a user token (PSTRAIN_TOKEN" in info.value.details()
    channel = rpc.make_channel(secured.master_address, "master", secured.alice)
    heartbeat = channel.unary_unary(f"/{MASTER.full_name}/Heartbeat", request_serializer=master_pb2.HeartbeatRequest.SerializeToString,
                                    response_deserializer=master_pb2.HeartbeatResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:
        heartbeat(master_pb2.HeartbeatRequest(node_id="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Heartbeat is a node call; user 'alice' may not make it" in info.value.details()


def test_only_the_submitter_or_an_admin_may_cancel_scale_or_export(secured, spec):
    alice, bob = secured.master(secured.alice), secured.master(secured.bob)
    job = alice.submit(spec)
    assert alice.get(job["id"])["owner"] == "alice" and bob.get(job["id"])["state"] == "PENDING"
    for act in (lambda: bob.cancel(job["id"]), lambda: bob.export(job["id"]), lambda: bob.scale(job["id"], 1)):
        with pytest.raises(grpc.RpcError) as info:
            act()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "user 'bob' may not" in info.value.details() and "only its submitter (alice) or an admin" in info.value.details()
    assert alice.get(job["id"])["state"] == "PENDING"
    assert alice.cancel(job["id"])["state"] == "CANCELLED"
    other = bob.submit(spec)
    assert secured.master(secured.admin).cancel(other["id"])["state"] == "CANCELLED"  # an admin may


def test_a_user_token_created_while_the_master_runs_is_accepted(secured, tmp_path):
    tokens = str(tmp_path / "tokens.json")
    carol = Credentials(user_token=UserTokens.add(tokens, "carol"))
    assert secured.master(carol).list() is not None
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o600
    with open(tokens) as f:
        assert carol.user_token not in f.read()  # only digests are stored


def test_a_revoked_token_is_refused_by_the_running_master(secured, tmp_path):
    """psctl token revoke NAME takes every token of that user out of the master's file;
    the master refuses them from the next call, and the other users keep theirs."""
    tokens = str(tmp_path / "tokens.json")
    second = Credentials(user_token=UserTokens.add(tokens, "alice"))
    assert secured.master(secured.alice).list() is not None and secured.master(second).list() is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSTRAIN_")}

    def token(*args):
        return subprocess.run([sys.executable, "-m", "client.cli", "token", *args, "--tokens-file", tokens], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    listed = token("list")
    assert listed.returncode == 0 and [line.split() for line in listed.stdout.splitlines()] == [
        ["USER", "ADMIN", "TOKENS"], ["alice", "no", "2"], ["bob", "no", "1"]], listed.stdout
    revoked = token("revoke", "alice")
    assert revoked.returncode == 0 and "revoked 2 tokens of 'alice'" in revoked.stdout, revoked.stderr
    for creds in (secured.alice, second):
        with pytest.raises(grpc.RpcError) as refused:
            secured.master(creds).list()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secured.master(secured.bob).list() is not None
    again = token("revoke", "alice")
    assert again.returncode == 2 and "no token of user 'alice'" in again.stderr


def test_tokens_are_checked_in_constant_time_against_digests():
    auth = Authenticator({"/pstrain.Master/ListJobs": "user"}, node_token="n", users=UserTokens("", "adm"))
    caller, code, _ = auth.check("/pstrain.Master/ListJobs", [("authorization", "Bearer adm")], {})
    assert caller.admin and code is None
    caller, code, message = auth.check("/pstrain.Master/Other", [("authorization", "Bearer adm")], {})
    assert caller is None and code == grpc.StatusCode.PERMISSION_DENIED and "not a method" in message


def test_a_service_without_cluster_credentials_does_not_start(monkeypatch):
    for var in ("PSTRAIN_NODE_TOKEN", "PSTRAIN_NODE_TOKEN_FILE", "PSTRAIN_TLS_DIR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SecurityError, match="no cluster credentials: set PSTRAIN_NODE_TOKEN"):
        service_credentials("ps")


def test_plaintext_on_a_reachable_address_is_refused_unless_insecure():
    server = rpc.make_server(max_workers=2)
    with pytest.raises(SecurityError, match="refusing to serve plaintext on 0.0.0.0:0, which other machines can reach"):
        rpc.bind(server, "0.0.0.0", 0)
    assert rpc.bind(server, "0.0.0.0", 0, insecure=True) > 0
    server.stop(None)


# ---- mutual TLS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    good, other = tmp_path_factory.mktemp("tls"), tmp_path_factory.mktemp("other-ca")
    make_certificates(str(good))
    make_certificates(str(other))
    return str(good), str(other)


def test_certificates_are_private(tls):
    good, _ = tls
    assert stat.S_IMODE(os.stat(good).st_mode) == 0o700
    for name in os.listdir(good):
        mode = stat.S_IMODE(os.stat(os.path.join(good, name)).st_mode)
        assert mode == (0o600 if name.endswith(".key") else mode), name


def test_certs_init_gives_a_master_the_admin_token_as_a_digest(tmp_path):
    """Compose's master reads tokens.json (digests only, 0644), never the admin token
    itself, which stays the user's; running certs init again rewrites nothing."""
    d = str(tmp_path / "secrets")
    make_certificates(d)
    written = make_cluster_tokens(d)
    assert sorted(os.path.basename(p) for p in written) == ["admin.token", "node.token", "tokens.json"]
    admin = (tmp_path / "secrets" / "admin.token").read_text().strip()
    users = tmp_path / "secrets" / "tokens.json"
    assert stat.S_IMODE(users.stat().st_mode) == 0o644 and admin not in users.read_text()
    assert UserTokens(str(users)).lookup(admin) == Caller("user", "admin", admin=True)
    before = users.stat().st_ino
    assert make_cluster_tokens(d) == [] and users.stat().st_ino == before
    bob = UserTokens.add(str(users), "bob")  # psctl token create --tokens-file: the file keeps its mode
    assert stat.S_IMODE(users.stat().st_mode) == 0o644
    assert UserTokens(str(users)).lookup(bob) == Caller("user", "bob", admin=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_certs_init_owner_splits_the_files_between_the_services_and_the_user():
    """``sudo psctl certs init DIR --owner 10001``: the services' keys and the node token go
    to uid 10001 (compose's containers), everything else to the user who ran sudo, who then
    reads the files psctl needs, and not the services' keys."""
    base = tempfile.mkdtemp()
    try:
        os.chmod(base, 0o755)
        d = os.path.join(base, "secrets")
        run = subprocess.run([sys.executable, "-m", "client.cli", "certs", "init", d, "--owner", "10001"],
                             cwd=ROOT, env=dict(os.environ, SUDO_UID="23456", SUDO_GID="23457"),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "gave master.key, node.token, ps.key, worker.key to 10001:10001" in run.stdout
        owners = {n: (os.stat(os.path.join(d, n)).st_uid, os.stat(os.path.join(d, n)).st_gid) for n in os.listdir(d)}
        assert {n for n, o in owners.items() if o == (10001, 10001)} == set(SERVICE_SECRETS)
        assert {n for n, o in owners.items() if o != (10001, 10001)} == set(os.listdir(d)) - set(SERVICE_SECRETS)
        assert all(o == (23456, 23457) for n, o in owners.items() if n not in SERVICE_SECRETS), owners
        assert (os.stat(d).st_uid, os.stat(d).st_gid) == (23456, 23457)

        def as_user():
            os.setgroups([])
            os.setgid(23457)
            os.setuid(23456)

        files = ["ca.crt", "user.crt", "user.key", "admin.token", "tokens.json", "master.key", "node.token"]
        probe = subprocess.run(["/bin/sh", "-c", 'for f; do cat "$f" >/dev/null 2>&1 && echo "$f ok" || echo "$f no"; '
                                "done", "sh"] + [os.path.join(d, f) for f in files], preexec_fn=as_user,
                               capture_output=True, text=True, timeout=30)
        seen = dict(line.rsplit(" ", 1) for line in probe.stdout.split("\n") if line)
        assert {os.path.basename(f): v for f, v in seen.items()} == {
            "ca.crt": "ok", "user.crt": "ok", "user.key": "ok", "admin.token": "ok", "tokens.json": "ok",
            "master.key": "no", "node.token": "no"}, probe.stderr
        # Running it again without sudo cannot rewrite the services' keys, and says why.
        from client.cli.security import _not_yours

        said = _not_yours(PermissionError(13, "Permission denied", os.path.join(d, "worker.key")))
        assert "belongs to uid 10001" in said and "run it with sudo" in said, said
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_certs_init_owner_without_root_says_to_use_sudo(tmp_path, monkeypatch, capsys):
    from client.cli.common import CommandError
    from client.cli.parser import build_parser

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    args = build_parser().parse_args(["certs", "init", str(tmp_path / "s"), "--owner", "10001:10002"])
    with pytest.raises(CommandError, match="only root may give files to uid 10001; run it with sudo"):
        args.func(args)
    with pytest.raises(CommandError, match="want UID or UID:GID in numbers"):
        args = build_parser().parse_args(["certs", "init", str(tmp_path / "s"), "--owner", "pstrain"])
        args.func(args)


def test_mutual_tls_end_to_end_and_refusals(tls, monkeypatch, tmp_path):
    """A master and a shard on mutual TLS, listening on every interface: a node
    certificate of the cluster's CA is a node credential; a certificate of another CA
    (or none) is refused in the handshake on every method of both services; the
    cluster's user certificate without a token opens the connection but makes no call."""
    good, other = tls
    monkeypatch.setenv("PSTRAIN_ADMIN_TOKEN", "admin-secret")
    master, mport, coordinator = serve_master(MasterConfig(port=0, db=str(tmp_path / "m.db"), metrics_port=-1,
                                                           host="0.0.0.0"), Credentials(tls=TLSFiles(good, "master")))
    server, port, servicer = serve_ps(PSConfig(port=0, metrics_port=-1, host="0.0.0.0"),
                                      Credentials(tls=TLSFiles(good, "ps")))  # no node token: certificates only
    maddress, address = f"127.0.0.1:{mport}", f"127.0.0.1:{port}"
    try:
        worker = ParameterServerClient(address, timeout=5, credentials=Credentials(tls=TLSFiles(good, "worker")))
        assert worker.echo(b"hi") == b"hi"  # a node certificate of the cluster's CA
        worker.close()
        admin = MasterClient(maddress, timeout=5, connect_timeout=5,
                             credentials=Credentials(user_token="admin-secret", tls=TLSFiles(good, "user")))
        assert admin.list() == []  # the user certificate and a user token
        admin.close()
        user_cert = Credentials(tls=TLSFiles(good, "user"))
        for service, where, role in ((MASTER, maddress, "master"), (PS, address, "ps")):
            for name, call in _calls(service, where, role, user_cert):
                assert _refused(call) == grpc.StatusCode.PERMISSION_DENIED, f"{role} {name} with a user certificate"
        for creds in (Credentials(tls=TLSFiles(other, "worker")), Credentials(tls=TLSFiles(other, "user"),
                                                                             user_token="admin-secret"),
                      Credentials(node_token="x")):
            for service, where, role in ((MASTER, maddress, "master"), (PS, address, "ps")):
                calls = list(_calls(service, where, role, creds))
                if role == "ps":
                    calls += list(_raw_calls(where, creds))
                for name, call in calls:  # refused in the handshake, before any RPC runs
                    assert _refused(call) == grpc.StatusCode.UNAVAILABLE, f"{role} {name} with {creds}"
        assert servicer.shards == {} and coordinator.store.list() == []  # nothing reached either service
    finally:
        servicer.close()
        server.stop(grace=None).wait(5)
        master.stop(grace=None).wait(5)
        coordinator.close()


def test_a_client_that_cannot_connect_is_told_why(tls, tmp_path):
    """Another CA's certificate, plaintext to a TLS master, TLS to a plaintext one and
    nothing listening: each says what went wrong, not just that nobody answered."""
    from pstrain.transport.master_client import MasterUnavailable
    from pstrain.transport.ports import unused_port

    good, other = tls
    servers = []
    try:
        for name, creds in (("tls", Credentials(tls=TLSFiles(good, "master"))), ("plain", Credentials(node_token="n"))):
            server, port, coordinator = serve_master(MasterConfig(port=0, db=str(tmp_path / f"{name}.db"),
                                                                  metrics_port=-1), creds)
            servers.append((server, coordinator))
            if name == "tls":
                tls_address = f"127.0.0.1:{port}"
            else:
                plain_address = f"127.0.0.1:{port}"
        cases = [
            (tls_address, Credentials(user_token="t", tls=TLSFiles(other, "user")), "the TLS handshake with"),
            (tls_address, Credentials(user_token="t"), "closed the connection"),
            (plain_address, Credentials(user_token="t", tls=TLSFiles(good, "user")), "does not speak TLS"),
            (f"127.0.0.1:{unused_port()}", Credentials(user_token="t"), "nothing listens at"),
        ]
        for address, creds, says in cases:
            client = MasterClient(address, timeout=5, connect_timeout=1, credentials=creds)
            with pytest.raises(MasterUnavailable) as caught:
                client.list()
            client.close()
            message = str(caught.value)
            assert message.startswith(f"cannot reach the pstrain master at {address}: ") and says in message, message
            assert ("psctl up" in message) == (says == "nothing listens at"), message
            assert "failed to connect to all addresses" not in message, message
        # psctl itself prints that one line and nothing of gRPC's own logging before it.
        psctl = Path(sys.executable).with_name("psctl")
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        run = subprocess.run([str(psctl), "list", "--master", tls_address, "--connect-timeout", "1"],
                             env=dict(env, PSTRAIN_TLS_DIR=other, PSTRAIN_TOKEN="t"), capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 3 and run.stderr.startswith(
            f"psctl: error: cannot reach the pstrain master at {tls_address}: the TLS handshake with"), run.stderr
        assert len(run.stderr.splitlines()) == 1, run.stderr
    finally:
        for server, coordinator in servers:
            server.stop(grace=None).wait(5)
            coordinator.close()
