"""The generated protobuf code is exactly what proto/gen.sh produces from the .proto files."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "proto" / "kvtier_proto" / "v1"


def test_generated_code_matches_gen_sh(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "proto" / "gen.sh"), str(tmp_path)], check=True, env=env)
    fresh = tmp_path / "kvtier_proto" / "v1"
    generated = sorted(p.name for p in fresh.iterdir() if "_pb2" in p.name)
    committed = sorted(p.name for p in GEN.iterdir() if "_pb2" in p.name)
    assert generated == committed, "run proto/gen.sh: generated files differ from the tree"
    protos = sorted(p.stem for p in GEN.glob("*.proto"))
    assert {f"{s}_pb2.py" for s in protos} <= set(generated)
    _, mismatch, errors = filecmp.cmpfiles(fresh, GEN, generated, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run gen.sh"
