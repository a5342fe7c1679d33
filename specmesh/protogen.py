"""Generate the protobuf / gRPC stubs of the wire contract, or check that they are current.

    python -m specmesh.protogen           # regenerate specmesh/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python -m specmesh.protogen --check   # exit 1, listing stale files, if the committed ones differ

The sources are ``proto/specmesh/v1/*.proto`` with ``proto/`` as the import root, so generated
code imports its siblings as ``from specmesh.v1 import common_pb2``. Generated files are never
edited by hand. Output is deterministic: protoc is given the same files in sorted order, always
through a fresh directory, so the only inputs are the .proto files and the grpcio-tools version
(pinned together with grpcio: stubs record the grpcio version they need and refuse older ones).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Import root of the .proto files; their paths below it become Python module paths.
PROTO_ROOT = REPO_ROOT / "proto"
# Where generated packages land (specmesh/v1/... below it).
OUT_ROOT = REPO_ROOT
# What protoc writes for each x.proto: x_pb2.py, x_pb2_grpc.py, x_pb2.pyi.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")

_INIT_TEXT = '"""Generated protobuf and gRPC stubs of the specmesh.v1 wire contract (see specmesh.protogen)."""\n'


class ProtogenError(RuntimeError):
    """protoc failed, or the toolchain cannot produce stubs that match the runtime."""


@dataclass(frozen=True)
class StaleFile:
    """One generated file that does not match what the .proto sources produce now."""

    path: str  # relative to the output root, POSIX separators, e.g. "specmesh/v1/common_pb2.py"
    reason: str  # "differs", "missing" or "orphan (no .proto generates it)"

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def proto_files(proto_root: Path) -> list[str]:
    """The .proto files under proto_root as sorted import paths ("specmesh/v1/common.proto")."""
    files = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not files:
        raise ProtogenError(f"no .proto files under {proto_root}")
    return files


def check_toolchain() -> None:
    """Refuse to generate with a grpcio-tools that differs from the installed grpcio.

    Stubs record GRPC_GENERATED_VERSION and refuse to import under an older grpcio, and a
    mismatch would also make every committed file look stale.
    """
    try:
        tools = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        raise ProtogenError("grpcio-tools is not installed (pip install 'specmesh[dev]')") from None
    runtime = importlib.metadata.version("grpcio")
    if tools != runtime:
        raise ProtogenError(
            f"grpcio-tools {tools} does not match grpcio {runtime}; install the pinned pair "
            f"(pyproject.toml) so generated stubs import under the runtime"
        )


def _generated_paths(root: Path, package_dirs: set[str]) -> set[str]:
    """Generated-looking files (by suffix) in the given package directories below root."""
    found: set[str] = set()
    for rel_dir in package_dirs:
        directory = root / rel_dir
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
                found.add(path.relative_to(root).as_posix())
    return found


def _package_dirs(protos: list[str]) -> set[str]:
    return {str(Path(p).parent.as_posix()) for p in protos}


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> list[str]:
    """Run protoc on every .proto under proto_root, writing below out_root.

    Returns the generated files, relative to out_root, sorted. Files are overwritten, not
    cleaned: use `regenerate` to update a tree (it also removes orphans).
    """
    check_toolchain()
    proto_root = Path(proto_root).resolve()
    out_root = Path(out_root).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    protos = proto_files(proto_root)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",  # adds the well-known types' include path itself
        f"--proto_path={proto_root}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        *protos,
    ]
    result = subprocess.run(command, cwd=proto_root, capture_output=True, text=True)
    if result.returncode != 0:
        raise ProtogenError(f"protoc failed (exit {result.returncode}):\n{result.stderr.strip()}")
    expected = {
        (Path(p).with_suffix("").as_posix() + suffix) for p in protos for suffix in GENERATED_SUFFIXES
    }
    missing = [p for p in sorted(expected) if not (out_root / p).is_file()]
    if missing:
        raise ProtogenError(f"protoc did not write: {', '.join(missing)}")
    return sorted(expected)


def find_stale(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> list[StaleFile]:
    """Generate into a temporary directory and compare with the files under out_root.

    Reports generated files that differ or are missing under out_root, and generated-looking
    files in the same packages that no .proto produces any more. Empty list: up to date.
    """
    proto_root = Path(proto_root).resolve()
    out_root = Path(out_root).resolve()
    with tempfile.TemporaryDirectory(prefix="specmesh-protogen-") as tmp:
        fresh_root = Path(tmp)
        fresh = set(generate(proto_root, fresh_root))
        committed = _generated_paths(out_root, _package_dirs(proto_files(proto_root)))
        stale: list[StaleFile] = []
        for rel in sorted(fresh | committed):
            if rel not in committed:
                stale.append(StaleFile(rel, "missing"))
            elif rel not in fresh:
                stale.append(StaleFile(rel, "orphan (no .proto generates it)"))
            elif not filecmp.cmp(fresh_root / rel, out_root / rel, shallow=False):
                stale.append(StaleFile(rel, "differs"))
        return stale


def regenerate(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> list[StaleFile]:
    """Bring the generated files under out_root up to date; returns what it changed.

    Only files whose content changes are rewritten (their mtimes stay put otherwise), orphans
    are deleted, and each package directory gets an __init__.py if it lacks one.
    """
    proto_root = Path(proto_root).resolve()
    out_root = Path(out_root).resolve()
    changes = find_stale(proto_root, out_root)
    if changes:
        with tempfile.TemporaryDirectory(prefix="specmesh-protogen-") as tmp:
            fresh_root = Path(tmp)
            generate(proto_root, fresh_root)
            for change in changes:
                target = out_root / change.path
                if change.reason.startswith("orphan"):
                    target.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(fresh_root / change.path, target)
    for rel_dir in _package_dirs(proto_files(proto_root)):
        init = out_root / rel_dir / "__init__.py"
        if not init.exists():
            init.write_text(_INIT_TEXT)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specmesh.protogen",
        description="Generate the specmesh.v1 protobuf/gRPC stubs (with .pyi type stubs).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 listing stale files if the generated files are not current",
    )
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT, help="import root of the .proto files")
    parser.add_argument("--out-root", type=Path, default=OUT_ROOT, help="root below which specmesh/v1/ lives")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = find_stale(args.proto_root, args.out_root)
            if stale:
                listing = "\n".join(f"  {s}" for s in stale)
                print(
                    f"Generated protobuf code is stale ({len(stale)} file(s)):\n{listing}\n"
                    f"Regenerate with: python -m specmesh.protogen (then commit the result)",
                    file=sys.stderr,
                )
                return 1
            print("Generated protobuf code is up to date.", file=sys.stderr)
            return 0
        changed = regenerate(args.proto_root, args.out_root)
    except ProtogenError as error:
        print(f"protogen: {error}", file=sys.stderr)
        return 2
    verbs = {"missing": "created", "differs": "updated"}
    for change in changed:
        print(f"{verbs.get(change.reason, 'removed')} {change.path}", file=sys.stderr)
    print(f"Generated protobuf code is up to date ({len(changed)} file(s) changed).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
