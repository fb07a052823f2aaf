"""psctl's argument parser: the global options, each command's flags, and the option
helpers commands share. Flags, defaults and help texts are part of the CLI contract
(scripts rely on them); each command's code lives in its own module. Usage::

    args = build_parser().parse_args(["submit", "job.py", "--wait"])
    sys.exit(args.func(args))
"""
from __future__ import annotations

import argparse

from client.cli.cluster import down_command, up_command
from client.cli.jobs import (
    cancel_command,
    export_command,
    list_command,
    logs_command,
    nodes_command,
    plot_command,
    scale_command,
    status_command,
    submit_command,
)
from client.cli.plan import plan_command
from client.cli.security import certs_init_command, token_command
from client.cli.train import train_command
from client.job import MODES
from client.launchers import DEFAULT_LAUNCHER, DEVICES, LAUNCHERS, launcher_class


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _global_options(p: argparse.ArgumentParser, defaults) -> None:
    # On the main parser and on every command, so they may come before or after it;
    # SUPPRESS keeps a command's parser from overwriting a value given before it.
    p.add_argument("--master", metavar="HOST:PORT", default=defaults,
                   help="the master (else $PSTRAIN_MASTER, else 127.0.0.1:50051)")
    p.add_argument("--connect-timeout", type=float, metavar="SECONDS", default=defaults,
                   help="how long to wait for the master to answer (else $PSTRAIN_CONNECT_TIMEOUT, else 5)")
    p.add_argument("-v", "--verbose", action="store_true", default=defaults, help="debug logging")


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, help="how shards apply gradients (default: the job file's)")
    p.add_argument("--staleness", type=_non_negative, help="ssp: how many versions a worker may run ahead")
    p.add_argument("--epochs", type=_non_negative, help="override the job's epochs")
    p.add_argument("--batch-size", type=_positive(int), help="override the job's (global) batch size")


def _launcher_name(text: str) -> str:
    try:
        launcher_class(text)
    except ValueError as exc:  # argparse prints it as "argument --launcher: unknown launcher ..."
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _security_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", help="mutual TLS between every process and psctl: the directory psctl certs init made "
                                     "(else $PSTRAIN_TLS_DIR; default: plaintext, loopback only)")
    p.add_argument("--insecure", action="store_true",
                   help="let services serve plaintext on addresses other machines reach (a network you trust only)")


def _launcher_options(p: argparse.ArgumentParser) -> None:
    # Read from the registry when the parser is built, so a newly registered backend (and
    # its own flags) needs no change here.
    p.add_argument("--launcher", metavar="NAME", type=_launcher_name, default=DEFAULT_LAUNCHER,
                   help=f"the backend that starts the services: {' | '.join(sorted(LAUNCHERS))} (default {DEFAULT_LAUNCHER})")
    for cls in LAUNCHERS.values():
        cls.add_arguments(p)


# One or two examples that end each command's --help.
EXAMPLES = {
    "up": ["psctl up --workers 4 --ps 2 --detach", "psctl up --launcher ray --ray-address auto --detach"],
    "down": ["psctl down", "psctl down --state-dir /tmp/cluster-a"],
    "submit": ["psctl submit examples/mnist_mlp.py --mode sync --wait", "psctl submit job.py --mode ssp --staleness 2 --json"],
    "status": ["psctl status job-000001", "psctl status job-000001 --json"],
    "cancel": ["psctl cancel job-000001"],
    "scale": ["psctl scale job-000001 --workers 1", "psctl scale job-000001 --workers 4 --state-dir ~/.pstrain/cluster"],
    "nodes": ["psctl nodes", "psctl nodes --json --master 10.0.0.5:50051"],
    "list": ["psctl list", "psctl list --json"],
    "logs": ["psctl logs job-000001", "psctl logs job-000001 --follow"],
    "export": ["psctl export job-000001 -o mnist.npz"],
    "train": ["psctl train examples/mnist_mlp.py --workers 2 --ps 2 --plot curves.png",
              "psctl train examples/graph_api.py --in-process -o line.npz"],
    "plot": ["psctl plot job-000001 -o curves.png"],
    "plan": ["psctl plan examples/mnist_mlp.py --ps 2", "psctl plan examples/eager_regression.py --png plan.png"],
    "certs": ["psctl certs init ./tls --host master.example.org --days 90",
              "psctl certs init deploy/secrets --owner 10001"],
    "token": ["psctl token create ops --admin --state-dir /srv/pstrain", "psctl token revoke alice"],
}


def _examples(name: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])


def build_parser() -> argparse.ArgumentParser:
    """psctl's argument parser: global options, then one sub-command per command.

    >>> args = build_parser().parse_args(["up", "--workers", "4", "--detach"])
    >>> args.func(args)  # doctest: +SKIP
    """
    p = argparse.ArgumentParser(prog="psctl", description="pstrain: train neural networks on a parameter-server cluster")
    _global_options(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help):
        c = sub.add_parser(name, help=help, description=help, epilog=_examples(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _global_options(c, argparse.SUPPRESS)
        c.set_defaults(func=func)
        return c

    c = command("up", up_command, "start a local cluster (master, ps shards, workers)")
    c.add_argument("--workers", type=_positive(int), default=2, help="worker processes (default 2)")
    c.add_argument("--ps", type=_positive(int), default=2, help="parameter-server shards (default 2)")
    c.add_argument("--port", type=int, default=50051, help="the master's port (default 50051; 0 picks a free one)")
    c.add_argument("--device", choices=DEVICES, default="cpu", help="workers' kernel backend (default cpu)")
    c.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds before a silent node counts as dead")
    c.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the cluster to come up")
    _launcher_options(c)
    _security_options(c)
    c.add_argument("--detach", action="store_true", help="return once the cluster is up; stop it with psctl down")
    c.add_argument("--state-dir", help="state file, logs and job database (default $PSTRAIN_HOME or ~/.pstrain/cluster)")

    c = command("down", down_command, "stop the cluster started by psctl up")
    c.add_argument("--state-dir", help="as given to psctl up")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per role before SIGKILL (default 10)")

    c = command("submit", submit_command, "submit a job file to the master")
    c.add_argument("jobfile", help="a Python file defining job()")
    _job_options(c)
    c.add_argument("--workers", dest="num_workers", type=_non_negative, help="workers to use (0: all registered)")
    c.add_argument("--shards", dest="num_shards", type=_non_negative, help="ps shards to use (0: all registered)")
    c.add_argument("--name", help="the job's name (default: the job file's name)")
    c.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only if it SUCCEEDED")
    c.add_argument("--json", action="store_true", help="print the job's status as JSON")

    for name, func, help in (("status", status_command, "show a job's status"), ("cancel", cancel_command, "cancel a job")):
        c = command(name, func, help)
        c.add_argument("job", help="the job id (see psctl list)")
        c.add_argument("--json", action="store_true", help="print JSON")

    c = command("scale", scale_command, "change how many worker processes serve a running job")
    c.add_argument("job", help="the job id")
    c.add_argument("--workers", required=True, type=_positive(int),
                   help="worker processes to serve it (1 to the job's worker count; its data split stays the same)")
    c.add_argument("--state-dir", help="the cluster psctl up started (default $PSTRAIN_HOME or ~/.pstrain/cluster): on "
                                       "an elastic launcher (ray), start the workers it lacks and stop idle ones")
    c.add_argument("--json", action="store_true", help="print the job's status as JSON")

    c = command("nodes", nodes_command, "list the cluster's shards and workers (alive, last heartbeat, restarts)")
    c.add_argument("--json", action="store_true", help="print JSON (a list of nodes)")

    c = command("list", list_command, "list the master's jobs")
    c.add_argument("--json", action="store_true", help="print JSON (a list of job statuses)")

    c = command("logs", logs_command, "print a job's events and progress records")
    c.add_argument("job", help="the job id")
    c.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    c = command("export", export_command, "write a finished job's model (.npz, for nn.load_model)")
    c.add_argument("job", help="the job id")
    c.add_argument("-o", "--output", required=True, help="the model file to write")

    c = command("train", train_command, "train a job file end to end on a temporary local cluster")
    c.add_argument("jobfile", help="a Python file defining job()")
    _job_options(c)
    c.add_argument("--workers", type=_positive(int), default=2, help="worker processes (default 2)")
    c.add_argument("--ps", type=_positive(int), default=2, help="parameter-server shards (default 2)")
    c.add_argument("--device", choices=DEVICES, help="workers' kernel backend (default: the model's)")
    c.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the cluster to come up")
    _launcher_options(c)
    _security_options(c)
    c.add_argument("--in-process", action="store_true", help="train in this process, without a cluster")
    c.add_argument("-o", "--output", help="write the trained model (.npz) here")
    c.add_argument("--plot", metavar="FILE", help="write the loss and accuracy curves (PNG) here")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    c = command("plot", plot_command, "draw a job's loss and accuracy curves (PNG) from its history so far")
    c.add_argument("job", help="the job id")
    c.add_argument("-o", "--output", required=True, help="the PNG to write")

    c = command("plan", plan_command, "show the optimised, partitioned training graph")
    c.add_argument("jobfile", help="a Python file defining job()")
    c.add_argument("--workers", dest="num_workers", type=_non_negative, help="workers (0: all registered)")
    c.add_argument("--ps", dest="num_shards", type=_non_negative, help="ps shards (default 2 when planning locally)")
    c.add_argument("--png", help="render the plan graph to this PNG (needs Graphviz)")
    c.add_argument("--dot", help="write the plan graph's Graphviz DOT source here")
    c.add_argument("--json", action="store_true", help="print the plan as JSON")

    c = command("certs", certs_init_command, "make a cluster CA and a certificate per role (mutual TLS)")
    c.add_argument("action", choices=["init"], help="init: write ca.crt/ca.key and <role>.crt/.key")
    c.add_argument("directory", help="where to write them (0700; keys 0600)")
    c.add_argument("--host", action="append", help="an extra DNS name or IP address for every certificate (repeatable)")
    c.add_argument("--days", type=_positive(int), default=365, help="validity of the role certificates (default 365)")
    c.add_argument("--role", action="append", choices=["master", "ps", "worker", "user"],
                   help="only this role (repeatable; default: all four)")
    c.add_argument("--owner", metavar="UID[:GID]",
                   help="give the services' keys and node token to this user (compose: 10001, the image's user; "
                        "needs sudo, and the files you read stay yours)")

    c = command("token", token_command, "create, list or revoke the user tokens the master accepts")
    c.add_argument("action", choices=["create", "list", "revoke"],
                   help="create: print a new token and store its hash; list: the users; revoke: every token of a user")
    c.add_argument("name", nargs="?", help="the user's name (jobs they submit are theirs)")
    c.add_argument("--admin", action="store_true", help="may cancel and export anyone's jobs")
    c.add_argument("--state-dir", help="the cluster's state directory (its tokens.json; default $PSTRAIN_HOME or "
                                       "~/.pstrain/cluster)")
    c.add_argument("--tokens-file", help="the master's --tokens-file, when not in the state directory")
    return p
