"""Make the Python stubs for every .proto in this folder, or check that the committed ones are
fresh.

    python -m kvpack.proto.generate          # rewrite the stubs
    python -m kvpack.proto.generate --check  # exit 1 if a committed stub differs from a fresh one

The .proto files are mapped to the virtual path `kvpack/proto/` so the generated modules import each
other as `kvpack.proto.x_pb2`, whatever the folder is called on disk. The stubs depend on the exact
grpcio-tools version, which the `dev` extra pins.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
VIRTUAL_PACKAGE = "kvpack/proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev-only dependency, imported lazily

    sources = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"--proto_path={VIRTUAL_PACKAGE}={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[f"{VIRTUAL_PACKAGE}/{source.name}" for source in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / VIRTUAL_PACKAGE).glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--check", action="store_true", help="only check that stubs are fresh")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [f.name for f in fresh if not (PROTO_DIR / f.name).exists()
                 or not filecmp.cmp(f, PROTO_DIR / f.name, shallow=False)]
        committed = {p.name for p in PROTO_DIR.glob("*_pb2*")}
        orphans = sorted(committed - {f.name for f in fresh})
        if args.check:
            if stale or orphans:
                print(f"stale proto stubs: {stale + orphans}; run python -m kvpack.proto.generate",
                      file=sys.stderr)
                return 1
            print(f"proto stubs fresh ({len(fresh)} files)")
            return 0
        for f in fresh:
            (PROTO_DIR / f.name).write_bytes(f.read_bytes())
        for name in orphans:
            (PROTO_DIR / name).unlink()
        print(f"wrote {len(fresh)} stub files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
