"""Regenerate the Python modules for ``protos/*.proto`` with grpcio-tools' protoc.

Each ``protos/X.proto`` gives ``protos/X_pb2.py``, plus ``protos/X_pb2_grpc.py`` when
it defines a service. protoc runs with the repository root as its include path, so a
proto is named ``protos/X.proto`` and its module ``protos.X_pb2``: generated imports
read ``from protos import graph_pb2``, the same in a checkout and when installed.

The generated files are committed; ``--check`` regenerates into a temporary
directory and fails, listing the files that differ, when they are stale (CI runs it).

Usage::

    python -m protos.generate          # rewrite protos/*_pb2.py and *_pb2_grpc.py
    python -m protos.generate --check  # exit 1 if any generated file is out of date
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


class GenerateError(RuntimeError):
    """protoc failed; its own messages went to stderr."""


def proto_files() -> list[Path]:
    """The ``.proto`` sources, sorted so output does not depend on directory order."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_files() -> list[Path]:
    """The generated modules now in ``protos/``."""
    return sorted(p for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def render() -> dict[str, bytes]:
    """Run protoc over every proto; return ``{file name in protos/: content}``."""
    from grpc_tools import protoc  # a dev dependency: only this tool needs it

    protos = proto_files()
    if not protos:
        return {}
    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="pstrain-protoc-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        descriptors = Path(tmp) / "descriptors.pb"
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={descriptors}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise GenerateError(f"protoc failed on {', '.join(p.name for p in protos)} (see its messages above)")
        with_services = _protos_with_services(descriptors.read_bytes())
        rendered: dict[str, bytes] = {}
        for proto in protos:
            stem = proto.stem
            rendered[f"{stem}_pb2.py"] = (out / "protos" / f"{stem}_pb2.py").read_bytes()
            # The gRPC plugin writes a stub module even for a proto without services;
            # such a module would only import grpc, so it is not kept.
            if proto.name in with_services:
                rendered[f"{stem}_pb2_grpc.py"] = (out / "protos" / f"{stem}_pb2_grpc.py").read_bytes()
    return rendered


def _protos_with_services(descriptor_set: bytes) -> set[str]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    return {Path(f.name).name for f in fds.file if f.service}


def write(rendered: dict[str, bytes]) -> list[str]:
    """Make ``protos/`` match ``rendered``; return the names of files changed or removed."""
    changed = diff(rendered)
    for name in changed:
        path = PROTO_DIR / name
        if name in rendered:
            path.write_bytes(rendered[name])
        else:
            path.unlink()
    return changed


def diff(rendered: dict[str, bytes]) -> list[str]:
    """Names of generated files in ``protos/`` that are missing, different or stale."""
    current = {p.name for p in generated_files()}
    out = []
    for name in sorted(current | set(rendered)):
        path = PROTO_DIR / name
        if name not in rendered or not path.exists() or path.read_bytes() != rendered[name]:
            out.append(name)
    return out


def _tools_version() -> str:
    try:
        return f"grpcio-tools {importlib.metadata.version('grpcio-tools')}"
    except importlib.metadata.PackageNotFoundError:
        return "grpcio-tools (version unknown)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="regenerate into a temporary directory and fail if files differ"
    )
    args = parser.parse_args(argv)
    try:
        rendered = render()
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = diff(rendered)
        if stale:
            print(f"generated protos are out of date (regenerated with {_tools_version()}):", file=sys.stderr)
            for name in stale:
                state = "missing" if not (PROTO_DIR / name).exists() else "stale" if name not in rendered else "differs"
                print(f"  protos/{name} ({state})", file=sys.stderr)
            print("run: python -m protos.generate", file=sys.stderr)
            return 1
        print(f"protos up to date ({len(rendered)} generated files)")
        return 0
    changed = write(rendered)
    for name in changed:
        print(f"{'wrote' if name in rendered else 'removed'} protos/{name}")
    if not changed:
        print("protos already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
