"""Generate the Python gRPC stubs from proto/ into authority/_proto (or another directory).

The stubs are committed; tests/test_proto_stubs.py regenerates them and fails if they differ.
Run after editing a .proto:  python tools/gen_proto.py
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = "authority._proto"


def generate(out_dir: Path) -> None:
    """Write the stubs under out_dir/ticketauthority/v1, imports rewritten into our package."""
    from grpc_tools import protoc  # test-only dependency

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for src in sorted(Path(tmp).rglob("*.py*")):
            text = re.sub(r"^from ticketauthority\.", f"from {OUT_PACKAGE}.ticketauthority.",
                          src.read_text(), flags=re.MULTILINE)
            dest = out_dir / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    for pkg in (out_dir, out_dir / "ticketauthority", out_dir / "ticketauthority" / "v1"):
        (pkg / "__init__.py").write_text('"""Generated gRPC stubs (see tools/gen_proto.py)."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "authority" / "_proto")
