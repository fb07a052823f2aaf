"""``psctl plan JOBFILE``: the optimised, partitioned training graph, as the master (or,
with no master answering, this process) plans it, printed as text or JSON and drawn
as Graphviz DOT or PNG: the worker subgraph, each shard's variable slices, folded
constants and gradient pushes. Usage::

    psctl plan examples/mnist_mlp.py --ps 3 --png plan.png --dot plan.dot
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any, Mapping

from client.cli.common import EXIT_OK, CommandError, connect_timeout, load_job, print_json
from client.job import job_to_spec
from client.launchers import ClusterSpec, user_credentials
from pstrain.transport.master_client import MasterClient, MasterUnavailable, master_address

SHARD_COLORS = ("#fdd49e", "#c7e9c0", "#d4b9da", "#fcbba1", "#fee391", "#ccebc5", "#fbb4ae", "#decbe4")
WORKER_COLOR = "#c6dbef"


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_to_dot(graph, plan: Mapping[str, Any], grads: Mapping[str, str] | None = None,
                num_workers: int = 0) -> str:
    """Graphviz DOT of a training plan: the worker subgraph in one cluster (it runs on
    every worker), one cluster per parameter-server shard holding its variable slices (a
    variable cut across shards appears once per slice), folded constants dashed, and
    ``grads`` (variable -> gradient node) drawn as red dashed "push" edges.

    ``plan`` is ``JobPlan.to_dict()`` (or the master's GetPlan ``plan_json``): its
    ``slices`` say where each variable lives and ``*_passes.folded`` what was folded.
    """
    slices: dict[str, list[Mapping]] = {}
    for sl in plan.get("slices", []):
        slices.setdefault(sl["variable"], []).append(sl)
    folded = set(plan.get("forward_passes", {}).get("folded", [])) | set(plan.get("train_passes", {}).get("folded", []))
    ids = {name: f"n{i}" for i, name in enumerate(graph.nodes)}
    sources: dict[str, list[str]] = {}  # node -> the DOT ids its value comes from (slices of a variable)
    by_shard: dict[int, list[str]] = {}
    worker_lines: list[str] = []
    for node in graph.nodes.values():
        label = f"{node.name}\n{node.op} {_shape(node.shape)}"
        if node.op == "variable" and node.name in slices:
            parts = slices[node.name]
            sources[node.name] = []
            for j, sl in enumerate(parts):
                sid = f"{ids[node.name]}s{j}"
                sources[node.name].append(sid)
                shape = node.shape
                if len(parts) > 1 and shape:
                    shape = (int(sl["stop"]) - int(sl["start"]),) + tuple(shape[1:])
                text = f"{sl.get('key', node.name) if len(parts) > 1 else node.name}\nvariable {_shape(shape)}"
                color = SHARD_COLORS[int(sl["shard"]) % len(SHARD_COLORS)]
                by_shard.setdefault(int(sl["shard"]), []).append(
                    f"    {sid} [label={_q(text)} shape=cylinder style=filled fillcolor=\"{color}\"];")
            continue
        sources[node.name] = [ids[node.name]]
        if node.op == "placeholder":
            attrs = 'shape=invhouse style=filled fillcolor="#ffffff"'
        elif node.op == "constant" and node.name in folded:
            attrs = 'shape=note style="filled,dashed" fillcolor="#eeeeee"'
            label += "\nfolded constant"
        elif node.op == "constant":
            attrs = 'shape=note style=filled fillcolor="#f7f7f7"'
        elif node.op == "variable":  # on no shard: local to each worker
            attrs = 'shape=cylinder style=filled fillcolor="#ffffff"'
            label += "\nworker-local"
        else:
            attrs = f'shape=box style="rounded,filled" fillcolor="{WORKER_COLOR}"'
        worker_lines.append(f"    {ids[node.name]} [label={_q(label)} {attrs}];")
    shard_bytes = list(plan.get("shard_bytes", []))
    n_shards = max([len(shard_bytes)] + [k + 1 for k in by_shard])
    where = f"each of {num_workers} workers" if num_workers else "every worker"
    title = (f"pstrain plan: {plan.get('mode', '?')} mode, {n_shards} ps shards. Blue: worker ops; colored "
             "cylinders: variable slices by shard; dashed: folded constants; red: gradient pushes")
    out = ["digraph plan {", f"  label={_q(title)}; labelloc=t; rankdir=TB; fontname=Helvetica;",
           '  node [fontname=Helvetica fontsize=10]; edge [color="#555555"];',
           "  subgraph cluster_workers {",
           f'    label={_q(f"worker subgraph (runs on {where})")}; style=dashed; color="#3182bd";']
    out += worker_lines
    out.append("  }")
    for shard in sorted(by_shard):
        size = f" - {_bytes(shard_bytes[shard])}" if shard < len(shard_bytes) else ""
        out += [f"  subgraph cluster_ps{shard} {{",
                f'    label={_q(f"ps shard {shard}{size}")}; style=filled; color="#999999"; fillcolor="#fafafa";']
        out += by_shard[shard]
        out.append("  }")
    for node in graph.nodes.values():
        for src in node.inputs:
            for sid in sources.get(src, []):
                out.append(f"  {sid} -> {ids[node.name]};")
    for var, grad in (grads or {}).items():
        if grad in ids:
            for sid in sources.get(var, []) if var in slices else []:
                out.append(f'  {ids[grad]} -> {sid} [style=dashed color="#de2d26" fontcolor="#de2d26" label="push"];')
    out.append("}")
    return "\n".join(out) + "\n"


def render_png(dot_text: str, path: str) -> None:
    """Run Graphviz's ``dot -Tpng`` on ``dot_text``, writing ``path``."""
    exe = shutil.which("dot")
    if exe is None:
        raise CommandError("cannot render the plan: Graphviz's `dot` is not installed; install graphviz "
                           "(apt-get install graphviz), or write the DOT source with --dot FILE")
    result = subprocess.run([exe, "-Tpng", "-o", path], input=dot_text, capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError(f"dot -Tpng failed (exit {result.returncode}): {result.stderr.strip()}")


def _plan_locally(spec, num_shards: int):
    try:
        from master.planner import plan_job
    except ImportError as exc:
        raise CommandError(f"cannot plan locally: master.planner is not available ({exc}); start a master "
                           "(psctl up) and point --master at it") from None
    return plan_job(spec, num_shards)


def plan_command(args) -> int:
    job, name = load_job(args)
    spec = job_to_spec(job, name)
    num_shards = args.num_shards or ClusterSpec.ps
    address = master_address(getattr(args, "master", None))
    local = None
    client = MasterClient(address, connect_timeout=min(connect_timeout(args), 2.0), credentials=user_credentials(address))
    try:
        text, data, graph = client.plan(spec)
    except MasterUnavailable:
        print(f"psctl: note: no master at {address}; planning locally for {num_shards} ps shards", file=sys.stderr)
        local = _plan_locally(spec, num_shards)
        text, data, graph = local.text, local.to_dict(), local.graph
    finally:
        client.close()
    if args.png or args.dot:
        grads = dict(local.train.grads) if local is not None else None
        dot = plan_to_dot(graph, data, grads=grads, num_workers=job.num_workers)
        if args.dot:
            with open(args.dot, "w") as f:
                f.write(dot)
        if args.png:
            render_png(dot, args.png)
    if args.json:
        print_json(data)
    else:
        print(text)
        for path in (args.dot, args.png):
            if path:
                print(f"wrote {path}")
    return EXIT_OK
