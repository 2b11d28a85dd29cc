"""Regenerate the Python stubs of the kubelet's device plugin and PodResources APIs.

Run from anywhere: ``python -m protos.generate`` (``make protos``). protoc is run with the
repository root as the include path, so the generated gRPC module imports ``from
protos.deviceplugin.v1beta1 import api_pb2`` and the stubs are importable as
``protos.deviceplugin.v1beta1.api_pb2(_grpc)`` (and ``protos.podresources.v1.api_pb2(_grpc)``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = (
    "protos/deviceplugin/v1beta1/api.proto",
    "protos/podresources/v1/api.proto",
)


class GenerateError(RuntimeError):
    """protoc failed; the message carries its exit status."""


def generate(out_dir: Path = REPO_ROOT, repo_root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every proto under ``repo_root``, writing stubs beneath ``out_dir``.

    Returns the generated files. ``out_dir`` mirrors the package layout, so the default writes
    next to the .proto files; tests pass a temporary directory to compare the output.
    """
    # Imported here so importing this module (e.g. for REPO_ROOT) does not need grpcio-tools.
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{repo_root}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        # Type stubs, so mypy checks our use of the messages.
        f"--pyi_out={out_dir}",
        *(str(repo_root / proto) for proto in PROTO_FILES),
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerateError(f"protoc exited with status {status} for {', '.join(PROTO_FILES)}")
    outputs: list[Path] = []
    for proto in PROTO_FILES:
        stem = Path(proto).with_suffix("")
        outputs.append(out_dir / f"{stem}_pb2.py")
        outputs.append(out_dir / f"{stem}_pb2.pyi")
        outputs.append(out_dir / f"{stem}_pb2_grpc.py")
    return outputs


def main(argv: list[str] | None = None) -> int:
    """Command line entry: regenerate in place (or into ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    try:
        for path in generate(args.out):
            print(path)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
